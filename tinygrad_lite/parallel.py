"""Data parallelism on the CPU's cores: split the batch, one shard per core, one gradient.

A training step of a small model is hundreds of small ops. Splitting *each op* over the
cores (cpu.parallel_rows) pays a hand-off per op, and most ops are too small to
split well. Splitting the *batch* gives each core a long run of work instead: every
shard runs the whole forward and backward of its own sequences. Then the shards'
gradients are added up, each weighted by its share of the batch. The result is the
gradient of the whole batch's mean loss, as one pass would give, up to float rounding:
the loss is a mean over tokens, so it splits into a weighted sum over shards.

This is PyTorch's DistributedDataParallel on one machine: shard 0 runs in this process,
every other shard in a worker process with its own copy of the model. The weights live
in shared memory (copied in once per step), so a worker always computes with the
current weights; each worker writes its gradients into shared memory of its own, and
this process adds them to the parameters' .grad.

NOTE: why processes and not threads? NumPy lets go of Python's global interpreter lock
(GIL) inside its kernels, so threads do run at once, but the Python between the kernels
takes turns, and every one of a step's ~1,000 kernel calls hands the lock over. On the
2-core machine a threaded step took 38 ms, processes 32 ms (docs/performance.md).

The split is fixed by the batch size and the shard count, so runs repeat bitwise.
Random numbers (dropout) come from one generator per shard, seeded from the main one
each step, so they do not depend on which process runs first.

The shard count defaults to cpu.num_threads(), this process's thread budget, and every
shard (this process's included) runs under cpu.threads(1): one core each. A worker is a
fresh interpreter, so it is handed this process's ops tier and CPU settings explicitly;
OpenBLAS's spin setting, an environment variable, it inherits.
"""
from __future__ import annotations

import multiprocessing
import signal
import traceback
import weakref
from multiprocessing import shared_memory
from typing import Any, Callable

import numpy

from . import backend, cpu, functional
from .tensor import Tensor, is_grad_enabled, no_grad


def default_loss(model, x, y) -> Tensor:
    """model(x, y) -> (output, loss), as GPT does: the loss."""
    return model(x, y)[1]


