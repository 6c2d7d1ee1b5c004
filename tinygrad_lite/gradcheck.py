"""gradcheck: compare backward() with central finite differences.

For f(inputs) we take a fixed random projection L = sum(f * r), so one backward pass
gives dL/dx for every input element. Then we nudge elements and measure
    dL/dx ~ (L(x + eps) - L(x - eps)) / (2 eps)
in float64. Small inputs are checked element by element; big ones along a few random
directions d, where the directional derivative is sum(dL/dx * d).
"""
from __future__ import annotations

from typing import Callable, Sequence

from . import backend
from .tensor import Tensor, no_grad


class GradcheckError(AssertionError):
    """Analytic and numeric gradients disagree."""


def gradcheck(fn: Callable[..., Tensor], inputs: Sequence[Tensor], eps: float = 1e-6,
              atol: float = 1e-5, rtol: float = 1e-3, max_elements: int = 64,
              directions: int = 4, seed: int = 0, name: str | None = None) -> bool:
    """Check the gradients of `fn(*inputs)` for every input with requires_grad=True.

    Inputs should be float64 (the finite differences need the precision). Returns True,
    or raises GradcheckError naming the op, the input, the element and both values.
    """
    name = name or getattr(fn, "__name__", "fn")
    for i, x in enumerate(inputs):
        if x.requires_grad and x.dtype != "float64":
            raise TypeError(f"gradcheck of {name}: input {i} is {x.dtype}; use float64 inputs")
    checked = [x for x in inputs if x.requires_grad]
    if not checked:
        raise ValueError(f"gradcheck of {name}: no input has requires_grad=True")

    host_rng = backend.numpy.random.default_rng(seed)
    out = fn(*inputs)
    projection = backend.asarray(host_rng.standard_normal(out.shape), out.device)

    def loss() -> float:
        with no_grad():
            return float((fn(*inputs).data * projection).sum())

    # analytic: one backward of L = sum(out * r)
    for x in checked:
        x.grad = None
    out.backward(projection)
    analytic = [x.grad if x.grad is not None else x.xp.zeros_like(x.data) for x in checked]

    positions = [i for i, x in enumerate(inputs) if x.requires_grad]  # errors name inputs[i]
    for input_index, x, grad in zip(positions, checked, analytic):
        data, results = x.data, []
        if x.size <= max_elements:  # element by element
            for flat in range(x.size):
                idx = _unravel(flat, x.shape)
                original = float(data[idx])
                data[idx] = original + eps
                plus = loss()
                data[idx] = original - eps
                minus = loss()
                data[idx] = original
                results.append((f"element {idx}", float(grad[idx]), (plus - minus) / (2 * eps)))
        else:  # along random directions
            for k in range(directions):
                d = backend.asarray(host_rng.standard_normal(x.shape), x.device)
                x.data = data + eps * d
                plus = loss()
                x.data = data - eps * d
                minus = loss()
                x.data = data
                results.append((f"random direction {k}", float((grad * d).sum()),
                                (plus - minus) / (2 * eps)))
        _report_worst(name, input_index, x.shape, results, atol, rtol)
    return True


def _unravel(flat: int, shape: tuple) -> tuple:
    idx = []
    for n in reversed(shape):
        idx.append(flat % n)
        flat //= n
    return tuple(reversed(idx))


def _report_worst(name, input_index, shape, results, atol, rtol) -> None:
    """Raise for the element whose error most exceeds its tolerance, if any does."""
    def excess(r):
        _, analytic, numeric = r
        return abs(analytic - numeric) - (atol + rtol * abs(numeric))
    failures = [r for r in results if not excess(r) <= 0]  # `not <=` also catches nan
    if failures:
        where, analytic, numeric = max(failures, key=lambda r: (excess(r) != excess(r), excess(r)))
        raise GradcheckError(f"gradcheck of {name} failed for input {input_index} (shape {shape}), "
                             f"worst at {where}: analytic {analytic:.8g} vs numeric {numeric:.8g} "
                             f"(difference {abs(analytic - numeric):.3g}; "
                             f"{len(failures)} of {len(results)} checks failed)")
