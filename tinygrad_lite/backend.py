"""The array backend: the one module that knows which array library holds tensor data.

A Tensor's data is an array of NumPy (CPU), CuPy (CUDA GPU) or, for tests, a strict
wrapper around NumPy that behaves like CuPy by refusing silent conversion to NumPy.
All three share one API for arithmetic (`+`, `*`, `.sum()`, `xp.exp`, `xp.matmul`,
...), so the ops in `ops.py` are written once against `xp`, the array module that the
data itself belongs to (Chainer's `get_array_module` idea). What is *not* common to
the libraries - scatter-add, random numbers, copying to the host - lives here.

Pick the default device with the environment variable `TINYGRAD_LITE_DEVICE`
(`cpu`, `cuda` or `strict`), or move a tensor with `Tensor.to("cuda")`.

This module does one job: which array module holds the data, the devices, and the
random numbers. How fast the CPU runs (threads, BLAS, malloc) is `cpu.py`'s business.
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


def _check_device(device: str) -> str:
    device = {"numpy": "cpu", "gpu": "cuda", "cupy": "cuda"}.get(device, device)
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    if device == "cuda" and not cuda_available:
        raise RuntimeError("device 'cuda' needs CuPy: pip install 'tinygrad_lite[gpu]' "
                           "(see README for the cupy-cudaXX wheel that matches your CUDA)")
    return device


_default_device: str | None = None  # read from TINYGRAD_LITE_DEVICE when first needed


def default_device() -> str:
    """Where new tensors go when no device is given: set_default_device's choice, else
    TINYGRAD_LITE_DEVICE (read on first use, so a bad value is an error here, not at import)."""
    global _default_device
    if _default_device is None:
        name = os.environ.get("TINYGRAD_LITE_DEVICE", "cpu").strip().lower() or "cpu"
        try:
            _default_device = _check_device(name)
        except ValueError as e:
            raise ValueError(f"TINYGRAD_LITE_DEVICE: {e}") from None
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
    if not isinstance(data, (numpy.ndarray, list, tuple)) and is_array(data):  # (lists: no exception to raise and catch)
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


# --- memory layout: row-major (C order) or column-major (Fortran order) matrices ---
# nn.Linear keeps its weight column-major (see there). An elementwise op on one array of
# each layout runs 10-20x slower than on two alike (NumPy walks one of them across its
# rows), so whatever is combined with a weight elementwise (its gradient, the optimizer's
# moments) is kept in the weight's layout: these helpers say and make it so.


def column_major(array: Any) -> bool:
    """Is `array` a matrix stored column by column (and not also row by row)?"""
    return array.ndim == 2 and array.flags.f_contiguous and not array.flags.c_contiguous


def in_layout_of(array: Any, like: Any) -> Any:
    """`array`, stored row- or column-major as `like` is (a copy only when they differ)."""
    if array.ndim != 2 or column_major(array) == column_major(like):
        return array
    xp = xp_of(array)
    return xp.asfortranarray(array) if column_major(like) else xp.ascontiguousarray(array)


def flatten(array: Any) -> Any:
    """The elements in memory order, 1-D (a view of a contiguous array of either layout)."""
    return (array.T if column_major(array) else array).reshape(-1)


def unflatten(flat: Any, like: Any) -> Any:
    """The inverse of flatten: a 1-D array as an array shaped and laid out like `like` (a view)."""
    return flat.reshape(like.shape[::-1]).T if column_major(like) else flat.reshape(like.shape)


# --- random numbers: one seeded generator per device, so a run is reproducible ---

_generators: dict[str, Any] = {}
_thread_state = threading.local()  # a thread's own CPU generator, when it has one (use_generator)


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
