"""CPU speed: the knobs that make NumPy run a small model fast, and who applies them.

Importing tinygrad_lite changes nothing in the process. A script that wants the CPU
tuned asks for it, in two steps (train.py, sample.py, serve.py and bench/ do):

    import os
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # 1. before NumPy is imported
    ...
    from tinygrad_lite import cpu
    cpu.tune()                                               # 2. malloc and threads

The knobs, what each does, and what it measured (2-core Xeon, the CPU preset's step;
docs/performance.md has the tables):

1. OpenBLAS's worker spin (OPENBLAS_THREAD_TIMEOUT). After every matmul OpenBLAS's
   worker threads spin for ~2^28 cycles before they sleep, holding a core that our own
   elementwise kernels then wait for. 10 means a spin of 2^10 cycles: the 2-thread step
   went 57 -> 46 ms. OpenBLAS reads the variable once, when NumPy loads it, so it must
   be in the environment before the first `import numpy` (or of tinygrad_lite, which
   imports NumPy): that is why it is step 1, at the top of each script, and not
   something this module could do later. A value the user set wins (setdefault).
2. glibc's malloc thresholds (`keep_freed_memory`). Eager NumPy allocates a fresh array
   for almost every op; by default glibc hands blocks over ~128 KB back to the OS on
   free, so the next op's array is page-faulted in and zeroed again. Keeping freed
   memory in the heap made the 1-thread step 103 -> 68 ms, at the same peak memory.
   Opt out with TINYGRAD_LITE_MALLOC_TUNING=0.
3. Threads (`threads`, `num_threads`). How many cores this process may use, for BLAS
   and for the fast tier's elementwise kernels alike (NumPy runs a ufunc on one core,
   so `parallel_rows` splits a big one into row blocks on a small thread pool). The
   default is one per core, at most 8, or TINYGRAD_LITE_THREADS. A data-parallel shard
   (tinygrad_lite/parallel.py) runs under `threads(1)`: its process has one core, and
   the shard count is this same number. One budget decides both.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy

OPENBLAS_SPIN = "10"  # the value scripts put in OPENBLAS_THREAD_TIMEOUT (knob 1)
PARALLEL_MIN_SIZE = 1 << 19  # elements below which an elementwise kernel runs in one call (see row_blocks)
CHUNK_ELEMENTS = 1 << 16  # 256 KB of float32 per array: a few arrays' pieces fit in a core's L2

_threads: int | None = None  # this process's thread budget; None: the default
_default_threads: int | None = None  # read from the environment on first use, then kept
_malloc_tuned = False
_pool = None  # the kernels' thread pool, started on first use (never at import)
_blas_libs = None  # the BLAS libraries' thread controls, for parallel_rows


# --- knob 2: malloc -------------------------------------------------------------------------


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse instead of returning them to the OS.

    Raises the mmap and trim thresholds, so big arrays come from (and go back to) the
    process's heap. Linux/glibc only. Returns True when the settings took.
    """
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


# --- knob 3: threads ------------------------------------------------------------------------


