"""Data parallelism over worker processes (tinygrad_lite/parallel.py): the shards' summed
gradient is the whole batch's gradient, runs repeat bitwise, workers follow the model's
current weights, and their errors and deaths come back as errors."""
from __future__ import annotations

import numpy as np
import pytest

import tinygrad_lite.functional as F
from tinygrad_lite import backend, manual_seed, no_grad, optim
from tinygrad_lite.parallel import DataParallel, shard_bounds
from model.gpt import GPT, GPTConfig

TINY = dict(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=16)
on_cpu = pytest.mark.skipif(backend.default_device() != "cpu",
                            reason="worker processes share NumPy weights: CPU only")


def tiny_gpt(**overrides) -> GPT:
    manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides}))


def batch(B=5, T=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 13, (B, T))
    return x, np.roll(x, -1, axis=1)


def grads(model) -> list[np.ndarray]:
    return [backend.to_numpy(p.grad).copy() for p in model.parameters()]


def loss_that_fails_on_three_rows(model, x, y):
    """Module level, so the worker processes can load it; fails only in the shard of 3 rows."""
    if len(x) == 3:
        raise ValueError("shard exploded")
    return model(x, y)[1]


@pytest.fixture
def parallel_gpt():
    made = []

    def make(shards=2, **overrides):
        model = tiny_gpt(**overrides)
        made.append(DataParallel(model, shards=shards))
        return model, made[-1]
    yield make
    for parallel in made:
        parallel.close()


def test_shard_bounds_cover_the_batch_evenly():
    assert shard_bounds(5, 2) == [(0, 2), (2, 5)]
    assert shard_bounds(12, 2) == [(0, 6), (6, 12)]
    assert shard_bounds(2, 8) == [(0, 1), (1, 2)]  # never an empty shard
    for size, shards in [(7, 3), (64, 5), (1, 4)]:
        bounds = shard_bounds(size, shards)
        sizes = [b - a for a, b in bounds]
        assert bounds[0][0] == 0 and bounds[-1][1] == size and min(sizes) >= 1
        assert max(sizes) - min(sizes) <= 1
        assert all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))


@on_cpu
@pytest.mark.parametrize("shards,pos", [(2, "learned"), (3, "rope")])
def test_sharded_gradient_equals_the_whole_batch_gradient(parallel_gpt, shards, pos):
    x, y = batch(B=5)
    plain = tiny_gpt(pos=pos)
    _, loss = plain(x, y)
    loss.backward()
    model, parallel = parallel_gpt(shards, pos=pos)
    assert parallel.forward_backward(x, y) == pytest.approx(loss.item(), rel=1e-6)
    for a, b in zip(grads(plain), grads(model)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)
    # gradients accumulate, as with a second loss.backward()
    parallel.forward_backward(x, y, scale=0.5)
    for a, b in zip(grads(plain), grads(model)):
        np.testing.assert_allclose(b, 1.5 * a, rtol=1e-4, atol=1e-7)


def test_one_shard_is_the_plain_loop_bitwise():
    x, y = batch()
    plain = tiny_gpt()
    _, loss = plain(x, y)
    (loss * 0.5).backward()
    model = tiny_gpt()
    parallel = DataParallel(model, shards=1)
    assert parallel.forward_backward(x, y, scale=0.5) == loss.item()
    assert not parallel.workers  # no process was started
    for a, b in zip(grads(plain), grads(model)):
        np.testing.assert_array_equal(a, b)


def train_a_few_steps(make, dropout: float, steps: int = 3) -> list[np.ndarray]:
    model, parallel = make(2, dropout=dropout)
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(steps):
        parallel.forward_backward(*batch(seed=i))
        opt.step()
        opt.zero_grad()
    return [backend.to_numpy(p.data).copy() for p in model.parameters()]


@on_cpu
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_sharded_training_repeats_bitwise(parallel_gpt, dropout):
    # with dropout each shard draws from its own generator, seeded from the main one
    first, second = train_a_few_steps(parallel_gpt, dropout), train_a_few_steps(parallel_gpt, dropout)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


@on_cpu
def test_workers_compute_with_the_models_current_weights(parallel_gpt):
    model, parallel = parallel_gpt(2)
    x, y = batch()
    parallel.forward_backward(x, y)
    model.zero_grad()
    for p in model.parameters():  # replaced arrays, as loading a checkpoint does
        p.data = p.data * 0.5
    with no_grad():
        _, expected = model(x, y)
        assert parallel.loss(x, y) == pytest.approx(expected.item(), rel=1e-6)


