"""tinygrad_lite: a small, readable reverse-mode autograd engine on NumPy (or CuPy)."""
from . import backend, functional, nn, optim  # noqa: F401
from .backend import manual_seed  # noqa: F401
from .gradcheck import gradcheck  # noqa: F401
from .graph import to_dot  # noqa: F401
from .tensor import Function, Tensor, concatenate, is_grad_enabled, no_grad, stack, where  # noqa: F401

__version__ = "0.1.0"
