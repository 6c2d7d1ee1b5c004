"""The fast tier's attention kernels (tinygrad_lite/fast_attention.py, blocked_attention.py): blocked causal
attention against the primitive tier in float64, lengths that are not multiples of the
tile (T = 1 included), a KV cache's shorter query block, decoding sequences of different
lengths in one masked call, and its memory: at T = 512 no (B, H, T, T) array, tiles at
most 128 wide."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import tinygrad_lite.functional as F
from tinygrad_lite import Tensor, backend, blocked_attention, cpu, fast_attention

from strategies import tensor


def primitive_attention(q, k, v, grad):
    """Values and gradients of the primitive tier's attention, float64."""
    leaves = [tensor(a) for a in (q, k, v)]
    with F.ops_tier("primitive"):
        out = F.scaled_dot_product_attention(*leaves, causal=True)
    out.backward(Tensor(grad))
    return out.numpy(), [backend.to_numpy(t.grad) for t in leaves]


@pytest.mark.parametrize("Tq,Tk,tile", [(1, 1, 4), (1, 9, 4), (5, 5, 4), (7, 7, 3), (13, 13, 4), (9, 21, 4),
                                        (16, 16, 8), (17, 17, 8), (130, 130, 64)])
def test_blocked_attention_equals_the_primitive_one(Tq, Tk, tile):
    rng = np.random.default_rng(Tq * 100 + Tk)
    B, H, D = 2, 3, 5
    q, k, v = (rng.standard_normal((B, H, T, D)) for T in (Tq, Tk, Tk))
    grad = rng.standard_normal((B, H, Tq, D))
    out, saved = blocked_attention.blocked_forward(q, k, v, tile)
    grads = blocked_attention.blocked_backward(grad, saved)
    ref_out, ref_grads = primitive_attention(q, k, v, grad)
    np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-12)
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-11, err_msg=f"d{name}")


def test_decoding_sequences_of_different_lengths_in_one_masked_call_equals_each_alone():
    # decode_forward's key_bias (-inf past each sequence's length: the serving engine's
    # slab) against the primitive tier's attention of each sequence over its own keys,
    # float64; the keys and values past a length are big but finite, as old rows are
    rng = np.random.default_rng(3)
    lengths, H, D, room = [1, 7, 4, 12, 12], 3, 5, 16
    q = rng.standard_normal((len(lengths), H, 1, D))
    k, v = (1e3 * rng.standard_normal((len(lengths), H, room, D)) for _ in range(2))
    for i, n in enumerate(lengths):
        k[i, :, :n] /= 1e3
        v[i, :, :n] /= 1e3
    hidden = np.arange(room) >= np.asarray(lengths)[:, None]
    bias = np.where(hidden, -np.inf, 0.0)[:, None, :]  # (sequences, 1, keys): broadcast over the heads
    out = fast_attention.decode_forward(q, k, v, np.empty_like(q), bias)
    for i, n in enumerate(lengths):
        alone, _ = primitive_attention(q[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n], np.ones((1, H, 1, D)))
        np.testing.assert_allclose(out[i:i + 1], alone, rtol=1e-10, atol=1e-12, err_msg=str(i))


@pytest.mark.parametrize("size", [1.0, 12.0])
def test_both_shifts_of_the_blocked_forward_give_the_primitive_answer(size, monkeypatch):
    """Small scores take the bounded shift (every row's |q| max|k| scale <= SHIFT_LIMIT);
    large ones (here up to ~ +-150) the running max. Both give the same values and lse."""
    rng = np.random.default_rng(7)
    B, H, T, D, tile = 2, 3, 37, 8, 8
    q, k, v = (rng.standard_normal((B, H, T, D)) * s for s in (size, size, 1.0))
    grad = rng.standard_normal((B, H, T, D))
    bounds = blocked_attention.row_bounds(q, k)
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(D)
    assert np.all(np.abs(scores) <= bounds[..., None] * (1 + 1e-12))  # a bound of every score of the row
    used = []
    for name in ("_bounded_forward", "_online_forward"):
        real = getattr(blocked_attention, name)
        monkeypatch.setattr(blocked_attention, name, lambda *a, real=real, name=name: used.append(name) or real(*a))
    out, saved = blocked_attention.blocked_forward(q, k, v, tile)
    assert used == (["_bounded_forward"] if bounds.max() <= blocked_attention.SHIFT_LIMIT else ["_online_forward"])
    assert used == (["_bounded_forward"] if size == 1.0 else ["_online_forward"])
    ref_out, ref_grads = primitive_attention(q, k, v, grad)
    np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-12)
    causal = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    np.testing.assert_allclose(saved[5], np.log(np.exp(causal - causal.max(-1, keepdims=True)).sum(-1))
                               + causal.max(-1), rtol=1e-12)
    for name, g, r in zip("qkv", blocked_attention.blocked_backward(grad, saved), ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-11, err_msg=f"d{name}")