@on_cpu
def test_sharded_evaluation_leaves_the_random_stream_alone(parallel_gpt):
    model, parallel = parallel_gpt(2)
    model.eval()
    x, y = batch()
    before = backend.rng_state()
    with no_grad():
        _, loss = model(x, y)
        assert parallel.loss(x, y) == pytest.approx(loss.item(), rel=1e-6)
    assert backend.rng_state() == before


@on_cpu
def test_a_failing_worker_raises_here_and_the_next_call_works():
    model = tiny_gpt()
    parallel = DataParallel(model, loss_fn=loss_that_fails_on_three_rows, shards=2)
    x, y = batch(B=5)  # shards of 2 rows (here) and 3 rows (in the worker)
    try:
        with pytest.raises(RuntimeError, match="in a data-parallel worker: ValueError: shard exploded"):
            parallel.forward_backward(x, y)
        model.zero_grad()
        x4, y4 = batch(B=4)
        assert np.isfinite(parallel.forward_backward(x4, y4))  # fresh workers
    finally:
        parallel.close()


@on_cpu
def test_a_dead_worker_is_reported_and_replaced(parallel_gpt):
    model, parallel = parallel_gpt(2)
    x, y = batch()
    parallel.forward_backward(x, y)
    process, _ = parallel.workers[0]
    process.kill()
    process.join()
    with pytest.raises(RuntimeError, match="died"):
        parallel.forward_backward(x, y)
    model.zero_grad()
    assert np.isfinite(parallel.forward_backward(x, y))


@on_cpu
def test_a_parameter_changing_shape_is_refused(parallel_gpt):
    model, parallel = parallel_gpt(2)
    parallel.forward_backward(*batch())
    model.wte.weight.data = model.wte.weight.data[:5]
    with pytest.raises(RuntimeError, match="changed shape or dtype"):
        parallel.forward_backward(*batch())


@on_cpu
def test_close_stops_the_workers(parallel_gpt):
    model, parallel = parallel_gpt(2)
    parallel.forward_backward(*batch())
    processes = [process for process, _ in parallel.workers]
    parallel.close()
    assert processes and not any(process.is_alive() for process in processes)
    assert not parallel.workers


def test_bad_uses_raise():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="shards must be >= 1"):
        DataParallel(model, shards=0)
    if backend.default_device() == "cpu":
        with no_grad(), pytest.raises(RuntimeError, match="under no_grad"):
            DataParallel(model, shards=2).forward_backward(*batch())
    else:  # a GPU (or its strict stand-in) runs one shard
        assert DataParallel(model).shards == 1
        with pytest.raises(ValueError, match="CPU \\(NumPy\\) only"):
            DataParallel(model, shards=2)


@on_cpu
def test_a_worker_runs_the_tier_the_main_process_runs(parallel_gpt):
    """Workers are fresh interpreters: each job carries the main process's ops tier."""
    model, parallel = parallel_gpt(shards=2)
    x, y = batch()
    for tier in ("primitive", "fused", "fast"):
        with F.ops_tier(tier):
            parallel.forward_backward(x, y)
        model.zero_grad()
        assert parallel.worker_tiers == [tier] * (parallel.shards - 1)


@on_cpu
def test_parameters_live_in_the_shared_block_and_leave_it_on_close_or_drop():
    """While the workers run, the parameters are views of the shared weights (the optimizer's
    in-place steps reach the workers with no copy); closing, or dropping the DataParallel
    without closing, gives them their own arrays back, with the same values."""
    import gc
    model = tiny_gpt()
    x, y = batch()
    parallel = DataParallel(model, shards=2)
    parallel.forward_backward(x, y)
    before = [p.numpy() for p in model.parameters()]
    assert all(not p.data.flags.owndata for p in model.parameters())  # views of the shared block
    del parallel
    gc.collect()
    after = [p.data for p in model.parameters()]
    assert all(a.flags.owndata for a in after)
    for b, a in zip(before, after):
        np.testing.assert_array_equal(b, a)
    parallel = DataParallel(model, shards=2)
    model.zero_grad()
    parallel.forward_backward(x, y)
    parallel.close()
    assert all(p.data.flags.owndata for p in model.parameters())
