"""Tensor: an array plus the recipe that made it, so gradients can flow back.

Every op on tensors runs its forward math at once (eager, like PyTorch) and, when a
gradient will be needed, records a `Function` object: which tensors went in and what
the backward pass must remember. `loss.backward()` then walks that recorded graph from
the loss back to the leaves, applying the chain rule one op at a time.

This file is the autograd core and imports no op: `ops.py`, the next layer, defines
the primitive ops and attaches Tensor's math methods (`a + b`, `a.sum()`, `a.reshape()`)
to this class, so imports run one way: backend <- tensor <- ops <- tiers <- nn.
"""
from __future__ import annotations

import threading
from typing import Any

from . import backend

# --- gradient mode --------------------------------------------------------------------

_grad_enabled = True


class no_grad:
    """Inside `with no_grad():` ops record nothing (evaluation, generation, optimizer steps).

    NOTE: a class, as PyTorch's is, not a @contextlib.contextmanager generator: entering
    and leaving one is two assignments, against ~1.6 us for the generator's machinery,
    and generation enters it once per token."""

    def __enter__(self) -> None:
        global _grad_enabled
        self.previous, _grad_enabled = _grad_enabled, False

    def __exit__(self, *exc_info) -> None:
        global _grad_enabled
        _grad_enabled = self.previous


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
        other = Function.registry.get(cls.__name__)
        if other is not None and other.__module__.startswith("tinygrad_lite.") and other is not cls:
            # NOTE: each tier names its ops (GELU, FusedGELU, FastGELU): a second op of the
            # same name would silently take the first one's place in the registry
            raise TypeError(f"op name {cls.__name__} is taken by {other.__module__}.{other.__name__}")
        Function.registry[cls.__name__] = cls

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def backward(self, grad: Any) -> tuple:
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs: Any, **options: Any) -> "Tensor":
        """Run forward on the inputs' arrays; record the op if any input needs a gradient."""
        arrays, needs_grad, first = [], [], None
        for x in inputs:  # one pass: unwrap tensors, note who wants a gradient, check devices
            if isinstance(x, Tensor):
                data = x.data
                if first is None:
                    first = data
                # NOTE: arrays of one type are on one device; only other types need the
                # device names (a NumPy scalar is on the CPU too). ~0.5 us saved per input
                elif type(data) is not type(first) and backend.device_of(data) != backend.device_of(first):
                    raise RuntimeError(f"{cls.__name__}: inputs are on different devices "
                                       f"({backend.device_of(first)} and {backend.device_of(data)}); "
                                       f"move them with .to(device)")
                arrays.append(data)
                needs_grad.append(x.requires_grad)
            else:
                arrays.append(x)
                needs_grad.append(False)
        requires_grad = _grad_enabled and any(needs_grad)
        if requires_grad:
            ctx = cls()
            ctx.needs_grad = needs_grad
            out = ctx.forward(*arrays, **options)
        else:
            ctx = _spare(cls)
            ctx.needs_grad = [False] * len(needs_grad)  # no backward will come
            try:
                out = ctx.forward(*arrays, **options)
            finally:  # (also when forward raised: a failed op keeps nothing either)
                ctx.__dict__.clear()  # no backward will come: drop what forward kept at once
        if isinstance(out, backend.numpy.generic):  # NumPy reductions return scalars
            out = backend.numpy.asarray(out)
        result = Tensor._from_array(out, requires_grad)
        if requires_grad:
            ctx.inputs = inputs
            result._ctx = ctx
        return result


# NOTE: an op that records nothing (no_grad, or no input wants a gradient: inference) runs
# its forward on a spare instance of its class, one per thread, wiped after each call. A
# decoded token's ~50 ops then build no Function objects and keep none of their buffers.
_spares = threading.local()


def _spare(cls: type) -> Function:
    """The reusable instance of `cls` for ops that record nothing, in this thread."""
    spares = _spares.__dict__
    ctx = spares.get(cls)
    if ctx is None:
        ctx = spares[cls] = cls()
    return ctx


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