def test_the_bounded_shift_keeps_float32_close_to_float64():
    """In float32 the bounded shift subtracts up to 2 x SHIFT_LIMIT before exp; its error
    stays at float32's level (compared with the float64 answer, as the online shift's is)."""
    rng = np.random.default_rng(3)
    B, H, T, D = 1, 2, 300, 32
    q, k = (rng.standard_normal((B, H, T, D)) * 1.6 for _ in range(2))  # bounds near the limit
    v = rng.standard_normal((B, H, T, D))
    bounds = blocked_attention.row_bounds(q, k)
    assert 20 < bounds.max() <= blocked_attention.SHIFT_LIMIT
    exact, _ = blocked_attention.blocked_forward(q, k, v, 64)
    f32 = [a.astype(np.float32) for a in (q, k, v)]
    bounded, _ = blocked_attention._bounded_forward(*f32, 64, blocked_attention.row_bounds(*f32[:2]))
    online, _ = blocked_attention._online_forward(*f32, 64)
    assert np.abs(bounded - exact).max() < 1e-4
    assert np.abs(bounded - exact).max() < 10 * np.abs(online - exact).max() + 1e-6


T_LONG = blocked_attention.BLOCKED_MIN + 37  # not a multiple of the tile


# one call; blocks split by sequence (2 x 4 heads); blocks split by head (1 sequence, 4 heads)
@pytest.mark.parametrize("shape", [(1, 2, T_LONG, 8), (2, 4, T_LONG, 64), (1, 4, 300, 64)])
def test_the_fast_tier_runs_the_blocked_kernel_on_long_sequences_and_gets_the_same_answer(shape):
    rng = np.random.default_rng(1)
    q, k, v, grad = (rng.standard_normal(shape) for _ in range(4))
    leaves = [tensor(a) for a in (q, k, v)]
    with F.ops_tier("fast"):
        out = F.scaled_dot_product_attention(*leaves, causal=True)
    ctx = out._ctx
    assert all(saved[0] == "blocked" for saved in ctx.saved)
    if backend.default_device() == "cpu" and cpu.num_threads() > 1 and shape[1] == 4:
        if shape[0] > 1:
            assert len(ctx.blocks) == 2 and not ctx.by_heads  # the 2 sequences, one per thread
        else:
            assert len(ctx.blocks) == min(4, cpu.num_threads()) and ctx.by_heads  # 1 sequence: its heads split
    out.backward(Tensor(grad))
    ref_out, ref_grads = primitive_attention(q, k, v, grad)
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=1e-10, atol=1e-12)
    for t, r in zip(leaves, ref_grads):
        np.testing.assert_allclose(backend.to_numpy(t.grad), r, rtol=1e-9, atol=1e-11)


def test_at_512_tokens_no_array_holds_the_whole_score_matrix(monkeypatch):
    """The kernel's peak memory, forward and backward, stays below one (B, H, T, T) score
    matrix, which any array of that size would reach alone (NumPy reports its allocations
    to tracemalloc; the peak also counts the outputs, out and dq, dk, dv, and the inputs
    copied with an extra column, each (B, H, T, D) or one wider), and its tiles are at
    most 128 wide."""
    if backend.default_device() != "cpu":
        pytest.skip("measures NumPy's allocations")
    B, H, T, D = 2, 4, 512, 32
    rng = np.random.default_rng(0)
    q, k, v, grad = (rng.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(4))
    widths = []
    real_mask = blocked_attention._diagonal_mask

    def recording(masks, i0, i1, j0, j1, offset, dtype, xp):
        widths.append((i1 - i0, j1 - j0))
        return real_mask(masks, i0, i1, j0, j1, offset, dtype, xp)
    monkeypatch.setattr(blocked_attention, "_diagonal_mask", recording)
    scores_bytes = B * H * T * T * 4
    tracemalloc.start()
    try:
        out, saved = fast_attention.attention_forward(q, k, v, True, 0.0)
        _, forward_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        fast_attention.attention_backward(grad, saved)
        _, backward_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert saved[0] == "blocked"
    assert max(forward_peak, backward_peak) < scores_bytes, (forward_peak, backward_peak, scores_bytes)
    assert widths and max(max(w) for w in widths) <= 128
    tile = blocked_attention.tile_size(B * H, D)
    assert len(widths) == 2 * T // tile  # only the diagonal tiles are masked, forward and backward
