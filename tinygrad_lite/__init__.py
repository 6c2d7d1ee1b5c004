"""tinygrad_lite: a small, readable reverse-mode autograd engine on NumPy (or CuPy).

The modules, in the order they import each other (each only the ones above it):
backend (arrays, devices, random numbers) -> tensor (Tensor, Function, backward) ->
ops (primitive ops) -> methods (Tensor's math) -> the tiers of the fused-able ops:
primitive, fused + fused_attention, fast + fast_attention + blocked_attention (on
cpu, the CPU-speed knobs)
-> functional (the tier switch) -> nn, optim -> parallel, gradcheck, graph, profiler.

Importing the package changes nothing in the process: no environment variable, no
malloc setting, no thread. A script that wants the CPU tuned calls `cpu.tune()`.
"""
from . import backend, methods  # noqa: F401  (methods: gives Tensor its math)
from . import functional, nn, optim  # noqa: F401
from .backend import manual_seed  # noqa: F401
from .functional import get_ops_tier, ops_tier, set_ops_tier  # noqa: F401
from .gradcheck import gradcheck  # noqa: F401
from .graph import to_dot  # noqa: F401
from .methods import concatenate, stack, where  # noqa: F401
from .tensor import Function, Tensor, is_grad_enabled, no_grad  # noqa: F401

__version__ = "0.1.0"
