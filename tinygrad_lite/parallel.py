"""Data parallelism on CPU threads: split the batch, one shard per core, one gradient.

A training step of a small model is hundreds of small ops. Splitting *each op* over the
cores (backend.parallel_rows) pays a hand-off per op, and most ops are too small to
split well. Splitting the *batch* instead gives each core a long run of work: every
shard runs the whole forward and backward of its own sequences on its own thread, with
its own replica of the model (the same weight arrays, its own gradients). Then the
shards' gradients are added up, each weighted by its share of the batch. The result is
the gradient of the whole batch's mean loss, as one pass would give, up to float
rounding: the loss is a mean over tokens, so it splits into a weighted sum over shards.

This is PyTorch's DistributedDataParallel idea with threads in place of processes.
Threads work here because NumPy lets go of Python's global interpreter lock inside its
kernels and matmuls, so the shards really run at the same time; only the Python between
the kernels takes turns. Each shard's matmuls then run on one BLAS thread, and its
elementwise kernels in one call (backend.serial_kernels): the cores are already busy.

The split is fixed by the batch size and the shard count, so runs repeat bitwise.
Random numbers (dropout) come from one generator per shard, seeded from the main one
each step, so they do not depend on which thread runs first.
"""
from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from . import backend
from .tensor import Tensor, is_grad_enabled


def default_loss(model, x, y) -> Tensor:
    """model(x, y) -> (output, loss), as GPT does: the loss."""
    return model(x, y)[1]


def shard_bounds(batch: int, shards: int) -> list[tuple[int, int]]:
    """(start, stop) of each shard's rows: sizes differ by at most one, none empty."""
    shards = max(1, min(shards, batch))
    edges = [round(i * batch / shards) for i in range(shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


def replicate(model):
    """A copy of `model` whose parameters are new Tensors over the *same* arrays: it
    computes with the model's weights, but keeps its own gradients."""
    params = model.parameters()
    shared = {id(p.data): p.data for p in params}  # deepcopy reuses these instead of copying
    twin = copy.deepcopy(model, memo=shared)
    for p in twin.parameters():
        p.grad = None
    return twin


class DataParallel:
    """Run forward + backward of one batch as `shards` shards on as many threads.

        dp = DataParallel(model)                  # shards: backend.THREADS on the CPU
        loss = dp.forward_backward(x, y)          # x, y (B, T); adds the grads into .grad
        optimizer.step()

    `loss_fn(model, x, y)` returns the mean loss of a batch as a scalar Tensor (default:
    `model(x, y)[1]`). With one shard (one core, a GPU, a batch of one) this is the
    plain loop: `loss = loss_fn(model, x, y); (loss * scale).backward()`.
    """

    def __init__(self, model, loss_fn: Callable = default_loss, shards: int | None = None) -> None:
        params = model.parameters()
        on_cpu = bool(params) and params[0].device == "cpu"
        self.shards = shards if shards is not None else (backend.THREADS if on_cpu else 1)
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")
        self.model, self.loss_fn, self.params = model, loss_fn, params
        self.replicas: list = []  # (replica model, its parameter list), made on first use
        self.pool: ThreadPoolExecutor | None = None

    def _replicas(self, n: int) -> list:
        """n replicas, their weights and train/eval mode in step with the model."""
        while len(self.replicas) < n:
            twin = replicate(self.model)
            self.replicas.append((twin, twin.parameters()))
        for twin, twin_params in self.replicas[:n]:
            for p, q in zip(self.params, twin_params):
                q.data = p.data  # the same array (re-pointed if the model's was replaced)
            twin.train(self.model.training)
        return self.replicas[:n]

    def _run(self, jobs: list[Callable[[], Any]]) -> list:
        """Run the jobs at once, job 0 on this thread; wait for all, then re-raise the first error."""
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.shards - 1, thread_name_prefix="tinygrad_lite-shard")
        futures = [self.pool.submit(job) for job in jobs[1:]]
        results, error = [], None
        for job in [jobs[0]] + futures:
            try:
                results.append(job() if callable(job) else job.result())
            except BaseException as e:  # noqa: BLE001 - every shard must finish before we go on
                error = error or e
        if error is not None:
            raise error
        return results

    def _shard_jobs(self, x, y, fn: Callable, draws_random: bool) -> list[Callable[[], Any]]:
        bounds = shard_bounds(len(x), self.shards)
        # one seed per shard from the main generator (for dropout): not drawn in evaluation,
        # so evaluating leaves the training run's random stream alone
        seeds = (backend.generator("cpu").integers(0, 2**63, size=len(bounds)) if draws_random
                 else [0] * len(bounds))
        batch = len(x)

        def job(twin, start, stop, seed):
            def run():
                with backend.serial_kernels(), backend.use_generator(int(seed)):
                    return fn(twin, x[start:stop], y[start:stop], (stop - start) / batch)
            return run
        return [job(twin, *b, seed) for (twin, _), b, seed in zip(self._replicas(len(bounds)), bounds, seeds)]

    def forward_backward(self, x, y, scale: float = 1.0) -> float:
        """Mean loss of the batch (x, y); adds d(scale * loss)/d(parameter) into each
        parameter's .grad (so gradient accumulation works as with loss.backward())."""
        if self.shards == 1 or len(x) < 2:
            loss = self.loss_fn(self.model, x, y)
            (loss * scale).backward()
            return loss.item()
        if not is_grad_enabled():
            raise RuntimeError("forward_backward under no_grad: there is no graph to differentiate")

        def shard(twin, xs, ys, weight):
            loss = self.loss_fn(twin, xs, ys)
            (loss * (weight * scale)).backward()
            return weight * loss.item()
        with backend.blas_threads(1):
            losses = self._run(self._shard_jobs(x, y, shard, draws_random=True))
        for i, p in enumerate(self.params):  # the shards' gradients, added in a fixed order
            total = p.grad
            for _, twin_params in self.replicas[:len(losses)]:
                g, twin_params[i].grad = twin_params[i].grad, None
                if g is not None:
                    total = g if total is None else total + g  # never in place: grads may be shared
            p.grad = total
        return float(sum(losses))

    def loss(self, x, y) -> float:
        """Mean loss of the batch, forward only (evaluation; call under no_grad)."""
        if self.shards == 1 or len(x) < 2:
            return self.loss_fn(self.model, x, y).item()

        def shard(twin, xs, ys, weight):
            return weight * self.loss_fn(twin, xs, ys).item()
        with backend.blas_threads(1):
            return float(sum(self._run(self._shard_jobs(x, y, shard, draws_random=False))))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
