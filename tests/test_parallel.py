"""Data parallelism on threads (tinygrad_lite/parallel.py): the shards' summed gradient is
the whole batch's gradient, runs repeat bitwise, errors come back, weights are shared."""
from __future__ import annotations

import numpy as np
import pytest

from tinygrad_lite import backend, manual_seed, no_grad, optim
from tinygrad_lite.parallel import DataParallel, replicate, shard_bounds
from model.gpt import GPT, GPTConfig

TINY = dict(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=16)


def tiny_gpt(**overrides) -> GPT:
    manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides}))


def batch(B=5, T=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 13, (B, T))
    return x, np.roll(x, -1, axis=1)


def grads(model) -> list[np.ndarray]:
    return [backend.to_numpy(p.grad).copy() for p in model.parameters()]


def test_shard_bounds_cover_the_batch_evenly():
    assert shard_bounds(5, 2) == [(0, 2), (2, 5)]
    assert shard_bounds(12, 2) == [(0, 6), (6, 12)]
    assert shard_bounds(2, 8) == [(0, 1), (1, 2)]  # never an empty shard
    for batch, shards in [(7, 3), (64, 5), (1, 4)]:
        bounds = shard_bounds(batch, shards)
        sizes = [b - a for a, b in bounds]
        assert bounds[0][0] == 0 and bounds[-1][1] == batch and min(sizes) >= 1
        assert max(sizes) - min(sizes) <= 1
        assert all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))


@pytest.mark.parametrize("shards", [2, 3, 5])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_sharded_gradient_equals_the_whole_batch_gradient(shards, pos):
    x, y = batch(B=5)
    plain = tiny_gpt(pos=pos)
    _, loss = plain(x, y)
    loss.backward()
    sharded = tiny_gpt(pos=pos)
    value = DataParallel(sharded, shards=shards).forward_backward(x, y)
    assert value == pytest.approx(loss.item(), rel=1e-6)
    for a, b in zip(grads(plain), grads(sharded)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)


def test_one_shard_is_the_plain_loop_bitwise():
    x, y = batch()
    plain = tiny_gpt()
    _, loss = plain(x, y)
    (loss * 0.5).backward()
    model = tiny_gpt()
    value = DataParallel(model, shards=1).forward_backward(x, y, scale=0.5)
    assert value == loss.item()
    for a, b in zip(grads(plain), grads(model)):
        np.testing.assert_array_equal(a, b)


def test_gradients_accumulate_like_backward():
    x, y = batch()
    model = tiny_gpt()
    parallel = DataParallel(model, shards=2)
    parallel.forward_backward(x, y, scale=0.5)
    once = grads(model)
    parallel.forward_backward(x, y, scale=0.5)
    for a, b in zip(once, grads(model)):
        np.testing.assert_allclose(b, 2 * a, rtol=1e-5, atol=1e-9)


def train_a_few_steps(dropout: float, steps: int = 3) -> list[np.ndarray]:
    model = tiny_gpt(dropout=dropout)
    parallel = DataParallel(model, shards=2)
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(steps):
        parallel.forward_backward(*batch(seed=i))
        opt.step()
        opt.zero_grad()
    return [backend.to_numpy(p.data).copy() for p in model.parameters()]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_sharded_training_repeats_bitwise(dropout):
    # with dropout each shard draws from its own generator, seeded from the main one:
    # the numbers do not depend on which thread runs first
    first, second = train_a_few_steps(dropout), train_a_few_steps(dropout)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_replicas_compute_with_the_models_current_weights():
    model = tiny_gpt()
    twin = replicate(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert q is not p and q.data is p.data  # own tensors (own grads), shared arrays
    parallel = DataParallel(model, shards=2)
    x, y = batch()
    parallel.forward_backward(x, y)
    model.zero_grad()
    # the model's weights replaced (as loading a checkpoint does): the shards follow
    for p in model.parameters():
        p.data = p.data * 0.5
    _, expected = model(x, y)
    with no_grad():
        assert parallel.loss(x, y) == pytest.approx(expected.item(), rel=1e-6)


def test_sharded_evaluation_matches_and_leaves_the_random_stream_alone():
    model = tiny_gpt()
    model.eval()
    x, y = batch()
    parallel = DataParallel(model, shards=2)
    before = backend.rng_state()
    with no_grad():
        _, loss = model(x, y)
        assert parallel.loss(x, y) == pytest.approx(loss.item(), rel=1e-6)
    assert backend.rng_state() == before


def test_a_failing_shard_raises_and_the_next_call_works():
    model = tiny_gpt()
    calls = []

    def loss_fn(m, xs, ys):
        calls.append(len(xs))
        if len(calls) == 2:
            raise ValueError("shard exploded")
        return m(xs, ys)[1]
    parallel = DataParallel(model, loss_fn=loss_fn, shards=2)
    x, y = batch()
    with pytest.raises(ValueError, match="shard exploded"):
        parallel.forward_backward(x, y)
    model.zero_grad()
    assert np.isfinite(parallel.forward_backward(x, y))
    parallel.close()


def test_bad_uses_raise():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="shards must be >= 1"):
        DataParallel(model, shards=0)
    with no_grad(), pytest.raises(RuntimeError, match="under no_grad"):
        DataParallel(model, shards=2).forward_backward(*batch())


def test_serial_kernels_and_thread_generators_are_per_thread():
    big = np.zeros((4, 1 << 16), dtype=np.float32)
    with backend.serial_kernels():
        assert backend.row_blocks(big) == [slice(None)]
    with backend.use_generator(7):
        a = backend.rand((3,), "cpu")
    with backend.use_generator(7):
        b = backend.rand((3,), "cpu")
    np.testing.assert_array_equal(a, b)


def test_blas_threads_limits_and_restores():
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads() -> list[int]:  # NumPy's BLAS (other libraries loaded later, e.g. torch's, aside)
        return [lib["num_threads"] for lib in threadpoolctl.threadpool_info()
                if lib["user_api"] == "blas" and "numpy" in lib["filepath"]]
    before = blas_threads()
    if not before:
        pytest.skip("no BLAS library found by threadpoolctl")
    with backend.blas_threads(1):
        assert blas_threads() == [1] * len(before)
    assert blas_threads() == before
