"""Tensor's math: `a + b`, `a @ b`, `a.exp()`, `a.sum()`, `a.reshape()`, `a[i]`, and
`where`, `concatenate`, `stack`. Each records one primitive op of `ops.py`.

The methods are written in the class `TensorMethods` below and attached to `Tensor`
when this module is imported (the package's `__init__` does that).
"""
from __future__ import annotations

from typing import Any

from .ops import (Add, Cast, Concatenate, Div, Exp, GetItem, Log, MatMul, Max, Mul, Neg,
                  Permute, Pow, ReLU, Reshape, Sigmoid, Sqrt, Sub, Sum, Tanh, Where)
from .tensor import Tensor


# --- functions over several tensors ---------------------------------------------------------


def concatenate(tensors: list[Tensor], axis: int = 0) -> Tensor:
    """Join tensors along an existing axis."""
    if not tensors:
        raise ValueError("concatenate needs at least one tensor")
    return Concatenate.apply(*tensors, axis=axis)


def stack(tensors: list[Tensor], axis: int = 0) -> Tensor:
    """Join tensors along a new axis: each gets a size-1 axis, then they are concatenated."""
    def expanded(t: Tensor) -> Tensor:
        at = axis if axis >= 0 else t.ndim + 1 + axis
        return t.reshape(*t.shape[:at], 1, *t.shape[at:])
    return concatenate([expanded(t) for t in tensors], axis=axis)


def where(condition, x, y) -> Tensor:
    """Elementwise `x if condition else y`; the gradient flows only to the chosen side."""
    like = x if isinstance(x, Tensor) else y
    condition = condition if isinstance(condition, Tensor) else Tensor(condition, device=like.device)
    if condition.device != like.device:
        raise RuntimeError(f"where: condition is on {condition.device}, values on {like.device}")
    return Where.apply(condition.data, _lift(x, like), _lift(y, like))


# --- Tensor's math methods -----------------------------------------------------------------
# NOTE: written here and attached to Tensor at the end of the file (as tinygrad 2020's
# `register` did), not in tensor.py: the autograd core then never imports the ops that
# are built on it, and the modules import each other one way only.


class TensorMethods:
    """The methods below become Tensor's; `self` is a Tensor."""

    # --- operators ---
    def __add__(self, other): return Add.apply(self, _lift(other, self))
    def __radd__(self, other): return Add.apply(_lift(other, self), self)
    def __sub__(self, other): return Sub.apply(self, _lift(other, self))
    def __rsub__(self, other): return Sub.apply(_lift(other, self), self)
    def __mul__(self, other): return Mul.apply(self, _lift(other, self))
    def __rmul__(self, other): return Mul.apply(_lift(other, self), self)
    def __truediv__(self, other): return Div.apply(self, _lift(other, self))
    def __rtruediv__(self, other): return Div.apply(_lift(other, self), self)
    def __pow__(self, other): return Pow.apply(self, _lift(other, self))
    def __rpow__(self, other): return Pow.apply(_lift(other, self, as_tensor=True), self)
    def __neg__(self): return Neg.apply(self)
    def __matmul__(self, other): return MatMul.apply(self, _lift(other, self, as_tensor=True))
    def __rmatmul__(self, other): return MatMul.apply(_lift(other, self, as_tensor=True), self)
    def __getitem__(self, index): return GetItem.apply(self, index=_index_data(index))

    # comparisons give plain boolean tensors (no gradient), as in PyTorch
    def __lt__(self, other): return Tensor._from_array(self.data < _data(other))
    def __le__(self, other): return Tensor._from_array(self.data <= _data(other))
    def __gt__(self, other): return Tensor._from_array(self.data > _data(other))
    def __ge__(self, other): return Tensor._from_array(self.data >= _data(other))

    # --- elementwise math ---
    def exp(self): return Exp.apply(self)
    def log(self): return Log.apply(self)
    def sqrt(self): return Sqrt.apply(self)
    def relu(self): return ReLU.apply(self)
    def tanh(self): return Tanh.apply(self)
    def sigmoid(self): return Sigmoid.apply(self)

    # --- reductions ---
    def sum(self, axis=None, keepdims: bool = False): return Sum.apply(self, axis=axis, keepdims=keepdims)
    def max(self, axis=None, keepdims: bool = False): return Max.apply(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims: bool = False) -> "Tensor":
        """sum / count: composed of primitives, so it needs no backward of its own."""
        total = self.sum(axis=axis, keepdims=keepdims)  # first: it checks the axes
        axes = range(self.ndim) if axis is None else (axis,) if isinstance(axis, int) else axis
        count = 1
        for a in axes:
            count *= self.shape[a]
        return total * (1.0 / count)

    # --- shape ---
    def reshape(self, *shape) -> "Tensor":
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return Reshape.apply(self, shape=tuple(shape))

    def permute(self, *axes) -> "Tensor":
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        return Permute.apply(self, axes=tuple(axes))

    def transpose(self, axis0: int = -2, axis1: int = -1) -> "Tensor":
        """Swap two axes (default: the last two, as for a matrix)."""
        if not (-self.ndim <= axis0 < self.ndim and -self.ndim <= axis1 < self.ndim):
            raise ValueError(f"transpose axes ({axis0}, {axis1}) are out of range for a tensor "
                             f"with {self.ndim} dimensions")
        axes = list(range(self.ndim))
        axes[axis0], axes[axis1] = axes[axis1], axes[axis0]
        return self.permute(*axes)

    @property
    def T(self) -> "Tensor":
        return self.permute(*reversed(range(self.ndim)))

    def split(self, sizes, axis: int = 0) -> list["Tensor"]:
        """Split into pieces of the given sizes (or `sizes` equal pieces) along `axis`."""
        length = self.shape[axis]
        if isinstance(sizes, int):
            if length % sizes:
                raise ValueError(f"cannot split length {length} into {sizes} equal pieces")
            sizes = [length // sizes] * sizes
        if sum(sizes) != length:
            raise ValueError(f"split sizes {list(sizes)} do not add up to length {length}")
        pieces, start = [], 0
        for size in sizes:
            index = [slice(None)] * self.ndim
            index[axis] = slice(start, start + size)
            pieces.append(self[tuple(index)])
            start += size
        return pieces

    def masked_fill(self, mask, value: float) -> "Tensor":
        """Where mask is True, put `value` (e.g. -inf before a softmax); elsewhere keep self."""
        return where(mask, value, self)

    def astype(self, dtype) -> "Tensor":
        return Cast.apply(self, dtype=dtype)

    def float(self) -> "Tensor":
        return self.astype("float32")

    def double(self) -> "Tensor":
        return self.astype("float64")


def _data(x: Any) -> Any:
    return x.data if isinstance(x, Tensor) else x


def _index_data(index: Any) -> Any:
    if isinstance(index, tuple):
        return tuple(_data(i) for i in index)
    return _data(index)


def _lift(other: Any, like: Tensor, as_tensor: bool = False) -> Any:
    """Make the other operand of a binary op usable: Python numbers stay numbers (so
    float32 stays float32), host arrays move to `like`'s device."""
    if isinstance(other, Tensor):
        return other
    if isinstance(other, (int, float)) and not as_tensor:
        return other
    return Tensor(other, dtype=like.dtype, device=like.device)


_CLASS_ATTRIBUTES = {"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__",
                     "__firstlineno__", "__static_attributes__"}  # what every class body has
for _name, _method in vars(TensorMethods).items():
    if _name not in _CLASS_ATTRIBUTES:
        setattr(Tensor, _name, _method)
