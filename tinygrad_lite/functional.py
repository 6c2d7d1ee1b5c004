"""The functional API, as `torch.nn.functional`: plain functions over tensors."""
from __future__ import annotations

from . import fused
from .tensor import Tensor, concatenate, stack, where  # noqa: F401  (re-exported)


def gelu(x: Tensor) -> Tensor:
    """GELU, tanh approximation (GPT-2)."""
    return fused.GELU.apply(x)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    return fused.Softmax.apply(x, axis=axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    return fused.LogSoftmax.apply(x, axis=axis)


def cross_entropy(logits: Tensor, targets, ignore_index: int | None = None) -> Tensor:
    """Mean cross-entropy of logits (..., V) against integer targets (...)."""
    targets = targets.data if isinstance(targets, Tensor) else Tensor(targets, device=logits.device).data
    if targets.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy targets must be integer class ids, got {targets.dtype}")
    return fused.CrossEntropy.apply(logits, targets, ignore_index=ignore_index)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Normalise x (..., C) over its last axis, then scale by weight (C,) and shift by bias (C,)."""
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != x.shape[-1:]:
            raise ValueError(f"layer_norm: {name} has shape {p.shape} but x {x.shape} needs {x.shape[-1:]}")
    return fused.LayerNorm.apply(x, weight, bias, eps=eps)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., in) @ weight(out, in)^T + bias (out,)."""
    return fused.Linear.apply(x, weight, bias)


def embedding(weight: Tensor, ids) -> Tensor:
    """Rows of weight (V, C) for integer ids (...): (..., C)."""
    ids = ids.data if isinstance(ids, Tensor) else Tensor(ids, device=weight.device).data
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding ids must be integers, got {ids.dtype}")
    return fused.Embedding.apply(weight, ids)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """In training, zero each element with probability p and scale the rest by 1/(1-p)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    return fused.Dropout.apply(x, p=p)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                                 dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(D)) v, fused. q (B, H, Tq, D), k and v (B, H, Tk, D) -> (B, H, Tq, D).

    Causal: query i (the last Tq of Tk positions) sees keys up to its own position.
    """
    return fused.Attention.apply(q, k, v, causal=causal, dropout_p=dropout_p)


def causal_self_attention(qkv: Tensor, n_head: int, dropout_p: float = 0.0, cache=None) -> Tensor:
    """Multi-head causal attention from packed qkv (B, T, 3C) (q, k, v side by side, each
    C = n_head * head_size wide, as c_attn makes them) to (B, T, C), heads merged.

    cache=(k_buffer, v_buffer, start_pos): append this step's keys/values to a KV cache's
    buffers (B, nh, max_len, hs) at start_pos and attend to all of them (inference only).
    """
    return fused.PackedAttention.apply(qkv, n_head=n_head, dropout_p=dropout_p, cache=cache)
