"""Fast attention kernels: FusedAttention's math with a CPU-friendly layout.

Two entry points share one forward and one backward:
  - `FastAttention` takes q, k, v already split into heads (B, H, T, D): RoPE-rotated
    queries and keys, or keys and values read from a KV cache;
  - `FastPackedAttention` takes the packed output of c_attn (B, T, 3C) and returns
    (B, T, C), so splitting into heads and merging them back are free views instead of
    six ops with their own backward copies (the training fast path, and decoding when
    the KV cache hands it the keys and values).
"""
from __future__ import annotations

import math

from .backend import device_of, rand, xp_of
from .cpu import parallel_rows, row_blocks
from .ops import causal_mask
from .tensor import Function


def attention_forward(q, k, v, causal: bool, dropout_p: float):
    """q (..., Tq, D), k, v (..., Tk, D) -> (out (..., Tq, D), saved for backward).

    NOTE: the probabilities are stored transposed, keys first: (Tk, ..., Tq). The softmax
    runs over the keys, and with the key axis outermost its max and sum are Tk
    elementwise passes over long rows, not one short reduction per query (which NumPy
    does ~20x slower). The matmuls read and write these layouts as strided views.
    """
    xp = xp_of(q)
    Tq, Tk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    lead = q.shape[:-2]
    if Tq == 1:  # decoding: one query per sequence; the usual layout is faster
        scores, key_axis = q @ xp.swapaxes(k, -1, -2), -1  # (..., 1, Tk)
    else:
        scores, key_axis = xp.empty((Tk,) + lead + (Tq,), dtype=q.dtype), 0  # keys first
        xp.matmul(k, xp.swapaxes(q, -1, -2), out=xp.moveaxis(scores, 0, -2))  # S^T = k q^T
    scores *= scale
    if causal and Tq > 1:  # -inf where query i may not see key j (a lone query sees them all)
        blocked = causal_mask(xp, Tq, Tk).T.reshape((Tk,) + (1,) * len(lead) + (Tq,))
        scores += xp.where(blocked, -xp.inf, 0).astype(scores.dtype)
    scores -= scores.max(axis=key_axis, keepdims=True)  # softmax over the keys, in place
    xp.exp(scores, out=scores)
    scores /= scores.sum(axis=key_axis, keepdims=True)
    probs_keys_first = scores if key_axis == 0 else xp.moveaxis(scores, -1, 0)  # (Tk, ..., Tq)
    probs = xp.moveaxis(probs_keys_first, 0, -1)  # (..., Tq, Tk) view
    mask = None
    if dropout_p > 0:
        mask = (rand(probs.shape, device_of(probs), probs.dtype) >= dropout_p) * probs.dtype.type(1 / (1 - dropout_p))
    out = (probs if mask is None else probs * mask) @ v  # (..., Tq, D)
    return out, (q, k, v, probs_keys_first, mask, scale)


# with P = softmax(S), S = q k^T * scale, O = P v:
# dv = P^T dO;  dP = dO v^T;  dS = P * (dP - sum(dP * P));  dq = dS k * scale;  dk = dS^T q * scale
def attention_backward(grad, saved):
    """grad (..., Tq, D) -> dq, dk, dv. Works on the keys-first layout (Tk, ..., Tq)."""
    q, k, v, probs_keys_first, mask, scale = saved
    xp = xp_of(grad)
    probs_transposed = xp.moveaxis(probs_keys_first, 0, -2)  # P^T (..., Tk, Tq) view
    dv = (probs_transposed if mask is None else probs_transposed * xp.swapaxes(mask, -1, -2)) @ grad
    dscores_keys_first = xp.empty_like(probs_keys_first)  # dP^T, then dS^T, (Tk, ..., Tq)
    xp.matmul(v, xp.swapaxes(grad, -1, -2), out=xp.moveaxis(dscores_keys_first, 0, -2))  # dP^T = v dO^T
    if mask is not None:
        dscores_keys_first *= xp.moveaxis(mask, -1, 0)
    row_sums = (dscores_keys_first * probs_keys_first).sum(axis=0)  # (..., Tq): sum over keys of dP * P
    dscores_keys_first -= row_sums
    dscores_keys_first *= probs_keys_first
    dscores_keys_first *= scale
    dq = xp.moveaxis(dscores_keys_first, 0, -1) @ k  # (..., Tq, D)
    dk = xp.moveaxis(dscores_keys_first, 0, -2) @ q  # (..., Tk, D)
    return dq, dk, dv


class FastAttention(Function):
    """FusedAttention's op on the keys-first layout. q (B, H, Tq, D), k, v (B, H, Tk, D)."""

    def forward(self, q, k, v, causal=True, dropout_p=0.0):
        out, self.saved = attention_forward(q, k, v, causal, dropout_p)
        return out

    def backward(self, grad):
        return attention_backward(grad, self.saved)


class FastPackedAttention(Function):
    """Causal multi-head attention straight from packed qkv (B, T, 3C) to y (B, T, C).

    Sequences of a batch are independent, so without dropout the batch is split into
    blocks that run on all CPU cores. With `kv=(keys, values)` (B, nh, Tk, hs), read
    from a KV cache that already holds this step's keys and values (the cache writes
    them: model/kv_cache.py), the queries attend to those instead: the decode path, in
    one op. That is inference only: it has no backward.
    """

    def forward(self, qkv, n_head, dropout_p=0.0, kv=None):
        B, T, C3 = qkv.shape
        head_size = C3 // (3 * n_head)
        out = xp_of(qkv).empty((B, T, C3 // 3), dtype=qkv.dtype)

        def block(qkv, out, *cached):
            b = qkv.shape[0]
            heads = qkv.reshape(b, T, 3, n_head, head_size)  # a view
            q = heads[:, :, 0].transpose(0, 2, 1, 3)  # (b, nh, T, hs) view
            if cached:  # every position so far, this step's included
                k, v = cached
            else:
                k, v = heads[:, :, 1].transpose(0, 2, 1, 3), heads[:, :, 2].transpose(0, 2, 1, 3)
            y, saved = attention_forward(q, k, v, True, dropout_p)
            out[...] = y.transpose(0, 2, 1, 3).reshape(b, T, C3 // 3)  # heads side by side again
            return saved
        # NOTE: dropout draws random numbers, which must come in one order to be reproducible
        self.blocks = row_blocks(qkv) if dropout_p == 0 else [slice(None)]
        self.saved = parallel_rows(block, qkv, out, *(kv or ()), blocks=self.blocks)
        self.shape, self.cached = (T, n_head, head_size), kv is not None
        return out

    # the same backward; only the head split/merge is undone by views
    def backward(self, grad):
        if self.cached:
            raise RuntimeError("no backward through KV-cached attention: the cache is for "
                               "generation, which runs under no_grad")
        T, n_head, head_size = self.shape
        dqkv = xp_of(grad).empty((grad.shape[0], T, 3, n_head, head_size), dtype=grad.dtype)

        def block(grad, dqkv, saved):
            g = grad.reshape(grad.shape[0], T, n_head, head_size).transpose(0, 2, 1, 3)  # (b, nh, T, hs) view
            for i, d in enumerate(attention_backward(g, saved)):
                dqkv[:, :, i] = d.transpose(0, 2, 1, 3)
        parallel_rows(block, grad, dqkv, blocks=self.blocks, extras=self.saved)
        return (dqkv.reshape(grad.shape[0], T, 3 * n_head * head_size),)
