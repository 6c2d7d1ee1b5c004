"""The array backend: the one module that knows which array library holds tensor data.

A Tensor's data is an array of NumPy (CPU), CuPy (CUDA GPU) or, for tests, a strict
wrapper around NumPy that behaves like CuPy by refusing silent conversion to NumPy.
All three share one API for arithmetic (`+`, `*`, `.sum()`, `xp.exp`, `xp.matmul`,
...), so the ops in `ops.py` are written once against `xp`, the array module that the
data itself belongs to (Chainer's `get_array_module` idea). What is *not* common to
the libraries - scatter-add, random numbers, copying to the host - lives here.

Pick the default device with the environment variable `TINYGRAD_LITE_DEVICE`
(`cpu`, `cuda` or `strict`), or move a tensor with `Tensor.to("cuda")`.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import numpy

from . import strict_array

try:  # CuPy is optional: guarded import, as Chainer does
    import cupy  # type: ignore
    import cupyx  # type: ignore

    cuda_available = True
except Exception:  # ImportError, or a CUDA driver problem on import
    cupy = None
    cupyx = None
    cuda_available = False

DEVICES = ("cpu", "cuda", "strict")


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse instead of returning them to the OS.

    NOTE: eager NumPy code allocates a fresh array for almost every op. By default glibc
    hands blocks over ~128 KB straight back to the OS on free (munmap), so the next op's
    array is page-faulted in again and zeroed by the kernel: on a training step of the
    CPU preset that doubled the time of every elementwise op. Raising the mmap and trim
    thresholds keeps the memory in the process's heap, where the next array reuses it.
    Peak memory stays the same (it is the high-water mark either way). Linux/glibc only;
    opt out with TINYGRAD_LITE_MALLOC_TUNING=0. Returns True when the settings took.
    """
    if os.environ.get("TINYGRAD_LITE_MALLOC_TUNING", "1") == "0":
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's maximum on 64-bit
        ok &= libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        ok &= libc.mallopt(M_TOP_PAD, 16 * 1024 * 1024)
        return bool(ok)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to tune
        return False


malloc_tuned = keep_freed_memory()


def _check_device(device: str) -> str:
    device = {"numpy": "cpu", "gpu": "cuda", "cupy": "cuda"}.get(device, device)
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    if device == "cuda" and not cuda_available:
        raise RuntimeError("device 'cuda' needs CuPy: pip install 'tinygrad_lite[gpu]' "
                           "(see README for the cupy-cudaXX wheel that matches your CUDA)")
    return device


_default_device = _check_device(os.environ.get("TINYGRAD_LITE_DEVICE", "cpu").strip().lower() or "cpu")


def default_device() -> str:
    return _default_device


def set_default_device(device: str) -> None:
    """Where new tensors are created when no device is given."""
    global _default_device
    _default_device = _check_device(device)


def namespace(device: str):
    """The array module (`xp`) for a device name."""
    if device == "cpu":
        return numpy
    if device == "strict":
        return strict_array
    return cupy if _check_device(device) == "cuda" else numpy


def device_of(array: Any) -> str:
    """The device name of an array: 'cpu', 'cuda' or 'strict'."""
    if isinstance(array, (numpy.ndarray, numpy.generic)):  # fast path: the common case
        return "cpu"
    if isinstance(array, strict_array.StrictArray):
        return "strict"
    if cupy is not None and isinstance(array, cupy.ndarray):
        return "cuda"
    raise TypeError(f"not a backend array: {type(array).__name__}")


def xp_of(array: Any):
    """The array module that `array` belongs to (NumPy, CuPy or the strict wrapper)."""
    if isinstance(array, (numpy.ndarray, numpy.generic)):
        return numpy
    return namespace(device_of(array))


def is_array(obj: Any) -> bool:
    try:
        device_of(obj)
        return True
    except TypeError:
        return False


def asarray(data: Any, device: str, dtype=None):
    """Put `data` (a host NumPy array, list, scalar, or backend array) on `device`."""
    if not isinstance(data, numpy.ndarray) and is_array(data):
        data = to_numpy(data)  # cross-device copies go through the host
    data = numpy.asarray(data, dtype=dtype)
    if device == "cpu":
        return data
    if device == "strict":
        return strict_array.StrictArray(data)
    return cupy.asarray(data)


def to_numpy(array: Any) -> numpy.ndarray:
    """A host NumPy copy of a backend array (`.get()` on CuPy)."""
    if isinstance(array, numpy.ndarray):
        return array
    if isinstance(array, strict_array.StrictArray):
        return array.unwrap().copy()
    if cupy is not None and isinstance(array, cupy.ndarray):
        return cupy.asnumpy(array)
    return numpy.asarray(array)


def scatter_add(target: Any, indices: Any, values: Any) -> None:
    """target[indices] += values, accumulating repeated indices (the embedding backward)."""
    if isinstance(target, numpy.ndarray):
        numpy.add.at(target, indices, values)
    elif isinstance(target, strict_array.StrictArray):
        strict_array.add_at(target, indices, values)
    else:
        cupyx.scatter_add(target, indices, values)


# --- random numbers: one seeded generator per device, so a run is reproducible ---

_generators: dict[str, Any] = {}


def manual_seed(seed: int) -> None:
    """Seed every device's generator (like torch.manual_seed)."""
    _generators.clear()
    _generators["cpu"] = numpy.random.default_rng(seed)
    if cuda_available:
        _generators["cuda"] = cupy.random.default_rng(seed)


