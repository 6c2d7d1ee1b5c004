"""The fused ops of `fused.py`, written again from primitive ops only.

Slow but obviously right: backward comes for free from the primitives' chain rule.
The tests check that each fused op gives the same values and gradients as its twin
here; read these first if a fused backward looks like magic.
"""
from __future__ import annotations

import math

from .fused import GELU_C, causal_mask
from .tensor import Tensor, where


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + (GELU_C * (x + 0.044715 * x ** 3)).tanh())


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    e = (x - x.max(axis=axis, keepdims=True).detach()).exp()  # the shift is a constant
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    shifted = x - x.max(axis=axis, keepdims=True).detach()
    return shifted - shifted.exp().sum(axis=axis, keepdims=True).log()


def cross_entropy(logits: Tensor, targets, ignore_index=None) -> Tensor:
    """logits (..., V), integer targets (...)."""
    V = logits.shape[-1]
    flat = log_softmax(logits.reshape(-1, V))  # (N, V)
    t = Tensor(targets).data.reshape(-1).astype("int64")
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
    return weight[Tensor(ids).data]


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    """q (B, H, Tq, D), k and v (B, H, Tk, D) -> (B, H, Tq, D)."""
    scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, Tq, Tk)
    if causal:
        scores = where(causal_mask(q.xp, q.shape[-2], k.shape[-2]), -math.inf, scores)
    return softmax(scores, axis=-1) @ v


def causal_self_attention(qkv: Tensor, n_head: int) -> Tensor:
    """qkv (B, T, 3C) -> (B, T, C): split, heads, attention, merge; each step a primitive."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.reshape(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(3, axis=2))
    y = scaled_dot_product_attention(q, k, v, causal=True)  # (B, nh, T, hs)
    return y.transpose(1, 2).reshape(B, T, C)
