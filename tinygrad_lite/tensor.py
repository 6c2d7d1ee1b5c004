"""Tensor: an array plus the recipe that made it, so gradients can flow back.

Every op on tensors runs its forward math at once (eager, like PyTorch) and, when a
gradient will be needed, records a `Function` object: which tensors went in and what
the backward pass must remember. `loss.backward()` then walks that recorded graph from
the loss back to the leaves, applying the chain rule one op at a time.

Reading order: this file (Tensor, Function, the backward engine), then `ops.py`
(primitive ops), then `fused.py` (fast ops with hand-derived gradients).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from . import backend

# --- gradient mode --------------------------------------------------------------------

_grad_enabled = True


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Inside `with no_grad():` ops record nothing (evaluation, generation, optimizer steps)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


# --- Function: one recorded op --------------------------------------------------------


class Function:
    """Base class of every differentiable op.

    A subclass writes `forward(self, *arrays, **options) -> array` and
    `backward(self, grad) -> tuple of input gradients` (None where an input needs none),
    side by side. `forward` keeps on `self` only what `backward` needs.
    `self.needs_grad[i]` tells whether input i wants a gradient, so backward can skip work.
    """

    registry: dict[str, type] = {}  # every op, by name: tests check each one has a gradcheck

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Function.registry[cls.__name__] = cls

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def backward(self, grad: Any) -> tuple:
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs: Any, **options: Any) -> "Tensor":
        """Run forward on the inputs' arrays; record the op if any input needs a gradient."""
        ctx = cls()
        arrays, needs_grad, device = [], [], None
        for x in inputs:  # one pass: unwrap tensors, note who wants a gradient, check devices
            if isinstance(x, Tensor):
                x_device = x.device
                if device is None:
                    device = x_device
                elif x_device != device:
                    raise RuntimeError(f"{cls.__name__}: inputs are on different devices "
                                       f"({device} and {x_device}); move them with .to(device)")
                arrays.append(x.data)
                needs_grad.append(x.requires_grad)
            else:
                arrays.append(x)
                needs_grad.append(False)
        ctx.needs_grad = needs_grad
        out = ctx.forward(*arrays, **options)
        if isinstance(out, backend.numpy.generic):  # NumPy reductions return scalars
            out = backend.numpy.asarray(out)
        requires_grad = _grad_enabled and any(needs_grad)
        result = Tensor._from_array(out, requires_grad)
        if requires_grad:
            ctx.inputs = inputs
            result._ctx = ctx
        return result


# --- Tensor ---------------------------------------------------------------------------