def default_threads() -> int:
    """TINYGRAD_LITE_THREADS if set (>= 1), else one per core, at most 8."""
    value = os.environ.get("TINYGRAD_LITE_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"TINYGRAD_LITE_THREADS must be an integer >= 1, got {value!r}")
        return int(value)
    return max(1, min(os.cpu_count() or 1, 8))


def num_threads() -> int:
    """How many cores this process may use now (BLAS and the kernels' pool)."""
    global _default_threads
    if _threads is not None:
        return _threads
    if _default_threads is None:  # NOTE: once: os.cpu_count() costs ~10 us, and every kernel asks
        _default_threads = default_threads()
    return _default_threads


def _blas_libraries() -> list:
    """(get_num_threads, set_num_threads) of each BLAS library loaded (found once through
    threadpoolctl), [] without it.

    NOTE: for OpenBLAS on its own threads, the library's C functions themselves: through
    threadpoolctl's methods a switch costs ~2 us of Python, and small_matmul makes three
    per product of a decoded token.
    """
    global _blas_libs
    if _blas_libs is None:
        try:
            import threadpoolctl
            controllers = threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
        except ImportError:
            controllers = []
        _blas_libs = []
        for lib in controllers:
            calls = (lib.get_num_threads, lib.set_num_threads)
            if lib.internal_api == "openblas" and lib.threading_layer == "pthreads" and hasattr(lib, "_get_symbol"):
                raw = lib._get_symbol("openblas_get_num_threads"), lib._get_symbol("openblas_set_num_threads")
                calls = raw if None not in raw else calls
            _blas_libs.append(calls)
    return _blas_libs


@contextlib.contextmanager
def threads(n: int):
    """Inside: this process uses at most `n` cores, for BLAS and for parallel_rows. Entered
    in a few us (the BLAS libraries' own setters: _blas_libraries), so a step made of
    small products can run inside threads(1) (model/prepared_decode.py) rather than have
    small_matmul switch BLAS to one thread and back around each product."""
    global _threads
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    previous, _threads = _threads, n
    before = _set_blas_threads(n)
    try:
        yield
    finally:
        _restore_blas_threads(before)
        _threads = previous


# --- applying the knobs ---------------------------------------------------------------------


def tune(threads: int | None = None) -> dict:
    """Apply knobs 2 and 3 to this process (knob 1 is the script's first lines); returns
    settings() for logs and for the data-parallel workers, which apply the same."""
    global _malloc_tuned, _threads
    if os.environ.get("TINYGRAD_LITE_MALLOC_TUNING", "1") != "0" and not _malloc_tuned:
        _malloc_tuned = keep_freed_memory()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        _threads = threads
    return settings()


def settings() -> dict[str, Any]:
    """What is applied here: the OpenBLAS spin, malloc tuning, the thread budget."""
    return {"openblas_spin": os.environ.get("OPENBLAS_THREAD_TIMEOUT"), "malloc": _malloc_tuned,
            "threads": num_threads()}


def apply_settings(wanted: dict[str, Any]) -> None:
    """Make this process match settings() of another (a data-parallel worker, spawned fresh)."""
    global _malloc_tuned
    if wanted.get("malloc") and not _malloc_tuned:
        _malloc_tuned = keep_freed_memory()


# --- small products on one BLAS thread ------------------------------------------------------

ONE_THREAD_MACS = 1 << 21  # multiply-adds up to which a product of several rows runs on one BLAS thread


def small_matmul(a, b, out=None):
    """a (m, k) @ b (k, n) for a small product (into `out`, a contiguous (m, n) array, when
    given): with BLAS on one thread when m > 1 and n > 1 and it is at most ONE_THREAD_MACS
    multiply-adds.

    NOTE: OpenBLAS splits a product of a few columns (W x^T for 8 x 128 rows x and a
    512 x 128 W: a decoded token of 8 sequences) over its threads, and waking the other
    thread costs more than the product: 19 -> 30 us on the 2-core VM; decoding 8 sequences
    went 1.04 -> 0.74 ms a token with it on one thread. A matrix-vector product (one row
    or one column: one sequence) is left alone: OpenBLAS splits a big one usefully, as it
    does products over ONE_THREAD_MACS, which two threads win.
    """
    if not (min(a.shape[0], b.shape[-1]) > 1 and a.size * b.shape[-1] <= ONE_THREAD_MACS and isinstance(a, numpy.ndarray)
            and num_threads() > 1):
        return _product(a, b, out)
    before = _set_blas_threads(1)
    try:
        return _product(a, b, out)
    finally:
        _restore_blas_threads(before)


def _product(a, b, out=None):
    if out is None:
        return a @ b
    if isinstance(a, numpy.ndarray):
        return numpy.matmul(a, b, out=out)
    out[...] = a @ b  # (CuPy, the strict wrapper: this module leaves their array modules alone)
    return out


def _set_blas_threads(n: int) -> list[int]:
    """Put every BLAS library on n threads; returns their thread counts before."""
    libraries = _blas_libraries()
    before = [get_threads() for get_threads, _ in libraries]
    for _, set_threads in libraries:
        set_threads(n)
    return before


def _restore_blas_threads(before: list[int]) -> None:
    for (_, set_threads), n in zip(_blas_libraries(), before):
        set_threads(n)


# --- the kernels' thread pool ---------------------------------------------------------------


def row_blocks(array, min_size: int | None = None) -> list:
    """How parallel_rows splits `array`'s first axis: a list of slices (one slice for
    CuPy, for arrays under min_size elements (default PARALLEL_MIN_SIZE), or when this
    process has one thread).

    NOTE: handing a block to the other thread and waiting for it costs ~60-100 us on the
    2-core VM (its idle vCPUs halt at once, and waking one is slow), so only kernels of
    more work than that gain. Measured there, us, two blocks / one call: layer norm
    forward 512 x 128 183 / 50, 2048 x 128 299 / 272, 8192 x 128 894 / 1354; GELU
    768 x 512 637 / 355, 8192 x 128 759 / 1017; prefilling 8 x 64 tokens with the
    threshold at 2^16 / 2^19 elements: 11.4 / 10.3 ms. Attention does far more work per
    element and passes a smaller min_size (fast_attention.py).
    """
    rows = array.shape[0]
    if (not isinstance(array, numpy.ndarray) or array.size < (PARALLEL_MIN_SIZE if min_size is None else min_size)
            or rows < 2):
        return [slice(None)]  # (checked first: most arrays are small, and this runs for every kernel)
    n = num_threads()
    if n == 1:
        return [slice(None)]
    step = -(-rows // n)
    return [slice(start, start + step) for start in range(0, rows, step)]


def parallel_rows(kernel, *arrays, blocks=None, extras=None, chunked=False) -> list:
    """kernel(*row blocks of `arrays`) for each block, on the thread pool.

    The kernel writes its results into output arrays passed among `arrays` (out=), so
    each thread touches its own rows only; whatever it returns comes back as a list in
    block order. `blocks` (default: row_blocks(arrays[0])) fixes the split, and
    `extras` gives block i its own extra last argument (e.g. what an earlier call on
    the same blocks returned). `chunked=True` (for kernels that return nothing) runs
    each block in pieces of about CHUNK_ELEMENTS: a kernel of several passes then makes
    them all while its piece is still in the core's cache, instead of each pass reading
    the whole block from memory again.
    NOTE: with several threads too. Each NumPy call of a piece then hands Python's lock
    (the GIL) to the other thread and back, which was thought to cost more than the
    cache saves; measured (2-core Xeon VM, 2 threads, GELU forward of 8064 x 512, the
    prefill of 8 x 1008 tokens): whole blocks 8.2 ms, pieces 4.3 ms (one thread in
    pieces 4.5 ms); layer norm of 8064 x 128 1.49 -> 1.41 ms.
    NOTE: while the blocks run, BLAS has one thread: each block's matmuls then run on its
    own core. Two callers into a 2-thread OpenBLAS at once fight over its workers: the
    blocked attention of 2 x 4 heads x 1008 tokens took 451 ms instead of 10 ms.
    """
    global _pool
    blocks = row_blocks(arrays[0]) if blocks is None else blocks

    def run(i: int):
        views = [a[blocks[i]] for a in arrays]
        if chunked and isinstance(arrays[0], numpy.ndarray):
            rows = max(1, CHUNK_ELEMENTS // max(1, views[0][:1].size))  # rows per piece
            for start in range(0, views[0].shape[0], rows):
                kernel(*[v[start:start + rows] for v in views])
            return None
        return kernel(*views) if extras is None else kernel(*views, extras[i])
    if len(blocks) == 1:
        return [run(0)]
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor
        _pool = ThreadPoolExecutor(max(num_threads(), len(blocks)) - 1, thread_name_prefix="tinygrad_lite")
    before = _set_blas_threads(1)
    try:
        futures = [_pool.submit(run, i) for i in range(1, len(blocks))]
        first = run(0)  # the calling thread does the first block
        return [first] + [f.result() for f in futures]
    finally:
        _restore_blas_threads(before)
