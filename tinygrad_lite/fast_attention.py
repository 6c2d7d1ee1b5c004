"""Fast attention kernels: FusedAttention's math with a CPU-friendly layout.

Three kernels: for short contexts the whole (Tq, Tk) score matrix at once, stored keys
first (here); from BLOCKED_MIN queries on, blocked causal attention, which never holds
that matrix (blocked_attention.py); and for decoding, one query per sequence over a KV
cache (here).

Two entry points share the kernels:
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
from .blocked_attention import BLOCKED_MIN, blocked_backward, blocked_forward, tile_size
from .cpu import num_threads, parallel_rows, row_blocks
from .ops import causal_mask
from .tensor import Function


def attention_forward(q, k, v, causal: bool, dropout_p: float, out=None):
    """q (..., Tq, D), k, v (..., Tk, D) -> (out (..., Tq, D), saved for backward); with
    out=, the result is written there (a view of the packed output: no second copy kept)."""
    if causal and dropout_p == 0 and q.shape[-2] >= BLOCKED_MIN:
        heads = q.size // (q.shape[-2] * q.shape[-1])  # batch x heads
        return blocked_forward(q, k, v, tile_size(heads, q.shape[-1]), out)
    return whole_forward(q, k, v, causal, dropout_p, out)


def attention_backward(grad, saved):
    """grad (..., Tq, D) -> dq, dk, dv, by the kernel that ran the forward."""
    return blocked_backward(grad, saved) if saved[0] == "blocked" else whole_backward(grad, saved)


# --- the whole score matrix, keys first (short contexts) ---------------------------------------


def whole_forward(q, k, v, causal: bool, dropout_p: float, out=None):
    """The (Tq, Tk) scores at once.

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
    out = xp.matmul(probs if mask is None else probs * mask, v, out=out)  # (..., Tq, D)
    return out, ("whole", q, k, v, probs_keys_first, mask, scale)


# with P = softmax(S), S = q k^T * scale, O = P v:
# dv = P^T dO;  dP = dO v^T;  dS = P * (dP - sum(dP * P));  dq = dS k * scale;  dk = dS^T q * scale
def whole_backward(grad, saved):
    """grad (..., Tq, D) -> dq, dk, dv. Works on the keys-first layout (Tk, ..., Tq)."""
    _, q, k, v, probs_keys_first, mask, scale = saved
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


def decode_forward(q, k, v, out, key_bias=None):
    """One query per sequence over a KV cache: q (..., 1, D), k, v (..., Tk, D) -> out.
    Inference only (nothing kept for a backward), in few calls: the scale on the query
    (D numbers, not Tk scores), the scores as matrix-vector products k q, and the
    normalisation after the product with v (D divisions, not Tk). Measured (4 layers, 4
    heads of 32, 2-core Xeon VM), us, before / after: 1 x 1000 keys 227 / 189, 8 x 64
    keys 157 / 132, 8 x 1000 keys 1534 / 1413.
    key_bias (..., Tk), broadcast over the heads, is added to the scores: -inf hides a key
    (sequences of different lengths in one call: the serving engine's slab)."""
    xp = xp_of(q)
    q_scaled = q[..., 0, :, None] * q.dtype.type(1.0 / math.sqrt(q.shape[-1]))  # (..., D, 1)
    scores = xp.matmul(k, q_scaled)[..., 0]  # (..., Tk)
    if key_bias is not None:
        scores += key_bias
    scores -= scores.max(axis=-1, keepdims=True)  # softmax over the keys, unnormalised
    xp.exp(scores, out=scores)
    weighted = xp.matmul(scores[..., None, :], v)  # (..., 1, D)
    return xp.divide(weighted, scores.sum(axis=-1)[..., None, None], out=out)


SPLIT_MIN_SIZE = 1 << 16  # query elements from which attention runs in blocks on the cores
# (each query costs a whole row of scores: far more work per element than the elementwise
# kernels, whose threshold is cpu.PARALLEL_MIN_SIZE)


