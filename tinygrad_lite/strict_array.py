"""A strict stand-in for CuPy, so the GPU swap can be tested on a CPU.

CuPy arrays live on the GPU and refuse to turn into NumPy arrays by accident:
`numpy.asarray(cupy_array)` raises, and the code must use the CuPy module (`xp`) for
math. `StrictArray` copies that behaviour around a NumPy array: arithmetic, indexing
and the array methods work, and this module offers the `xp.*` functions, but any
NumPy function called on it raises `TypeError`. Run the test suite with
`TINYGRAD_LITE_DEVICE=strict` and every place that leaks tensor data into NumPy fails.
"""
from __future__ import annotations

import numpy as _np

_DTYPES = {"float16", "float32", "float64", "int8", "int16", "int32", "int64",
           "uint8", "uint16", "uint32", "uint64", "bool_", "pi", "e", "inf", "nan",
           "newaxis", "ndarray", "dtype", "finfo", "iinfo", "integer", "floating"}


def _unwrap(obj):
    if isinstance(obj, StrictArray):
        return obj._a
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj


def _wrap(obj):
    if isinstance(obj, (_np.ndarray, _np.generic)):  # CuPy gives 0-d arrays, never scalars
        return StrictArray(_np.asarray(obj))
    if isinstance(obj, tuple):
        return tuple(_wrap(o) for o in obj)
    if isinstance(obj, list):
        return [_wrap(o) for o in obj]
    return obj


class StrictArray:
    """A NumPy array that, like a CuPy array, cannot be handed to NumPy."""

    __array_priority__ = 1000
    __array_ufunc__ = None  # numpy ufuncs (np.exp(a), ndarray + a) refuse it

    def __init__(self, array):
        if isinstance(array, StrictArray):
            array = array._a
        if not isinstance(array, _np.ndarray):
            array = _np.asarray(array)
        self._a = array

    def __array__(self, *args, **kwargs):
        raise TypeError("implicit conversion of a StrictArray to a NumPy array is not allowed "
                        "(as with CuPy); use tinygrad_lite.backend.to_numpy()")

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} called on a StrictArray (as it would on CuPy "
                        "data); use the backend's array module instead")

    def unwrap(self) -> _np.ndarray:
        return self._a

    # attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    T = property(lambda self: StrictArray(self._a.T))
    flags = property(lambda self: self._a.flags)

    def __len__(self):
        return len(self._a)

    def __repr__(self):
        return f"StrictArray({self._a!r})"

    def __float__(self):  # CuPy allows scalar extraction (a device->host sync)
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __bool__(self):
        return bool(self._a)

    def item(self):
        return self._a.item()

    def __getitem__(self, idx):
        return _wrap(self._a[_unwrap(idx)])

    def __setitem__(self, idx, value):
        self._a[_unwrap(idx)] = _unwrap(value)

    def __iter__(self):
        return (_wrap(x) for x in self._a)

    def get(self):  # CuPy's explicit copy to host
        return self._a.copy()


def _method(name):
    def method(self, *args, **kwargs):
        return _wrap(getattr(self._a, name)(*_unwrap(args), **_unwrap(kwargs)))
    method.__name__ = name
    return method


for _name in ("reshape", "transpose", "sum", "mean", "max", "min", "argmax", "astype",
              "copy", "fill", "var", "std", "prod", "cumsum", "ravel", "squeeze",
              "swapaxes", "argsort", "clip", "all", "any", "nonzero", "tolist"):
    setattr(StrictArray, _name, _method(_name))


def _binary(name):
    def op(self, other):
        if isinstance(other, _np.ndarray) and other.ndim > 0:  # CuPy refuses host arrays too
            raise TypeError(f"StrictArray.{name} got a NumPy array; move it to the device first")
        return _wrap(getattr(self._a, name)(_unwrap(other)))
    op.__name__ = name
    return op


for _name in ("add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv", "pow",
              "rpow", "matmul", "rmatmul", "floordiv", "mod", "lt", "le", "gt", "ge",
              "eq", "ne", "and", "or", "xor", "iadd", "isub", "imul", "itruediv", "ipow"):
    setattr(StrictArray, f"__{_name}__", _binary(f"__{_name}__"))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(StrictArray, f"__{_name}__", _method(f"__{_name}__"))
StrictArray.__hash__ = None


def add_at(target: StrictArray, indices, values) -> None:
    """The strict twin of numpy.add.at (CuPy's is cupyx.scatter_add)."""
    _np.add.at(target._a, _unwrap(indices), _unwrap(values))


def __getattr__(name):
    """Module-level `xp.exp`, `xp.matmul`, ...: NumPy's function on unwrapped data."""
    obj = getattr(_np, name)
    if name in _DTYPES or isinstance(obj, type) or not callable(obj):
        return obj

    def function(*args, **kwargs):
        return _wrap(obj(*_unwrap(args), **_unwrap(kwargs)))
    function.__name__ = name
    return function
