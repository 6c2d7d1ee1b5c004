"""tinygrad_lite: a small, readable reverse-mode autograd engine on NumPy (or CuPy)."""
import os as _os

# NOTE: OpenBLAS's worker threads spin for ~2^28 cycles after every matmul before they
# sleep, holding a core that our own elementwise kernels then wait for. A short spin
# (2^10) made a training step ~10% faster on 2 cores (docs/performance.md). OpenBLAS reads
# this when it loads, so it only takes effect if tinygrad_lite is imported before NumPy;
# a value set by the user wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")

from . import backend, functional, nn, optim  # noqa: F401
from .backend import manual_seed  # noqa: F401
from .gradcheck import gradcheck  # noqa: F401
from .graph import to_dot  # noqa: F401
from .tensor import Function, Tensor, concatenate, is_grad_enabled, no_grad, stack, where  # noqa: F401

__version__ = "0.1.0"
