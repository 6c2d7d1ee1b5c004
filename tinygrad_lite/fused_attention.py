"""Fused causal attention, with the hand-derived backward of softmax(q k^T / sqrt(D)) v.

Two entry points share one forward and one backward:
  - `Attention` takes q, k, v already split into heads (B, H, T, D): the general case
    (RoPE-rotated queries and keys, a KV cache);
  - `PackedAttention` takes the packed output of c_attn (B, T, 3C) and returns (B, T, C),
    so splitting into heads and merging them back are free views instead of six ops with
    their own backward copies (the training fast path).
"""
from __future__ import annotations

import math

from .backend import device_of, parallel_rows, rand, row_blocks, xp_of
from .tensor import Function


def causal_mask(xp, Tq: int, Tk: int):
    """(Tq, Tk) bool, True where query i may NOT see key j.

    The Tq queries are the last Tq of the Tk positions (the KV-cache case), so query i
    sits at position i + Tk - Tq and sees keys 0 .. i + Tk - Tq.
    """
    return xp.arange(Tk)[None, :] > xp.arange(Tq)[:, None] + (Tk - Tq)


def attention_forward(q, k, v, causal: bool, dropout_p: float):
    """q (..., Tq, D), k, v (..., Tk, D) -> (out (..., Tq, D), saved for backward).

    NOTE: the scores are stored transposed, keys first: S^T (Tk, ..., Tq). The softmax
    runs over the keys, and with the key axis outermost its max and sum are Tk
    elementwise passes over long rows, not one short reduction per query (which NumPy
    does ~20x slower). The matmuls read and write these layouts as strided views.
    """
    xp = xp_of(q)
    Tq, Tk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    if k.shape[-1] != D or v.shape[-2] != Tk:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "do not fit together")
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs at least as many keys as queries ({Tk} < {Tq})")
    scale = 1.0 / math.sqrt(D)
    lead = q.shape[:-2]
    if Tq == 1:  # decoding: one query per sequence; the usual layout is faster
        scores, key_axis = q @ xp.swapaxes(k, -1, -2), -1  # (..., 1, Tk)
    else:
        scores, key_axis = xp.empty((Tk,) + lead + (Tq,), dtype=q.dtype), 0  # S^T: keys first
        xp.matmul(k, xp.swapaxes(q, -1, -2), out=xp.moveaxis(scores, 0, -2))  # S^T = k q^T
    scores *= scale
    if causal and Tq > 1:  # -inf where query i may not see key j (a lone query sees them all)
        blocked = causal_mask(xp, Tq, Tk).T.reshape((Tk,) + (1,) * len(lead) + (Tq,))
        scores += xp.where(blocked, -xp.inf, 0).astype(scores.dtype)
    scores -= scores.max(axis=key_axis, keepdims=True)  # softmax over the keys, in place
    xp.exp(scores, out=scores)
    scores /= scores.sum(axis=key_axis, keepdims=True)
    st = scores if key_axis == 0 else xp.moveaxis(scores, -1, 0)  # the keys-first view backward uses
    P = xp.moveaxis(st, 0, -1)  # (..., Tq, Tk) view
    mask = None
    if dropout_p > 0:
        mask = (rand(P.shape, device_of(P), P.dtype) >= dropout_p) * P.dtype.type(1 / (1 - dropout_p))
    out = (P if mask is None else P * mask) @ v  # (..., Tq, D)
    return out, (q, k, v, st, mask, scale)


# with P = softmax(S), S = q k^T * scale, O = P v:
# dv = P^T dO;  dP = dO v^T;  dS = P * (dP - sum(dP * P));  dq = dS k * scale;  dk = dS^T q * scale
def attention_backward(grad, saved):
    """grad (..., Tq, D) -> dq, dk, dv. Works on the transposed layout (Tk, ..., Tq)."""
    q, k, v, st, mask, scale = saved
    xp = xp_of(grad)
    PT = xp.moveaxis(st, 0, -2)  # P^T (..., Tk, Tq) view
    dv = (PT if mask is None else PT * xp.swapaxes(mask, -1, -2)) @ grad  # (..., Tk, D)
    dst = xp.empty_like(st)  # dP^T, then dS^T
    xp.matmul(v, xp.swapaxes(grad, -1, -2), out=xp.moveaxis(dst, 0, -2))  # dP^T = v dO^T
    if mask is not None:
        dst *= xp.moveaxis(mask, -1, 0)
    row = (dst * st).sum(axis=0)  # (..., Tq): sum over keys of dP * P
    dst -= row
    dst *= st
    dst *= scale
    dq = xp.moveaxis(dst, 0, -1) @ k  # (..., Tq, D)
    dk = xp.moveaxis(dst, 0, -2) @ q  # (..., Tk, D)
    return dq, dk, dv