class FastMultiCoreAttention(Function):
    """Attention of (B, H, T, D) views run in blocks on all CPU cores: sequences and heads
    are independent, so without dropout the batch, or with fewer sequences than cores the
    heads, are split into blocks (cpu.parallel_rows). The subclasses say how their inputs
    and outputs become such views."""

    def _attend(self, q, k, v, out, causal: bool, dropout_p: float, decoding: bool) -> None:
        B, H = q.shape[0], q.shape[1]
        if decoding and q.size < SPLIT_MIN_SIZE:  # a decoded token's few queries: one call, no pool
            self.blocks, self.saved = None, None
            decode_forward(q, k, v, out)
            return

        def block(q, k, v, out):
            q, k, v, out = self._unsplit(q, k, v, out)
            if decoding:  # one query over a KV cache: no backward will come
                decode_forward(q, k, v, out)
                return None
            _, saved = attention_forward(q, k, v, causal, dropout_p, out=out)
            return saved
        # NOTE: dropout draws random numbers, which must come in one order to be reproducible
        self.by_heads = dropout_p == 0 and B < num_threads() and H > B
        arrays = self._split(q, k, v, out)
        self.blocks = row_blocks(arrays[0], SPLIT_MIN_SIZE) if dropout_p == 0 else [slice(None)]
        self.saved = parallel_rows(block, *arrays, blocks=self.blocks)

    def _attend_backward(self, grad, dq, dk, dv) -> None:
        def block(grad, dq, dk, dv, saved):
            grad, dq, dk, dv = self._unsplit(grad, dq, dk, dv)
            for target, d in zip((dq, dk, dv), attention_backward(grad, saved)):
                target[...] = d
        parallel_rows(block, *self._split(grad, dq, dk, dv), blocks=self.blocks, extras=self.saved)

    # the blocks split axis 0 of (B, H, T, D) views: the batch, or (swapped) the heads
    def _split(self, *arrays):
        return [a.swapaxes(0, 1) for a in arrays] if self.by_heads else arrays

    _unsplit = _split  # swapping back is the same swap


class FastAttention(FastMultiCoreAttention):
    """FusedAttention's op on the keys-first layout. q (B, H, Tq, D), k, v (B, H, Tk, D)."""

    def forward(self, q, k, v, causal=True, dropout_p=0.0):
        xp = xp_of(q)
        # NOTE: laid out in memory as q is: q is most often a (B, H, T, D) view of heads
        # side by side, (B, T, H, D), and then so is the output, which the caller merges
        # back into (B, T, H * D) without a copy
        out = xp.empty_like(q)
        decoding = q.shape[-2] == 1 and dropout_p == 0 and not any(self.needs_grad)  # one query, inference
        if q.ndim != 4 or k.shape[:2] != q.shape[:2]:  # not (B, H, T, D) throughout: one call
            self.blocks = None
            if decoding:
                return decode_forward(q, k, v, out)
            out, self.saved = attention_forward(q, k, v, causal, dropout_p, out=out)
            return out
        self._attend(q, k, v, out, causal, dropout_p, decoding)
        self.shapes = q.shape, k.shape, v.shape
        return out

    def backward(self, grad):
        if self.blocks is None:
            return attention_backward(grad, self.saved)
        xp = xp_of(grad)
        dq, dk, dv = (xp.empty(shape, dtype=grad.dtype) for shape in self.shapes)
        self._attend_backward(grad, dq, dk, dv)
        return dq, dk, dv


class FastPackedAttention(FastMultiCoreAttention):
    """Causal multi-head attention straight from packed qkv (B, T, 3C) to y (B, T, C).

    Splitting into heads and merging them back are views, and the heads run on all cores
    (FastMultiCoreAttention). With `kv=(keys, values)` (B, nh, Tk, hs), read from a KV cache that
    already holds this step's keys and values (the cache writes them: model/kv_cache.py),
    the queries attend to those instead: the decode path, in one op. That is inference
    only: it has no backward.
    """

    def forward(self, qkv, n_head, dropout_p=0.0, kv=None):
        B, T, C3 = qkv.shape
        head_size = C3 // (3 * n_head)
        out = xp_of(qkv).empty((B, T, C3 // 3), dtype=qkv.dtype)
        heads = qkv.reshape(B, T, 3, n_head, head_size)  # a view
        q, k, v = (heads[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, nh, T, hs) views
        k, v = kv if kv is not None else (k, v)  # from the cache: every position so far, this step's included
        heads_out = out.reshape(B, T, n_head, head_size).transpose(0, 2, 1, 3)  # (B, nh, T, hs) view
        self._attend(q, k, v, heads_out, True, dropout_p, decoding=kv is not None and T == 1)
        self.shape, self.cached = (T, n_head, head_size), kv is not None
        return out

    # the same backward; only the head split/merge is undone by views
    def backward(self, grad):
        if self.cached:
            raise RuntimeError("no backward through KV-cached attention: the cache is for "
                               "generation, which runs under no_grad")
        T, n_head, head_size = self.shape
        B = grad.shape[0]
        dqkv = xp_of(grad).empty((B, T, 3, n_head, head_size), dtype=grad.dtype)
        g = grad.reshape(B, T, n_head, head_size).transpose(0, 2, 1, 3)  # (B, nh, T, hs) view
        dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, nh, T, hs) views
        self._attend_backward(g, dq, dk, dv)
        return (dqkv.reshape(B, T, 3 * n_head * head_size),)
