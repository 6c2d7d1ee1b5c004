"""Primitive ops: each one's forward and backward side by side.

Every backward receives `grad` = dLoss/dOutput and returns dLoss/dInput for each
input, by the chain rule: dL/dx = dL/dy * dy/dx. The local derivative dy/dx is in
the comment above each backward.

Binary ops broadcast like NumPy, so an input of shape (3, 1) may be used as (3, 4);
its gradient is then summed back to (3, 1) by `unbroadcast`.

`methods.py` then gives Tensor its math methods (`a + b`, `a.exp()`, `a.sum()`,
`a.reshape()`, `a[i]`), each of which records one of these ops.
"""
from __future__ import annotations

from typing import Any

from . import backend
from .backend import xp_of, scatter_add
from .tensor import Function


def broadcast_shape(a: tuple, b: tuple) -> tuple:
    """The shape NumPy broadcasting gives two shapes, or a ValueError naming both."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x != y and x != 1 and y != 1:
            raise ValueError(f"shapes {tuple(a)} and {tuple(b)} cannot be broadcast together")
        out.append(max(x, y) if x != 1 and y != 1 else x * y)
    return tuple(reversed(out))


def unbroadcast(grad: Any, shape: tuple) -> Any:
    """Sum `grad` back down to `shape`, undoing NumPy broadcasting.

    Broadcasting copies an input along new leading axes and along its size-1 axes;
    the gradient of a copy is the sum of the copies' gradients.
    """
    if tuple(grad.shape) == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad


def _shape(x: Any) -> tuple:
    return tuple(getattr(x, "shape", ()))


class BinaryOp(Function):
    """Shared bookkeeping for broadcasting binary ops: remember input shapes."""

    def check(self, a: Any, b: Any) -> None:
        self.a_shape, self.b_shape = _shape(a), _shape(b)
        broadcast_shape(self.a_shape, self.b_shape)


# --- arithmetic ---------------------------------------------------------------------------


class Add(BinaryOp):
    def forward(self, a, b):
        self.check(a, b)
        return a + b

    # d/da (a + b) = 1, d/db = 1
    def backward(self, grad):
        return unbroadcast(grad, self.a_shape), unbroadcast(grad, self.b_shape)


class Sub(BinaryOp):
    def forward(self, a, b):
        self.check(a, b)
        return a - b

    # d/da (a - b) = 1, d/db = -1
    def backward(self, grad):
        return (unbroadcast(grad, self.a_shape),
                unbroadcast(-grad, self.b_shape) if self.needs_grad[1] else None)


class Mul(BinaryOp):
    def forward(self, a, b):
        self.check(a, b)
        self.a, self.b = a, b
        return a * b

    # d/da (a * b) = b, d/db = a
    def backward(self, grad):
        return (unbroadcast(grad * self.b, self.a_shape) if self.needs_grad[0] else None,
                unbroadcast(grad * self.a, self.b_shape) if self.needs_grad[1] else None)


class Div(BinaryOp):
    def forward(self, a, b):
        self.check(a, b)
        self.a, self.b = a, b
        return a / b

    # d/da (a / b) = 1/b, d/db = -a/b^2
    def backward(self, grad):
        grad_over_b = grad / self.b
        return (unbroadcast(grad_over_b, self.a_shape) if self.needs_grad[0] else None,
                unbroadcast(-grad_over_b * self.a / self.b, self.b_shape) if self.needs_grad[1] else None)


class Neg(Function):
    def forward(self, a):
        return -a

    # d/da (-a) = -1
    def backward(self, grad):
        return (-grad,)


class Pow(BinaryOp):
    def forward(self, a, b):
        self.check(a, b)
        self.a, self.b = a, b
        self.out = a ** b
        return self.out

    # d/da a^b = b a^(b-1);  d/db a^b = a^b ln(a)  (needs a > 0)
    def backward(self, grad):
        grad_a = grad_b = None
        if self.needs_grad[0]:
            grad_a = unbroadcast(grad * self.b * self.a ** (self.b - 1), self.a_shape)
        if self.needs_grad[1]:
            grad_b = unbroadcast(grad * self.out * xp_of(self.out).log(self.a), self.b_shape)
        return grad_a, grad_b


class MatMul(Function):
    def forward(self, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(f"matmul needs 2-D or batched operands, got shapes {tuple(a.shape)} "
                             f"and {tuple(b.shape)}")
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(f"matmul shape mismatch: {tuple(a.shape)} @ {tuple(b.shape)} "
                             f"(inner sizes {a.shape[-1]} != {b.shape[-2]})")
        try:
            broadcast_shape(a.shape[:-2], b.shape[:-2])
        except ValueError:
            raise ValueError(f"matmul batch dims do not broadcast: {tuple(a.shape)} @ {tuple(b.shape)}") from None
        self.a, self.b = a, b
        return a @ b

    # d/dA (A @ B) = grad @ B^T,  d/dB = A^T @ grad  (summed over broadcast batch dims)
    def backward(self, grad):
        xp = xp_of(grad)
        grad_a = grad_b = None
        if self.needs_grad[0]:
            grad_a = unbroadcast(grad @ xp.swapaxes(self.b, -1, -2), tuple(self.a.shape))
        if self.needs_grad[1]:
            grad_b = unbroadcast(xp.swapaxes(self.a, -1, -2) @ grad, tuple(self.b.shape))
        return grad_a, grad_b


# --- elementwise functions -------------------------------------------------------------


class Exp(Function):
    def forward(self, a):
        self.out = xp_of(a).exp(a)
        return self.out

    # d/da e^a = e^a
    def backward(self, grad):
        return (grad * self.out,)


class Log(Function):
    def forward(self, a):
        self.a = a
        return xp_of(a).log(a)

    # d/da ln a = 1/a
    def backward(self, grad):
        return (grad / self.a,)


class Sqrt(Function):
    def forward(self, a):
        self.out = xp_of(a).sqrt(a)
        return self.out

    # d/da sqrt(a) = 1 / (2 sqrt(a))
    def backward(self, grad):
        return (grad / (2 * self.out),)


class ReLU(Function):
    def forward(self, a):
        self.positive = a > 0
        return a * self.positive

    # d/da max(a, 0) = 1 where a > 0, else 0
    def backward(self, grad):
        return (grad * self.positive,)


class Tanh(Function):
    def forward(self, a):
        self.out = xp_of(a).tanh(a)
        return self.out

    # d/da tanh a = 1 - tanh^2 a
    def backward(self, grad):
        return (grad * (1 - self.out * self.out),)


class Sigmoid(Function):
    def forward(self, a):
        xp = xp_of(a)
        # NOTE: written through tanh so exp never overflows: s(a) = (1 + tanh(a/2)) / 2
        self.out = 0.5 * (1 + xp.tanh(0.5 * a))
        return self.out

    # d/da s(a) = s (1 - s)
    def backward(self, grad):
        return (grad * self.out * (1 - self.out),)


class Cast(Function):
    def forward(self, a, dtype):
        self.dtype = a.dtype
        return a.astype(dtype)

    # a cast is the identity on values: the gradient is cast back
    def backward(self, grad):
        return (grad.astype(self.dtype),)


class Where(Function):
    def forward(self, condition, a, b):
        self.condition = condition
        self.a_shape, self.b_shape = _shape(a), _shape(b)
        broadcast_shape(broadcast_shape(_shape(condition), self.a_shape), self.b_shape)
        return xp_of(condition).where(condition, a, b)

    # d/da where(c, a, b) = c, d/db = not c
    def backward(self, grad):
        zero = grad.dtype.type(0)
        xp = xp_of(grad)
        return (None,
                unbroadcast(xp.where(self.condition, grad, zero), self.a_shape) if self.needs_grad[1] else None,
                unbroadcast(xp.where(self.condition, zero, grad), self.b_shape) if self.needs_grad[2] else None)


# --- reductions ------------------------------------------------------------------------


def _normalize_axes(axis: Any, ndim: int) -> tuple:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
        if not -ndim <= a < max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
    return tuple(sorted(a % ndim for a in axes)) if ndim else ()


def _keep_dims(grad: Any, in_shape: tuple, axes: tuple) -> Any:
    """Reshape a reduced gradient so it broadcasts against the input again."""
    return grad.reshape(tuple(1 if i in axes else n for i, n in enumerate(in_shape)))


class Sum(Function):
    def forward(self, a, axis=None, keepdims=False):
        self.in_shape, self.axes = tuple(a.shape), _normalize_axes(axis, a.ndim)
        return a.sum(axis=self.axes, keepdims=keepdims)

    # d/da_i sum(a) = 1: every summed element gets the output's gradient
    def backward(self, grad):
        xp = xp_of(grad)
        return (xp.broadcast_to(_keep_dims(grad, self.in_shape, self.axes), self.in_shape),)


class Max(Function):
    def forward(self, a, axis=None, keepdims=False):
        self.a, self.axes = a, _normalize_axes(axis, a.ndim)
        self.out = a.max(axis=self.axes, keepdims=True)
        return self.out if keepdims else self.out.reshape(
            tuple(n for i, n in enumerate(a.shape) if i not in self.axes))

    # d/da_i max(a) = 1 at the maximum, 0 elsewhere (ties share the gradient equally)
    def backward(self, grad):
        is_max = self.a == self.out
        count = is_max.sum(axis=self.axes, keepdims=True)
        share = is_max / count.astype(grad.dtype)
        return (_keep_dims(grad, tuple(self.a.shape), self.axes) * share,)


# --- movement ------------------------------------------------------------------------------


class Reshape(Function):
    def forward(self, a, shape):
        self.in_shape = tuple(a.shape)
        try:
            return a.reshape(shape)
        except ValueError:
            raise ValueError(f"cannot reshape a tensor of shape {self.in_shape} "
                             f"({a.size} elements) into {tuple(shape)}") from None

    # reshape moves no values: reshape the gradient back
    def backward(self, grad):
        return (grad.reshape(self.in_shape),)


class Permute(Function):
    def forward(self, a, axes):
        if sorted(ax % max(a.ndim, 1) for ax in axes) != list(range(a.ndim)):
            raise ValueError(f"permute axes {axes} are not a permutation of {a.ndim} axes")
        self.axes = axes
        return a.transpose(axes)

    # the gradient goes back through the inverse permutation
    def backward(self, grad):
        inverse = [0] * len(self.axes)
        for i, ax in enumerate(self.axes):
            inverse[ax % len(self.axes)] = i
        return (grad.transpose(inverse),)


def _has_array(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(hasattr(i, "shape") or isinstance(i, list) for i in items)


def check_index_bounds(index: Any, shape: tuple) -> None:
    """IndexError for an integer (or integer-array) index outside its axis.

    NumPy raises for these, but CuPy wraps an out-of-range integer array around
    silently (index 5 of 3 rows reads row 2), so the engine checks them itself, as
    embedding and cross_entropy check token ids. Negative indices count from the end.
    """
    items = index if isinstance(index, tuple) else (index,)

    def width(item: Any) -> int:  # how many axes of the input an index item consumes
        if item is None:
            return 0
        if getattr(item, "dtype", None) is not None and item.dtype.kind == "b":
            return item.ndim  # a boolean mask covers as many axes as it has dimensions
        return 1

    named = sum(width(i) for i in items if i is not Ellipsis)
    axis = 0
    for item in items:
        if item is Ellipsis:
            axis += max(len(shape) - named, 0)
            continue
        if isinstance(item, list):
            item = backend.numpy.asarray(item)  # a Python list of ints: host data, not tensor data
        is_int = isinstance(item, int) and not isinstance(item, bool)
        is_int_array = getattr(item, "dtype", None) is not None and item.dtype.kind in "iu"
        if (is_int or is_int_array) and axis < len(shape):
            n = shape[axis]
            low, high = (item, item) if is_int else (
                (int(item.min()), int(item.max())) if item.size else (0, -1))
            if low < -n or high >= n:
                bad = low if low < -n else high
                raise IndexError(f"index {bad} is out of range for axis {axis} with size {n} "
                                 f"(valid: {-n}..{n - 1})")
        axis += width(item)


class GetItem(Function):
    def forward(self, a, index):
        check_index_bounds(index, tuple(a.shape))
        self.in_shape, self.dtype, self.index = tuple(a.shape), a.dtype, index
        return a[index]

    # the picked elements get the gradient, the rest get 0; repeated integer
    # indices add up (scatter-add), since an element picked twice was used twice
    def backward(self, grad):
        out = xp_of(grad).zeros(self.in_shape, dtype=grad.dtype)
        if _has_array(self.index):
            scatter_add(out, self.index, grad)
        else:
            out[self.index] = grad
        return (out,)


class Concatenate(Function):
    def forward(self, *arrays, axis=0):
        self.axis = axis % arrays[0].ndim
        self.sizes = [a.shape[self.axis] for a in arrays]
        return xp_of(arrays[0]).concatenate(arrays, axis=self.axis)

    # each input gets back its own slice of the gradient
    def backward(self, grad):
        grads, start = [], 0
        for size, needed in zip(self.sizes, self.needs_grad):
            index = [slice(None)] * grad.ndim
            index[self.axis] = slice(start, start + size)
            grads.append(grad[tuple(index)] if needed else None)
            start += size
        return tuple(grads)


# --- masks ---------------------------------------------------------------------------------


def causal_mask(xp, Tq: int, Tk: int):
    """(Tq, Tk) bool, True where query i may NOT see key j.

    The Tq queries are the last Tq of the Tk positions (the KV-cache case), so query i
    sits at position i + Tk - Tq and sees keys 0 .. i + Tk - Tq.
    """
    return xp.arange(Tk)[None, :] > xp.arange(Tq)[:, None] + (Tk - Tq)