class Attention(Function):
    """softmax(q k^T / sqrt(D) + mask) v for q (B, H, Tq, D), k and v (B, H, Tk, D).

    Output (B, H, Tq, D). With causal=True each query sees only keys at or before its
    own position.
    """

    def forward(self, q, k, v, causal=True, dropout_p=0.0):
        out, self.saved = attention_forward(q, k, v, causal, dropout_p)
        return out

    def backward(self, grad):
        return attention_backward(grad, self.saved)


class PackedAttention(Function):
    """Causal multi-head attention straight from packed qkv (B, T, 3C) to y (B, T, C).

    Sequences of a batch are independent, so without dropout the batch is split into
    blocks that run on all CPU cores. With `cache=(k_buffer, v_buffer, start_pos)`
    (buffers (B, nh, max_len, hs), see model/kv_cache.py) this step's keys and values
    are written at start_pos and the queries attend to everything cached so far: the
    decode path, in one op. A cached call is for inference: it has no backward.
    """

    def forward(self, qkv, n_head, dropout_p=0.0, cache=None):
        B, T, C3 = qkv.shape
        if C3 % (3 * n_head):
            raise ValueError(f"packed qkv of width {C3} does not split into 3 x {n_head} heads")
        hs = C3 // (3 * n_head)
        out = xp_of(qkv).empty((B, T, C3 // 3), dtype=qkv.dtype)
        start = end = 0
        if cache is not None:
            start = cache[2]
            end = start + T

        def block(qkv, out, *kv_buffers):
            b = qkv.shape[0]
            heads = qkv.reshape(b, T, 3, n_head, hs)  # a view
            q, k, v = (heads[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # 3 x (b, nh, T, hs) views
            if kv_buffers:  # append to the cache, then attend to all of it
                k_buf, v_buf = kv_buffers
                k_buf[:, :, start:end] = k
                v_buf[:, :, start:end] = v
                k, v = k_buf[:, :, :end], v_buf[:, :, :end]  # (b, nh, end, hs)
            y, saved = attention_forward(q, k, v, True, dropout_p)
            out[...] = y.transpose(0, 2, 1, 3).reshape(b, T, C3 // 3)  # heads side by side again
            return saved
        # NOTE: dropout draws random numbers, which must come in one order to be reproducible
        self.blocks = row_blocks(qkv) if dropout_p == 0 else [slice(None)]
        buffers = () if cache is None else cache[:2]
        self.saved = parallel_rows(block, qkv, out, *buffers, blocks=self.blocks)
        self.shape, self.cached = (T, n_head, hs), cache is not None
        return out

    # the same backward; only the head split/merge is undone by views
    def backward(self, grad):
        if self.cached:
            raise RuntimeError("no backward through KV-cached attention: the cache is for "
                               "generation, which runs under no_grad")
        T, nh, hs = self.shape
        dqkv = xp_of(grad).empty((grad.shape[0], T, 3, nh, hs), dtype=grad.dtype)

        def block(grad, dqkv, saved):
            g = grad.reshape(grad.shape[0], T, nh, hs).transpose(0, 2, 1, 3)  # (b, nh, T, hs) view
            for i, d in enumerate(attention_backward(g, saved)):
                dqkv[:, :, i] = d.transpose(0, 2, 1, 3)
        parallel_rows(block, grad, dqkv, blocks=self.blocks, extras=self.saved)
        return (dqkv.reshape(grad.shape[0], T, 3 * nh * hs),)