def generator(device: str):
    if device == "strict":
        device = "cpu"  # the strict wrapper draws on the host, then wraps
    if device == "cpu" and getattr(_thread_state, "generator", None) is not None:
        return _thread_state.generator  # this thread's own (see use_generator)
    if device not in _generators:
        _generators[device] = (numpy.random.default_rng() if device == "cpu"
                               else cupy.random.default_rng())
    return _generators[device]


def randn(shape: tuple, device: str, dtype="float32", std: float = 1.0):
    """Normal(0, std^2) samples on `device`."""
    out = generator(device).standard_normal(shape, dtype=dtype)
    if std != 1.0:
        out *= std
    return strict_array.StrictArray(out) if device == "strict" else out


def rand(shape: tuple, device: str, dtype="float32"):
    """Uniform [0, 1) samples on `device` (dropout masks)."""
    out = generator(device).random(shape, dtype=dtype)
    return strict_array.StrictArray(out) if device == "strict" else out


@contextlib.contextmanager
def use_generator(seed: int):
    """Inside: the CPU random numbers of *this thread* come from a generator of its own,
    seeded with `seed`. Each data-parallel shard draws its dropout masks this way, so
    its numbers are the same every run, whichever shard happens to run first."""
    previous, _thread_state.generator = getattr(_thread_state, "generator", None), numpy.random.default_rng(seed)
    try:
        yield
    finally:
        _thread_state.generator = previous


def rng_state() -> dict:
    """The CPU generator's state as JSON-able data (saved in checkpoints for exact resume)."""
    return generator("cpu").bit_generator.state


def set_rng_state(state: dict) -> None:
    g = generator("cpu")
    g.bit_generator.state = state


# --- CPU threads for big elementwise kernels ---------------------------------------------
# NumPy runs each ufunc on one core, while its matmuls (BLAS) already use all of them.
# NumPy releases the GIL inside its loops, so a big elementwise kernel split into row
# blocks runs on several cores from a small thread pool (as PyTorch's CPU kernels do).

_pool = None
_thread_state = threading.local()  # per thread: serial kernels? its own random generator?
THREADS = max(1, int(os.environ.get("TINYGRAD_LITE_THREADS", "0") or 0) or min(os.cpu_count() or 1, 8))
PARALLEL_MIN_SIZE = 1 << 16  # below this many elements, threads cost more than they save
CHUNK_ELEMENTS = 1 << 16  # 256 KB of float32 per array: a few arrays' pieces fit in a core's L2


def row_blocks(array) -> list:
    """How parallel_rows splits `array`'s first axis: a list of slices (one for CuPy,
    for small arrays, with one thread, or inside serial_kernels)."""
    rows = array.shape[0]
    if (THREADS == 1 or not isinstance(array, numpy.ndarray) or array.size < PARALLEL_MIN_SIZE or rows < 2
            or getattr(_thread_state, "serial", False)):
        return [slice(None)]
    step = -(-rows // THREADS)
    return [slice(start, start + step) for start in range(0, rows, step)]


def parallel_rows(kernel, *arrays, blocks=None, extras=None, chunked=False) -> list:
    """kernel(*row blocks of `arrays`) for each block, on the thread pool.

    The kernel writes its results into output arrays passed among `arrays` (out=), so
    each thread touches its own rows only; whatever it returns comes back as a list in
    block order. `blocks` (default: row_blocks(arrays[0])) fixes the split, and
    `extras` gives block i its own extra last argument (e.g. what an earlier call on
    the same blocks returned). `chunked=True` (for kernels that return nothing), when
    the kernel runs on this thread alone, runs it in pieces of about CHUNK_ELEMENTS: a
    kernel of several passes then makes them all while its piece is still in the core's
    cache, instead of each pass reading the whole array from memory again.
    NOTE: not with several threads: every NumPy call hands Python's lock (the GIL) to
    the other thread and back, which costs more than a short piece saves.
    """
    global _pool
    blocks = row_blocks(arrays[0]) if blocks is None else blocks

    def run(i: int):
        views = [a[blocks[i]] for a in arrays]
        if chunked and len(blocks) == 1 and isinstance(arrays[0], numpy.ndarray):
            rows = max(1, CHUNK_ELEMENTS // max(1, views[0][:1].size))  # rows per piece
            for start in range(0, views[0].shape[0], rows):
                kernel(*[v[start:start + rows] for v in views])
            return None
        return kernel(*views) if extras is None else kernel(*views, extras[i])
    if len(blocks) == 1:
        return [run(0)]
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor
        _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="tinygrad_lite")
    futures = [_pool.submit(run, i) for i in range(1, len(blocks))]
    first = run(0)  # the calling thread does the first block
    return [first] + [f.result() for f in futures]


@contextlib.contextmanager
def serial_kernels():
    """Inside: parallel_rows runs each kernel in one call on the calling thread. For code
    that already has a core to itself (one shard of a data-parallel step), where handing
    blocks to the shared pool would only make the threads wait on each other."""
    previous, _thread_state.serial = getattr(_thread_state, "serial", False), True
    try:
        yield
    finally:
        _thread_state.serial = previous


_blas_controller = None


@contextlib.contextmanager
def blas_threads(n: int):
    """Inside: BLAS (NumPy's matmul) uses at most `n` threads, process-wide.

    Data-parallel shards each run their own matmuls, one process per core; a BLAS that
    also split every matmul over all cores would fight them for the cores. The switch
    goes through threadpoolctl (it knows how to find OpenBLAS, MKL and BLIS inside
    NumPy); without it this does nothing.
    """
    global _blas_controller
    try:
        if _blas_controller is None:
            import threadpoolctl
            _blas_controller = threadpoolctl.ThreadpoolController()
        limit = _blas_controller.limit(limits=n, user_api="blas")
    except ImportError:
        limit = contextlib.nullcontext()
    with limit:
        yield
