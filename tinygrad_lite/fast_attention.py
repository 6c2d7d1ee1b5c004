"""Fast attention kernels: FusedAttention's math with a CPU-friendly layout.

Two kernels: for short contexts the whole (Tq, Tk) score matrix at once, stored keys
first; from BLOCKED_MIN queries on, blocked causal attention (FlashAttention's idea,
Dao et al. 2022): tiles of queries x keys, the tiles the causal mask hides entirely never
computed, the softmax's shift per row a bound known in advance (or, for large scores,
the running max), the backward recomputing each tile's probabilities from the saved
log-sum-exp. No (Tq, Tk) matrix is ever held. And a third, for decoding: one query per
sequence over a KV cache.

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


def decode_forward(q, k, v, out):
    """One query per sequence over a KV cache: q (..., 1, D), k, v (..., Tk, D) -> out.
    Inference only (nothing kept for a backward), in few calls: the scale on the query
    (D numbers, not Tk scores), the scores as matrix-vector products k q, and the
    normalisation after the product with v (D divisions, not Tk). Measured (4 layers, 4
    heads of 32, 2-core Xeon VM), us, before / after: 1 x 1000 keys 227 / 189, 8 x 64
    keys 157 / 132, 8 x 1000 keys 1534 / 1413."""
    xp = xp_of(q)
    q_scaled = q[..., 0, :, None] * q.dtype.type(1.0 / math.sqrt(q.shape[-1]))  # (..., D, 1)
    scores = xp.matmul(k, q_scaled)[..., 0]  # (..., Tk)
    scores -= scores.max(axis=-1, keepdims=True)  # softmax over the keys, unnormalised
    xp.exp(scores, out=scores)
    weighted = xp.matmul(scores[..., None, :], v)  # (..., 1, D)
    return xp.divide(weighted, scores.sum(axis=-1)[..., None, None], out=out)


# --- blocked causal attention (long contexts) ---------------------------------------------------

BLOCKED_MIN = 128  # queries from which the blocked kernel runs (below, one tile would be everything)


TILE_SCORES = 1 << 18  # scores one tile holds over all its heads, at head size 32 (1 MB)


def tile_size(heads: int, head_size: int) -> int:
    """Queries and keys per tile, for `heads` (batch x heads) score matrices side by side:
    the largest power of two from 32 to 128 whose tiles hold at most TILE_SCORES x 32 /
    head_size scores (a tile's scores and its rows of q, k, v stay in a core's L2 cache).
    Measured with the bounded kernel (2-core Xeon VM, 2 threads, the fast tier's packed
    attention, medians of 5 alternating runs, ms, tiles of 64 / 128 / 256): prefill
    1 x 1008 x 4 heads of 32 (2 heads a thread) 6.90 / 3.51 / 3.58; prefill 8 x 1008 x 4
    heads (16 a thread) 21.9 / 20.0 / 26.9; training 4 x 512 x 8 heads of 32 (16 a
    thread), forward + backward, 25.9 / 22.7 / 30.8; 8 x 256 x 6 heads of 64 (24 a thread)
    21.4 / 23.0 / 29.8."""
    budget = TILE_SCORES * 32 // (head_size * max(1, heads))
    tile = 32
    while tile < 128 and (2 * tile) ** 2 <= budget:
        tile *= 2
    return tile


def _hidden(i0: int, i1: int, j0: int, j1: int, offset: int, xp):
    """(i1-i0, j1-j0) bool: True where query i (at position i + offset) may not see key j."""
    return xp.arange(j0, j1)[None, :] > xp.arange(i0, i1)[:, None] + offset


def _diagonal_mask(masks: dict, i0: int, i1: int, j0: int, j1: int, offset: int, dtype, xp):
    """(i1-i0, j1-j0) of -inf where query i may not see key j, 0 elsewhere; kept in `masks`.
    It depends only on the tile's shape and its distance from the diagonal, so a call's
    diagonal tiles (all alike but maybe the last) build it once: 7 NumPy calls a tile fewer."""
    key = (i1 - i0, j1 - j0, i0 + offset - j0)
    mask = masks.get(key)
    if mask is None:
        mask = masks[key] = xp.where(_hidden(i0, i1, j0, j1, offset, xp), -xp.inf, 0).astype(dtype)
    return mask


SHIFT_LIMIT = 40.0  # largest row bound the bounded kernel takes: exp(-2 x 40) is still a normal float32


def row_bounds(q, k):
    """(..., Tq): for each query row, scale |q_i| max_j |k_j|, which no score of the row
    exceeds (Cauchy-Schwarz: |q . k| <= |q| |k|)."""
    xp = xp_of(q)
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[-1]))
    key_norm = xp.sqrt((k * k).sum(axis=-1).max(axis=-1))  # (...)
    return xp.sqrt((q * q).sum(axis=-1)) * (key_norm[..., None] * scale)


def blocked_forward(q, k, v, tile: int, out=None):
    """Causal attention in tiles; returns (out, saved) with saved the per-row log-sum-exp.

    Key tiles wholly after the query tile are skipped (about half the work) and only a
    tile crossing the diagonal is masked. A softmax subtracts a per-row shift from the
    scores before exp (any shift gives the same probabilities; it only keeps exp from
    overflowing). When every row's bound (`row_bounds`) is at most SHIFT_LIMIT, that
    bound is the shift: known before any tile is computed, so each tile is final at
    once (`_bounded_forward`). Otherwise the shift is the row's running max, updated
    tile by tile (`_online_forward`, FlashAttention's online softmax).
    """
    bounds = row_bounds(q, k)
    if float(bounds.max()) <= SHIFT_LIMIT:
        return _bounded_forward(q, k, v, tile, bounds, out)
    return _online_forward(q, k, v, tile, out)


def _with_column(a, value, transpose: bool = False, scale=None):
    """a (..., T, D) (times `scale`, if given) -> (..., T, D + 1) with `value` ((..., T) or
    a number) as its last column; transposed (..., D + 1, T) when asked. The extra column
    lets one matmul also add a per-row number: [a, x] @ [b, 1]^T = a b^T + x."""
    xp = xp_of(a)
    shape = a.shape[:-2] + ((a.shape[-1] + 1, a.shape[-2]) if transpose else (a.shape[-2], a.shape[-1] + 1))
    joined = xp.empty(shape, dtype=a.dtype)
    body, column = (joined[..., :-1, :], joined[..., -1, :]) if transpose else (joined[..., :-1], joined[..., -1])
    a = xp.swapaxes(a, -1, -2) if transpose else a
    if scale is None:
        body[...] = a
    else:
        xp.multiply(a, scale, out=body)
    column[...] = value
    return joined


def _bounded_forward(q, k, v, tile: int, shift, out=None):
    """The tiles with a fixed shift per row (`shift` (..., Tq), every score <= it and every
    score >= -it, so exp(s - shift) lies in [exp(-2 SHIFT_LIMIT), 1]: no overflow and no
    underflow). Then no tile waits for a later one, and each needs two matmuls and one exp:
      [q scale, -shift] @ [k, 1]^T = s - shift;  exp;  exp(s - shift) @ [v, 1] = (P v, row sum),
    the extra columns folding the subtraction and the row sum into the matmuls."""
    xp = xp_of(q)
    Tq, Tk, Dv = q.shape[-2], k.shape[-2], v.shape[-1]
    offset, scale = Tk - Tq, q.dtype.type(1.0 / math.sqrt(q.shape[-1]))  # query i sits at position i + offset
    out = xp.empty(q.shape[:-1] + (Dv,), dtype=q.dtype) if out is None else out
    lse = xp.empty(q.shape[:-1], dtype=q.dtype)
    queries = _with_column(q, -shift, scale=scale)  # (..., Tq, D + 1)
    keys_t, values = _with_column(k, 1, transpose=True), _with_column(v, 1)  # (..., D + 1, Tk), (..., Tk, Dv + 1)
    scores = xp.empty(q.shape[:-2] + (tile, tile), dtype=q.dtype)  # one tile's s - shift, reused
    masks: dict = {}
    for i0 in range(0, Tq, tile):
        i1 = min(i0 + tile, Tq)
        acc = None  # (..., bq, Dv + 1): the tiles' P v so far, and their row sums in the last column
        for j0 in range(0, min(i1 + offset, Tk), tile):  # the key tiles this query tile can see
            j1 = min(j0 + tile, Tk)
            s = scores[..., :i1 - i0, :j1 - j0]
            xp.matmul(queries[..., i0:i1, :], keys_t[..., j0:j1], out=s)  # s - shift
            if j1 - 1 > i0 + offset:  # crosses the diagonal: hide the future
                s += _diagonal_mask(masks, i0, i1, j0, j1, offset, s.dtype, xp)
            xp.exp(s, out=s)  # this tile's probabilities, unnormalised
            part = s @ values[..., j0:j1, :]
            acc = part if acc is None else xp.add(acc, part, out=acc)
        xp.divide(acc[..., :Dv], acc[..., Dv:], out=out[..., i0:i1, :])
        lse[..., i0:i1] = xp.log(acc[..., Dv]) + shift[..., i0:i1]  # log sum exp of the row's scores
    return out, ("blocked", q, k, v, out, lse, tile)


def _online_forward(q, k, v, tile: int, out=None):
    """The tiles with the running row max as the shift (for scores too large to bound).

    For each tile of queries, the key tiles it can see, left to right, with an online
    softmax: the running row max m, the running sum l of exp(s - m), and the output
    accumulated unnormalised; a new tile with a larger max rescales both by exp(m_old -
    m_new). Each tile's scores are stored keys first, (bk, ..., bq), as the whole-matrix
    kernel does: the max and sum over the keys are then elementwise passes, not short
    row reductions.
    """
    xp = xp_of(q)
    Tq, Tk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    offset, scale = Tk - Tq, q.dtype.type(1.0 / math.sqrt(D))  # query i sits at position i + offset
    lead = q.shape[:-2]
    out = xp.empty(q.shape, dtype=q.dtype) if out is None else out
    lse = xp.empty(q.shape[:-1], dtype=q.dtype)
    scores = xp.empty((tile,) + lead + (tile,), dtype=q.dtype)  # one tile's s^T, reused
    masks: dict = {}
    for i0 in range(0, Tq, tile):
        i1 = min(i0 + tile, Tq)
        q_tile_t = xp.swapaxes(q[..., i0:i1, :] * scale, -1, -2)  # (..., D, bq), the scale folded in once
        row_max = row_sum = acc = None
        for j0 in range(0, min(i1 + offset, Tk), tile):  # the key tiles this query tile can see
            j1 = min(j0 + tile, Tk)
            s = scores[:j1 - j0, ..., :i1 - i0]  # (bk, ..., bq)
            xp.matmul(k[..., j0:j1, :], q_tile_t, out=xp.moveaxis(s, 0, -2))  # s^T = k q^T
            if j1 - 1 > i0 + offset:  # crosses the diagonal: hide the future
                s += _diagonal_mask(masks, i0, i1, j0, j1, offset, s.dtype, xp).T.reshape(
                    (j1 - j0,) + (1,) * len(lead) + (i1 - i0,))
            tile_max = s.max(axis=0)  # (..., bq)
            if row_max is None:  # the first tile (key 0 is visible to every query: max is finite)
                row_max = tile_max
                s -= row_max
                xp.exp(s, out=s)
                row_sum, acc = s.sum(axis=0), xp.moveaxis(s, 0, -1) @ v[..., j0:j1, :]
            else:
                new_max = xp.maximum(row_max, tile_max)
                rescale = xp.exp(row_max - new_max)
                s -= new_max
                xp.exp(s, out=s)  # exp(s - m): this tile's unnormalised probabilities
                row_sum *= rescale
                row_sum += s.sum(axis=0)
                acc *= rescale[..., None]
                acc += xp.moveaxis(s, 0, -1) @ v[..., j0:j1, :]
                row_max = new_max
        out[..., i0:i1, :] = acc / row_sum[..., None]
        lse[..., i0:i1] = row_max + xp.log(row_sum)  # log sum exp of the row's scores
    return out, ("blocked", q, k, v, out, lse, tile)


# with P = exp(S - lse) (each tile recomputed from the saved lse), O = P v:
# dv = P^T dO;  dS = P * (dO v^T - rowsum(dO * O));  dq = dS k * scale;  dk = dS^T q * scale
def blocked_backward(grad, saved):
    """grad (..., Tq, Dv) -> dq, dk, dv. Each tile's two per-row subtractions ride in its
    matmuls as an extra column (`_with_column`): [q scale, -lse] @ [k, 1]^T = S - lse and
    [dO, -rowsum(dO * O)] @ [v, 1]^T = dP - rowsum(dO * O)."""
    _, q, k, v, out, lse, tile = saved
    xp = xp_of(grad)
    Tq, Tk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    offset, scale = Tk - Tq, q.dtype.type(1.0 / math.sqrt(D))
    dq, dk, dv = xp.zeros_like(q), xp.zeros_like(k), xp.zeros_like(v)
    queries = _with_column(q, -lse, scale=scale)  # (..., Tq, D + 1); queries[..., :D] is q scale
    grads = _with_column(grad, -xp.einsum("...d,...d->...", grad, out))  # (..., Tq, Dv + 1)
    keys_t, values_t = _with_column(k, 1, transpose=True), _with_column(v, 1, transpose=True)  # (..., D/Dv + 1, Tk)
    masks: dict = {}
    for i0 in range(0, Tq, tile):
        i1 = min(i0 + tile, Tq)
        q_tile, g_tile = queries[..., i0:i1, :], grads[..., i0:i1, :]
        for j0 in range(0, min(i1 + offset, Tk), tile):
            j1 = min(j0 + tile, Tk)
            p = q_tile @ keys_t[..., j0:j1]  # the scores again, less the saved lse ...
            if j1 - 1 > i0 + offset:
                p += _diagonal_mask(masks, i0, i1, j0, j1, offset, p.dtype, xp)
            xp.exp(p, out=p)  # ... and so their probabilities
            dv[..., j0:j1, :] += xp.swapaxes(p, -1, -2) @ grad[..., i0:i1, :]
            ds = g_tile @ values_t[..., j0:j1]  # dP - rowsum(dO * O)
            ds *= p  # dS / scale
            dq[..., i0:i1, :] += ds @ k[..., j0:j1, :]
            dk[..., j0:j1, :] += xp.swapaxes(ds, -1, -2) @ q_tile[..., :D]  # q_tile carries the scale
    dq *= scale
    return dq, dk, dv


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