def shard_bounds(batch: int, shards: int) -> list[tuple[int, int]]:
    """(start, stop) of each shard's rows: sizes differ by at most one, none empty."""
    shards = max(1, min(shards, batch))
    edges = [round(i * batch / shards) for i in range(shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _flat_views(flat: numpy.ndarray, shapes: list[tuple]) -> list[numpy.ndarray]:
    """Consecutive pieces of a 1-D array, shaped like the parameters."""
    views, offset = [], 0
    for shape in shapes:
        size = int(numpy.prod(shape))
        views.append(flat[offset:offset + size].reshape(shape))
        offset += size
    return views


def _attach(name: str, size: int, dtype) -> tuple[shared_memory.SharedMemory, numpy.ndarray]:
    block = shared_memory.SharedMemory(name=name)
    return block, numpy.ndarray((size,), dtype=dtype, buffer=block.buf)


def _run_shard(model, loss_fn: Callable, x, y, share: float, scale: float, seed: int, train: bool) -> float:
    """One shard, `share` of the batch: returns share * its mean loss; with train=True,
    d(scale * share * loss)/d(parameter) lands in .grad."""
    with backend.use_generator(seed):
        if not train:
            with no_grad():
                return share * loss_fn(model, x, y).item()
        loss = loss_fn(model, x, y)
        (loss * (share * scale)).backward()
        return share * loss.item()


def _worker(conn, model, loss_fn: Callable, names: tuple[str, str], dtype: str, cpu_settings: dict,
            shapes: list[tuple]) -> None:
    """A worker process: waits for a shard, runs it, writes its gradients, says done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and SIGTERM (to the whole process group) are
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # for the main process: it ends the step, then stops us
    cpu.apply_settings(cpu_settings)  # the main process's CPU tuning, not the defaults
    params = model.parameters()  # (their arrays came empty: the weights are in shared memory)
    size = sum(int(numpy.prod(shape)) for shape in shapes)
    weights_block, weights = _attach(names[0], size, dtype)
    grads_block, grads = _attach(names[1], size, dtype)
    for p, view in zip(params, _flat_views(weights, shapes)):
        p.data = view  # computes with whatever the main process copied in
    grad_views = _flat_views(grads, shapes)
    with cpu.threads(1):  # this process has one core
        while True:
            try:
                job = conn.recv()
            except (EOFError, OSError):  # the main process closed the pipe, or died
                break
            if job is None:
                break
            x, y, share, scale, seed, training, train, tier = job
            try:
                functional.set_ops_tier(tier)  # the tier the main process runs now
                model.train(training)
                loss = _run_shard(model, loss_fn, x, y, share, scale, seed, train)
                has_grad = []
                for p, view in zip(params, grad_views):
                    has_grad.append(p.grad is not None)
                    if p.grad is not None:
                        view[...] = p.grad
                    p.grad = None
                conn.send(("ok", loss, has_grad, functional.get_ops_tier()))
            except Exception as e:  # noqa: BLE001 - reported to the main process, which raises
                conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
    weights_block.close()
    grads_block.close()


class DataParallel:
    """Run forward + backward of one batch as `shards` shards, one per CPU core.

        parallel = DataParallel(model)            # shards: cpu.num_threads() on the CPU
        loss = parallel.forward_backward(x, y)    # x, y (B, T); adds the grads into .grad
        optimizer.step()

    `loss_fn(model, x, y)` returns the mean loss of a batch as a scalar Tensor (default:
    `model(x, y)[1]`); it is sent to the workers, so it must be a module-level function.
    With one shard (one core, a GPU, a batch of one) this is the plain loop:
    `loss = loss_fn(model, x, y); (loss * scale).backward()`. The workers start on first
    use and stop with close() (or when this object or the process goes away).
    """

    def __init__(self, model, loss_fn: Callable = default_loss, shards: int | None = None) -> None:
        self.params = model.parameters()
        on_cpu = bool(self.params) and isinstance(self.params[0].data, numpy.ndarray)
        self.shards = shards if shards is not None else (cpu.num_threads() if on_cpu else 1)
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")
        if self.shards > 1 and not on_cpu:
            raise ValueError("data parallelism runs on the CPU (NumPy) only; on a GPU use shards=1")
        if self.shards > 1 and len({p.dtype for p in self.params}) > 1:
            raise ValueError("data parallelism needs every parameter in one dtype")
        self.model, self.loss_fn = model, loss_fn
        self.workers: list[tuple[Any, Any]] = []  # (process, pipe)
        self.worker_tiers: list[str] = []  # the ops tier each worker ran its last shard in
        self._close = None

    # --- the worker processes ---
    def _start(self) -> None:
        self._layout = [(p.shape, p.dtype) for p in self.params]
        shapes, dtype = [p.shape for p in self.params], self.params[0].dtype
        size = sum(p.size for p in self.params)
        nbytes = max(1, size * dtype.itemsize)
        blocks = [shared_memory.SharedMemory(create=True, size=nbytes) for _ in range(self.shards)]
        self._weights = numpy.ndarray((size,), dtype=dtype, buffer=blocks[0].buf)
        self._weight_views = _flat_views(self._weights, shapes)
        self._grad_views = [_flat_views(numpy.ndarray((size,), dtype=dtype, buffer=b.buf), shapes)
                            for b in blocks[1:]]
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or locks
        arrays = [p.data for p in self.params]
        try:  # NOTE: the model goes to the workers without its weights (they read them from shared
            for p in self.params:  # memory): pickling them too would hold a second copy in each worker
                p.data = numpy.empty(0, dtype=dtype)
            for block in blocks[1:]:
                mine, theirs = context.Pipe()
                process = context.Process(target=_worker, daemon=True, name="tinygrad_lite-shard",
                                          args=(theirs, self.model, self.loss_fn, (blocks[0].name, block.name),
                                                dtype.str, cpu.settings(), shapes))
                process.start()  # (spawn pickles the arguments here)
                theirs.close()
                self.workers.append((process, mine))
        finally:
            for p, array in zip(self.params, arrays):
                p.data = array
        # NOTE: also when this object is dropped without close(): the parameters must leave the
        # shared block before it is unmapped, or touching them would crash the process
        self._close = weakref.finalize(self, _shut_down, self.workers, blocks, self.params,
                                       [self._weights, self._weight_views, self._grad_views])

    def _share_weights(self) -> None:
        """Make each parameter's array a view of the shared weights block, which the workers
        read. Once a parameter is a view, the optimizer's in-place updates reach the workers
        with no copy; a parameter given a new array (load_state_dict) is copied in again."""
        for p, view in zip(self.params, self._weight_views):
            if p.data is not view:
                view[...] = p.data
                p.data = view

    def close(self) -> None:
        """Stop the worker processes and free the shared memory (the parameters get arrays
        of their own back)."""
        if self._close is not None:
            self._weights = self._weight_views = self._grad_views = None  # (views of the blocks)
            self._close()
            self._close, self.workers = None, []

    def _run(self, x, y, scale: float, train: bool) -> float:
        if self.shards == 1 or len(x) < 2:  # the plain loop
            loss = self.loss_fn(self.model, x, y)
            if train:
                (loss * scale).backward()
            return loss.item()
        if train and not is_grad_enabled():
            raise RuntimeError("forward_backward under no_grad: there is no graph to differentiate")
        if not self.workers:
            self._start()
        if [(p.shape, p.dtype) for p in self.params] != self._layout:
            raise RuntimeError("the model's parameters changed shape or dtype after DataParallel "
                               "started its workers; make a new DataParallel")
        self._share_weights()
        bounds = shard_bounds(len(x), self.shards)
        # one seed per shard from the main generator (for dropout); evaluation draws none,
        # so it leaves the training run's random stream alone
        seeds = (backend.generator("cpu").integers(0, 2**63, size=len(bounds)).tolist() if train
                 else [0] * len(bounds))
        shares = [(stop - start) / len(x) for start, stop in bounds]
        busy, sent = self.workers[:len(bounds) - 1], []
        for (_, pipe), (start, stop), share, seed in zip(busy, bounds[1:], shares[1:], seeds[1:]):
            try:
                pipe.send((x[start:stop], y[start:stop], share, scale, seed, self.model.training, train,
                           functional.get_ops_tier()))
                sent.append(True)
            except OSError:  # a broken pipe: the worker is gone
                sent.append(False)
        error, losses = None, []
        try:  # shard 0 here, on one core: the workers have the others
            with cpu.threads(1):
                start, stop = bounds[0]
                losses.append(_run_shard(self.model, self.loss_fn, x[start:stop], y[start:stop],
                                         shares[0], scale, seeds[0], train))
        except BaseException as e:  # noqa: BLE001 - the workers' answers must still be read
            error = e
        replies = []
        for (process, pipe), was_sent in zip(busy, sent):
            try:
                if not was_sent:
                    raise EOFError
                replies.append(pipe.recv())
            except (EOFError, OSError):
                process.join(timeout=1)
                replies.append(("error", f"data-parallel worker {process.name} (pid {process.pid}) died "
                                f"(exit code {process.exitcode}; a script that starts workers needs its "
                                "top-level code under `if __name__ == '__main__':`)", ""))
        if error is not None:
            raise error
        for reply in replies:
            if reply[0] == "error":
                self.close()  # the workers' state is unknown: start afresh next time
                raise RuntimeError(f"in a data-parallel worker: {reply[1]}\n{reply[2]}".rstrip())
        self.worker_tiers = [reply[3] for reply in replies]
        if train:  # the workers' gradients, added in a fixed order (never in place: grads may be shared)
            for reply, views in zip(replies, self._grad_views):
                for p, has_grad, view in zip(self.params, reply[2], views):
                    if has_grad:
                        p.grad = view.copy() if p.grad is None else p.grad + view
        return float(sum(losses) + sum(reply[1] for reply in replies))

    def forward_backward(self, x, y, scale: float = 1.0) -> float:
        """Mean loss of the batch (x, y); adds d(scale * loss)/d(parameter) into each
        parameter's .grad (so gradient accumulation works as with loss.backward())."""
        return self._run(x, y, scale, train=True)

    def loss(self, x, y) -> float:
        """Mean loss of the batch, forward only (evaluation)."""
        return self._run(x, y, 1.0, train=False)


def _shut_down(workers: list, blocks: list, params: list, shared: list) -> None:
    """Stop the workers; give the parameters their own copies; unmap the shared blocks."""
    _, weight_views, _ = shared
    for p, view in zip(params, weight_views):
        if p.data is view:
            p.data = view.copy()
    shared.clear()  # the last references to the blocks' memory: they can be unmapped now
    for _, pipe in workers:
        try:
            pipe.send(None)
            pipe.close()
        except OSError:
            pass
    for process, _ in workers:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
    for block in blocks:
        block.close()
        block.unlink()
