"""The functional API, as `torch.nn.functional`, and the switch between the ops' tiers.

Every op that has a fused form exists in three tiers, one module each, with the same
functions:
  - "primitive" (primitive.py): written from primitive ops; autograd derives the gradient;
  - "fused" (fused.py, fused_attention.py): one op each, the backward derived by hand;
  - "fast" (fast.py, fast_attention.py, blocked_attention.py): the fused math as CPU
    kernels (the default).
The functions here check their inputs once, then call the selected tier:

    set_ops_tier("fused")            # from now on
    with ops_tier("primitive"):      # inside the block only
        logits, loss = model(x, y)

The model code is the same whichever tier runs; the tests check that all three give
the same values and gradients.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from . import fast, fused, primitive
from .methods import concatenate, stack, where  # noqa: F401  (re-exported)
from .tensor import Tensor

TIERS = {"primitive": primitive, "fused": fused, "fast": fast}
DEFAULT_TIER = "fast"
_tier = DEFAULT_TIER
_ops = TIERS[_tier]  # the selected tier's module: every op below calls into it


def set_ops_tier(name: str) -> str:
    """Select the tier every op below runs ("primitive", "fused" or "fast"); returns the old one."""
    global _tier, _ops
    if name not in TIERS:
        raise ValueError(f"unknown ops tier {name!r}; choose one of: {', '.join(TIERS)}")
    previous, _tier, _ops = _tier, name, TIERS[name]
    return previous


def get_ops_tier() -> str:
    return _tier


@contextlib.contextmanager
def ops_tier(name: str) -> Iterator[None]:
    """Inside the block, ops run in tier `name`; the previous tier comes back after it."""
    previous = set_ops_tier(name)
    try:
        yield
    finally:
        set_ops_tier(previous)


# --- the ops ---------------------------------------------------------------------------


def gelu(x: Tensor) -> Tensor:
    """GELU, tanh approximation (GPT-2)."""
    return _ops.gelu(x)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    return _ops.softmax(x, axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    return _ops.log_softmax(x, axis)


def check_ids(ids, upper: int, what: str, ignore_index=None) -> None:
    """Raise IndexError if an id falls outside [0, upper). CuPy would wrap silently."""
    valid = ids if ignore_index is None else ids[ids != ignore_index]
    if valid.size and (int(valid.min()) < 0 or int(valid.max()) >= upper):
        bad = int(valid.min()) if int(valid.min()) < 0 else int(valid.max())
        raise IndexError(f"{what} {bad} is out of range for size {upper}")


def _int_array(ids, like: Tensor, what: str):
    """ids as an integer array on like's device; `what` completes "... must be <what>"."""
    ids = ids.data if isinstance(ids, Tensor) else Tensor(ids, device=like.device).data
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{what}, got {ids.dtype}")
    return ids


def cross_entropy(logits: Tensor, targets, ignore_index: int | None = None) -> Tensor:
    """Mean cross-entropy of logits (..., V) against integer targets (...); positions whose
    target is `ignore_index` count for nothing (their gradient is exactly 0)."""
    targets = _int_array(targets, logits, "cross_entropy targets must be integer class ids")
    if tuple(targets.shape) != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets shape {tuple(targets.shape)} does not match "
                         f"logits shape {logits.shape} without its last axis")
    check_ids(targets, logits.shape[-1], "cross_entropy: target", ignore_index)
    return _ops.cross_entropy(logits, targets, ignore_index)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Normalise x (..., C) over its last axis, then scale by weight (C,) and shift by bias (C,)."""
    C = x.data.shape[-1:]  # (on .data: cheaper, and this runs for every layer norm)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.data.shape != C:
            raise ValueError(f"layer_norm: {name} has shape {p.shape} but x {x.shape} needs {x.shape[-1:]}")
    return _ops.layer_norm(x, weight, bias, eps)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., in) @ weight(out, in)^T + bias (out,)."""
    if x.data.shape[-1] != weight.data.shape[1]:  # (on .data: cheaper, and this runs for every linear)
        raise ValueError(f"linear: input has {x.shape[-1]} features but weight {weight.shape} "
                         f"expects {weight.shape[1]}")
    return _ops.linear(x, weight, bias)


def embedding(weight: Tensor, ids) -> Tensor:
    """Rows of weight (V, C) for integer ids (...): (..., C)."""
    ids = _int_array(ids, weight, "embedding ids must be integers")
    check_ids(ids, weight.shape[0], "embedding: token id")
    return _ops.embedding(weight, ids)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """In training, zero each element with probability p and scale the rest by 1/(1-p)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    return _ops.dropout(x, p)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                                 dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(D)) v. q (B, H, Tq, D), k and v (B, H, Tk, D) -> (B, H, Tq, D).

    Causal: query i (the last Tq of Tk positions) sees keys up to its own position.
    """
    Tq, Tk = q.data.shape[-2], k.data.shape[-2]  # (on .data: cheaper, and this runs for every decoded token)
    if k.data.shape[-1] != q.data.shape[-1] or v.data.shape[-2] != Tk:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit together")
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs at least as many keys as queries ({Tk} < {Tq})")
    return _ops.scaled_dot_product_attention(q, k, v, causal, dropout_p)


def has_packed_attention() -> bool:
    """Does the selected tier have a kernel for the whole multi-head attention (the fast one)?"""
    return hasattr(_ops, "packed_causal_attention")


def packed_causal_attention(qkv: Tensor, n_head: int, dropout_p: float = 0.0,
                            kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Multi-head causal attention from packed qkv (B, T, 3C) (q, k, v side by side, each
    C = n_head * head_size wide, as c_attn makes them) to (B, T, C), heads merged, in one
    kernel of the fast tier. kv: (keys, values) (B, nh, Tk, hs) from a KV cache that
    already holds this step's (inference only)."""
    kernel = getattr(_ops, "packed_causal_attention", None)
    if kernel is None:
        raise RuntimeError(f"the {_tier!r} ops tier has no packed attention kernel (only 'fast' has)")
    if qkv.shape[-1] % (3 * n_head):
        raise ValueError(f"packed qkv of width {qkv.shape[-1]} does not split into 3 x {n_head} heads")
    if kv is not None:
        keys, values = kv
        kv = (keys.data if isinstance(keys, Tensor) else keys, values.data if isinstance(values, Tensor) else values)
    return kernel(qkv, n_head, dropout_p, kv)


# --- Tensor's methods for these ops ------------------------------------------------------

Tensor.gelu = gelu
Tensor.softmax = softmax
Tensor.log_softmax = log_softmax
