"""Layers: Module (a container of parameters), Linear, Embedding, LayerNorm, and the
seed idea of all of them, the Neuron: activation(w . x + b)."""
from __future__ import annotations

import math
from typing import Any, Iterator

from . import backend, functional as F
from .methods import stack
from .tensor import Tensor


class Parameter(Tensor):
    """A tensor that a Module owns and an optimizer updates (requires_grad=True)."""

    __slots__ = ()

    def __init__(self, data: Any, requires_grad: bool = True) -> None:
        super().__init__(data, requires_grad=requires_grad)


class Module:
    """Base class of layers and models, as torch.nn.Module.

    Parameters and sub-modules assigned as attributes (or kept in lists) are found
    automatically by `named_parameters()`.
    """

    training = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def _children(self) -> Iterator[tuple[str, Any]]:
        for name, value in vars(self).items():
            if isinstance(value, (Parameter, Module)):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, (Parameter, Module)):
                        yield f"{name}.{i}", item

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """(dotted name, parameter) pairs, each parameter once (tied weights are shared)."""
        seen: set[int] = set()
        todo = [(prefix, self)]
        while todo:
            path, module = todo.pop(0)
            for name, value in module._children():
                full = f"{path}{name}"
                if isinstance(value, Parameter):
                    if id(value) not in seen:
                        seen.add(id(value))
                        yield full, value
                else:
                    todo.append((full + ".", value))

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def modules(self) -> Iterator["Module"]:
        yield self
        for _, value in self._children():
            if isinstance(value, Module):
                yield from value.modules()

    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def to(self, device: str) -> "Module":
        for p in self.parameters():
            p.data = backend.asarray(backend.to_numpy(p.data), device)
            p.grad = None
        return self

    def state_dict(self) -> dict[str, Any]:
        """name -> host NumPy array of each parameter (a copy)."""
        return {name: p.numpy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Copy arrays into the parameters; errors name a missing/unexpected key or bad shape."""
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        for name, p in params.items():
            if name not in state:
                continue
            value = backend.to_numpy(state[name])  # a host array, whatever it came as (a list too)
            if tuple(value.shape) != p.shape:
                raise ValueError(f"load_state_dict: {name} has shape {tuple(value.shape)} in the "
                                 f"state dict but {p.shape} in the model")
            p.data = backend.in_layout_of(backend.asarray(value, p.device, p.dtype), p.data)  # (its layout kept)

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())


def _uniform(shape: tuple, bound: float) -> Parameter:
    """U(-bound, bound), PyTorch's default init for Linear (Kaiming uniform, a = sqrt(5))."""
    u = backend.rand(shape, backend.default_device())
    return Parameter(u * (2 * bound) - bound)


class Linear(Module):
    """y = x W^T + b, x (..., in_features) -> (..., out_features); W (out, in) as PyTorch.

    W is stored column-major: in memory it is W^T (in, out) row by row, which is how
    GPT-2's own checkpoints store it (its Conv1D layers). x W^T then multiplies x by a
    row-major matrix, which BLAS reads as it is. Stored row-major, W^T is a transposed
    view that OpenBLAS repacks on every call, and for a few rows (a decoded token) that
    repacking is most of the work: (8, 128) x (128, 384) took 21 us against 6-10 us (2-core
    Xeon VM, one thread). Training's products of many rows run as fast either way.
    Arrays loaded into W keep this layout (Module.load_state_dict), and so do its gradient
    and the optimizer's moments (see backend.in_layout_of).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        bound = 1.0 / math.sqrt(in_features)
        self.weight = _uniform((out_features, in_features), bound)
        self.weight.data = self.weight.xp.asfortranarray(self.weight.data)  # column-major (the same values)
        self.bias = _uniform((out_features,), bound) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class Embedding(Module):
    """A lookup table: integer ids (...) -> rows of weight (..., dim)."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        self.weight = Parameter(backend.randn((num_embeddings, dim), backend.default_device()))

    def forward(self, ids: Any) -> Tensor:
        return F.embedding(self.weight, ids)


class LayerNorm(Module):
    """Normalise the last axis to mean 0, variance 1, then scale and shift (learned)."""

    def __init__(self, dim: int, bias: bool = True, eps: float = 1e-5) -> None:
        xp = backend.namespace(backend.default_device())
        self.weight = Parameter(xp.ones((dim,), dtype="float32"))
        self.bias = Parameter(xp.zeros((dim,), dtype="float32")) if bias else None
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight, self.bias, self.eps)


class Dropout(Module):
    def __init__(self, p: float = 0.0) -> None:
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)


# --- the seed idea: one neuron, then layers of them -------------------------------------

ACTIVATIONS = {"relu": Tensor.relu, "tanh": Tensor.tanh, "gelu": Tensor.gelu,
               "sigmoid": Tensor.sigmoid, "linear": lambda x: x}


class Neuron(Module):
    """One neuron: activation(w1 x1 + w2 x2 + ... + b). x (B, n_inputs) -> (B,)."""

    def __init__(self, n_inputs: int, activation: str = "tanh") -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.w = _uniform((n_inputs,), 1.0 / math.sqrt(n_inputs))
        self.b = Parameter(backend.namespace(backend.default_device()).zeros((), dtype="float32"))
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return ACTIVATIONS[self.activation]((x * self.w).sum(axis=-1) + self.b)


class Layer(Module):
    """Several neurons reading the same inputs. x (B, n_inputs) -> (B, n_outputs)."""

    def __init__(self, n_inputs: int, n_outputs: int, activation: str = "tanh") -> None:
        self.neurons = [Neuron(n_inputs, activation) for _ in range(n_outputs)]

    def forward(self, x: Tensor) -> Tensor:
        return stack([n(x) for n in self.neurons], axis=-1)


class MLP(Module):
    """Layers of neurons: sizes [2, 16, 16, 1] = 2 inputs, two hidden layers, 1 output.

    Written neuron by neuron on purpose, to show the idea; `Linear` does a whole layer
    as one matrix product, which is what real models use.
    """

    def __init__(self, sizes: list[int], activation: str = "tanh") -> None:
        self.layers = [Layer(n_in, n_out, activation if i < len(sizes) - 2 else "linear")
                       for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]))]

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
