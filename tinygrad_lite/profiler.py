"""Per-op timers: where does a training step spend its time?

    with profile_ops() as table:
        loss = model(x, y)[1]; loss.backward()
    print(format_table(table))

While active, every registered op's forward and backward is wrapped with a timer
(wall clock, synchronising CuPy first so GPU time lands on the right op). Nothing is
wrapped, and nothing costs anything, outside the `with` block.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

from . import backend
from .tensor import Function


def _sync() -> None:
    if backend.cuda_available:
        backend.cupy.cuda.Device().synchronize()


@contextlib.contextmanager
def profile_ops() -> Iterator[dict]:
    """Yield a dict {(op name, 'forward'|'backward'): [calls, seconds]} filled while active."""
    table: dict = defaultdict(lambda: [0, 0.0])
    originals = {}

    def timed(cls, kind, method):
        def wrapper(self, *args, **kwargs):
            _sync()
            start = time.perf_counter()
            out = method(self, *args, **kwargs)
            _sync()
            entry = table[(cls.__name__, kind)]
            entry[0] += 1
            entry[1] += time.perf_counter() - start
            return out
        return wrapper

    for cls in Function.registry.values():
        for kind in ("forward", "backward"):
            if kind in vars(cls):
                originals[(cls, kind)] = vars(cls)[kind]
                setattr(cls, kind, timed(cls, kind, vars(cls)[kind]))
    try:
        yield table
    finally:
        for (cls, kind), method in originals.items():
            setattr(cls, kind, method)


def format_table(table: dict, total_seconds: float | None = None, steps: int = 1) -> str:
    """Rows sorted by time: op, pass, calls per step, ms per step, share of the total."""
    rows = sorted(table.items(), key=lambda kv: -kv[1][1])
    total = total_seconds if total_seconds is not None else sum(s for _, s in table.values())
    lines = [f"{'op':<18}{'pass':<10}{'calls':>7}{'ms/step':>10}{'share':>8}"]
    for (name, kind), (calls, seconds) in rows:
        lines.append(f"{name:<18}{kind:<10}{calls / steps:>7.0f}{1000 * seconds / steps:>10.2f}"
                     f"{100 * seconds / total:>7.1f}%")
    ops_ms = 1000 * sum(s for _, s in table.values()) / steps
    lines.append(f"{'all ops':<28}{'':>7}{ops_ms:>10.2f}{100 * ops_ms / (1000 * total / steps):>7.1f}%")
    return "\n".join(lines)
