"""Blocked causal attention: FlashAttention's idea (Dao et al. 2022) on a CPU.

The whole-matrix kernel (fast_attention.py) holds a (Tq, Tk) score matrix per head; at
1024 tokens that is 4 MB a head, far bigger than a core's cache, and half of it is the
masked future. Here the queries and keys go in tiles instead:
- a tile that the causal mask hides entirely is never computed (about half of them);
  only the tiles on the diagonal get a mask;
- the softmax needs one number per row subtracted before exp. When every row's bound
  scale |q_i| max_j |k_j| (Cauchy-Schwarz) is small enough, that bound is the shift, known
  before any tile (`row_bounds`, `_bounded_forward`); otherwise the running max of the
  online softmax (`_online_forward`);
- the forward keeps one log-sum-exp per query row, and the backward recomputes each tile's
  probabilities from it. No (Tq, Tk) matrix is ever held, forward or backward.

fast_attention.py runs these from BLOCKED_MIN queries on, for training and prefill alike.
"""
from __future__ import annotations

import math

from .backend import xp_of


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
