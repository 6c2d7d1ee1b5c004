"""The primitive tier: every op that has a fused form, written from primitive ops only.

Slow but obviously right: no backward is written here, autograd derives each gradient
from the primitives' chain rule. `fused.py` does the same math as one op each, with the
backward derived by hand; `fast.py` does it again as kernels. The tests check that the
three tiers give the same values and gradients. Select this tier with
`tinygrad_lite.set_ops_tier("primitive")` or `train.py --ops primitive`.

Inputs arrive checked by functional.py (shapes, integer ids in range).
"""
from __future__ import annotations

import math

from . import backend
from .methods import where
from .ops import causal_mask
from .tensor import Tensor

GELU_C = math.sqrt(2.0 / math.pi)  # GPT-2's tanh approximation of GELU


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + (GELU_C * (x + 0.044715 * x * x * x)).tanh())  # x*x*x: Pow is slow


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    e = (x - x.max(axis=axis, keepdims=True).detach()).exp()  # the shift is a constant
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    shifted = x - x.max(axis=axis, keepdims=True).detach()
    return shifted - shifted.exp().sum(axis=axis, keepdims=True).log()


def cross_entropy(logits: Tensor, targets, ignore_index=None) -> Tensor:
    """logits (..., V), integer targets (...) -> the mean over counted positions."""
    V = logits.shape[-1]
    flat = log_softmax(logits.reshape(-1, V))  # (N, V)
    t = targets.reshape(-1)  # (N,)
    valid = t != ignore_index if ignore_index is not None else t >= 0
    xp = flat.xp
    picked = flat[xp.arange(len(t)), xp.where(valid, t, 0)]  # (N,)
    weights = Tensor(valid.astype(flat.dtype))
    return -(picked * weights).sum() / max(int(valid.sum()), 1)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)
    out = xc / (var + eps).sqrt() * weight
    return out + bias if bias is not None else out


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    out = x @ weight.transpose(0, 1)
    return out + bias if bias is not None else out


def embedding(weight: Tensor, ids) -> Tensor:
    return weight[ids]


def dropout(x: Tensor, p: float) -> Tensor:
    """Multiply by a random mask of 0 and 1/(1-p): a constant, so only Mul is recorded."""
    keep = backend.rand(x.shape, x.device, x.dtype) >= p
    return x * Tensor._from_array(keep * x.dtype.type(1.0 / (1.0 - p)))


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                                 dropout_p: float = 0.0) -> Tensor:
    """q (B, H, Tq, D), k and v (B, H, Tk, D) -> (B, H, Tq, D)."""
    scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, Tq, Tk)
    if causal:
        scores = where(causal_mask(q.xp, q.shape[-2], k.shape[-2]), -math.inf, scores)
    weights = softmax(scores, axis=-1)
    if dropout_p > 0:
        weights = dropout(weights, dropout_p)
    return weights @ v