class Tensor:
    """An n-dimensional array that can track gradients.

    Tensor(data, requires_grad=False, dtype=None, device=None)
      - a NumPy (or CuPy) array keeps its dtype; Python lists and scalars become float32;
      - `dtype=` overrides; float32 is the working dtype, float64 is fully supported.
    """

    __slots__ = ("data", "grad", "requires_grad", "_ctx", "_freed", "name", "__weakref__")

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None,
                 device: str | None = None) -> None:
        if isinstance(data, Tensor):
            data = data.data
        is_host_array = type(data).__module__ == "numpy" or not backend.is_array(data)
        if device is None:
            device = backend.default_device() if is_host_array else backend.device_of(data)
        if dtype is None and not hasattr(data, "dtype"):
            dtype = "float32"  # Python numbers and lists
        self.data = backend.asarray(data, backend._check_device(device), dtype)
        if requires_grad and self.data.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require grad, not {self.data.dtype}")
        self.grad = None
        self.requires_grad = requires_grad
        self._ctx: Function | None = None
        self._freed = False
        self.name = None

    @classmethod
    def _from_array(cls, array: Any, requires_grad: bool = False) -> "Tensor":
        """Wrap a backend array without copying or checking (the hot path of every op)."""
        t = cls.__new__(cls)
        t.data, t.grad, t.requires_grad, t._ctx, t._freed, t.name = array, None, requires_grad, None, False, None
        return t

    # --- facts about the data ---
    shape = property(lambda self: tuple(self.data.shape))
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    device = property(lambda self: backend.device_of(self.data))
    xp = property(lambda self: backend.xp_of(self.data))
    is_leaf = property(lambda self: self._ctx is None)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        dev = "" if self.device == "cpu" else f", device={self.device!r}"
        return f"Tensor({self.numpy()!r}{grad}{dev})"

    def numpy(self):
        """A host NumPy copy of the data."""
        out = backend.to_numpy(self.data)
        return out.copy() if out is self.data else out

    def item(self) -> float:
        return self.data.item()

    def tolist(self) -> list:
        return self.numpy().tolist()

    def detach(self) -> "Tensor":
        """The same data, cut off from the graph."""
        return Tensor._from_array(self.data)

    def to(self, device: str) -> "Tensor":
        """A copy on `device` ('cpu', 'cuda' or 'strict'); a leaf keeps requires_grad."""
        device = backend._check_device(device)
        if device == self.device:
            return self
        return Tensor(backend.to_numpy(self.data), self.requires_grad, device=device)

    # --- the backward engine ---
    def backward(self, gradient: Any = None) -> None:
        """Fill `.grad` of every leaf that requires grad with d(self)/d(leaf).

        Gradients add up: a tensor used twice gets the sum of both contributions, and
        calling backward twice accumulates into `.grad` (clear it with `zero_grad()`).
        """
        if self._freed:
            raise RuntimeError("backward through a graph that was already freed: the graph is "
                               "released after the first backward; run the forward pass again")
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad "
                               "(no input had requires_grad=True, or it was made under no_grad)")
        if gradient is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a scalar output; this one "
                                   f"has shape {self.shape}: pass gradient= of that shape or reduce it")
            gradient = self.xp.ones_like(self.data)
        elif isinstance(gradient, Tensor):
            gradient = gradient.data
        if tuple(gradient.shape) != self.shape:
            raise ValueError(f"gradient shape {tuple(gradient.shape)} != tensor shape {self.shape}")

        # 1. order the graph so each tensor comes before the tensors it was made from
        order = _topological_order(self)
        # 2. walk it, handing each op's output gradient to its backward
        grads = {id(self): gradient}
        for node in order:
            grad = grads.pop(id(node), None)
            if grad is None:
                continue
            ctx = node._ctx
            if ctx is None:  # a leaf: keep its gradient (never in place: grads may be shared)
                node.grad = grad if node.grad is None else node.grad + grad
                continue
            for inp, inp_grad in zip(ctx.inputs, ctx.backward(grad)):
                if inp_grad is None or not (isinstance(inp, Tensor) and inp.requires_grad):
                    continue
                if isinstance(inp_grad, backend.numpy.generic):  # a full reduction's scalar
                    inp_grad = backend.numpy.asarray(inp_grad)
                key = id(inp)
                grads[key] = inp_grad if key not in grads else grads[key] + inp_grad
            # 3. free what this op saved, as soon as it is used
            node._ctx, node._freed = None, True

    # --- operators (defined in ops.py, attached here so `a + b` reads like math) ---
    def __add__(self, other): return ops.Add.apply(self, _lift(other, self))
    def __radd__(self, other): return ops.Add.apply(_lift(other, self), self)
    def __sub__(self, other): return ops.Sub.apply(self, _lift(other, self))
    def __rsub__(self, other): return ops.Sub.apply(_lift(other, self), self)
    def __mul__(self, other): return ops.Mul.apply(self, _lift(other, self))
    def __rmul__(self, other): return ops.Mul.apply(_lift(other, self), self)
    def __truediv__(self, other): return ops.Div.apply(self, _lift(other, self))
    def __rtruediv__(self, other): return ops.Div.apply(_lift(other, self), self)
    def __pow__(self, other): return ops.Pow.apply(self, _lift(other, self))
    def __rpow__(self, other): return ops.Pow.apply(_lift(other, self, as_tensor=True), self)
    def __neg__(self): return ops.Neg.apply(self)
    def __matmul__(self, other): return ops.MatMul.apply(self, _lift(other, self, as_tensor=True))
    def __rmatmul__(self, other): return ops.MatMul.apply(_lift(other, self, as_tensor=True), self)
    def __getitem__(self, index): return ops.GetItem.apply(self, index=_index_data(index))

    # comparisons give plain boolean tensors (no gradient), as in PyTorch
    def __lt__(self, other): return Tensor._from_array(self.data < _data(other))
    def __le__(self, other): return Tensor._from_array(self.data <= _data(other))
    def __gt__(self, other): return Tensor._from_array(self.data > _data(other))
    def __ge__(self, other): return Tensor._from_array(self.data >= _data(other))
    __hash__ = object.__hash__

    # --- elementwise math ---
    def exp(self): return ops.Exp.apply(self)
    def log(self): return ops.Log.apply(self)
    def sqrt(self): return ops.Sqrt.apply(self)
    def relu(self): return ops.ReLU.apply(self)
    def tanh(self): return ops.Tanh.apply(self)
    def sigmoid(self): return ops.Sigmoid.apply(self)
    def gelu(self): return fused.GELU.apply(self)
    def softmax(self, axis: int = -1): return fused.Softmax.apply(self, axis=axis)
    def log_softmax(self, axis: int = -1): return fused.LogSoftmax.apply(self, axis=axis)

    # --- reductions ---
    def sum(self, axis=None, keepdims: bool = False): return ops.Sum.apply(self, axis=axis, keepdims=keepdims)
    def max(self, axis=None, keepdims: bool = False): return ops.Max.apply(self, axis=axis, keepdims=keepdims)

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
        return ops.Reshape.apply(self, shape=tuple(shape))

    def permute(self, *axes) -> "Tensor":
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        return ops.Permute.apply(self, axes=tuple(axes))

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
        return ops.Cast.apply(self, dtype=dtype)

    def float(self) -> "Tensor":
        return self.astype("float32")

    def double(self) -> "Tensor":
        return self.astype("float64")

    # --- constructors ---
    @staticmethod
    def zeros(*shape, dtype="float32", device=None, requires_grad=False) -> "Tensor":
        device = device or backend.default_device()
        return Tensor(backend.namespace(device).zeros(shape, dtype=dtype), requires_grad)

    @staticmethod
    def ones(*shape, dtype="float32", device=None, requires_grad=False) -> "Tensor":
        device = device or backend.default_device()
        return Tensor(backend.namespace(device).ones(shape, dtype=dtype), requires_grad)

    @staticmethod
    def randn(*shape, std: float = 1.0, dtype="float32", device=None, requires_grad=False) -> "Tensor":
        """Samples of Normal(0, std^2) from the backend's seeded generator."""
        device = device or backend.default_device()
        return Tensor(backend.randn(shape, device, dtype, std), requires_grad)


def concatenate(tensors: list[Tensor], axis: int = 0) -> Tensor:
    """Join tensors along an existing axis."""
    if not tensors:
        raise ValueError("concatenate needs at least one tensor")
    return ops.Concatenate.apply(*tensors, axis=axis)


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
    return ops.Where.apply(condition.data, _lift(x, like), _lift(y, like))


# --- helpers --------------------------------------------------------------------------


def _topological_order(root: Tensor) -> list[Tensor]:
    """Tensors reachable from root, each before every tensor it was computed from.

    Iterative depth-first search (no recursion, so a 10,000-op graph is fine).
    """
    postorder, visited, stack = [], set(), [(root, False)]
    while stack:
        node, inputs_done = stack.pop()
        if inputs_done:
            postorder.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        if node._freed:
            raise RuntimeError("backward through a graph that was already freed: part of this "
                               "graph was used by an earlier backward; run the forward pass again")
        stack.append((node, True))
        if node._ctx is not None:
            for inp in node._ctx.inputs:
                if isinstance(inp, Tensor) and inp.requires_grad and id(inp) not in visited:
                    stack.append((inp, False))
    return postorder[::-1]


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


from . import fused, ops  # noqa: E402  (ops subclass Function, defined above)
