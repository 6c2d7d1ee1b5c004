"""Draw the computation graph behind a tensor, as Graphviz dot text.

Every op records which tensors went in (`Tensor._ctx.inputs`, see tensor.py), so the
graph that produced a tensor can be walked back from it: one box per tensor, one
ellipse per op (the `Function` class name), edges input -> op -> output.

backward() frees the graph as it goes (each `_ctx` becomes None), so a graph must be
captured *before* backward if you want to see it together with the gradients:

    graph = trace(y)          # a record of the graph: tensors (kept alive) and ops
    y.backward()              # frees y's graph, fills the leaves' .grad
    print(to_dot(graph))      # the same graph, the leaves' gradients now in their labels
    render(to_dot(graph), "neuron.png")   # False when Graphviz's `dot` is not installed

`to_dot(y)` on a tensor whose graph is still there traces it on the spot. Only leaves
keep a gradient in this engine (intermediate gradients are dropped as soon as they
have been passed on), so only leaves show one.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import backend
from .tensor import Tensor


@dataclass
class Op:
    """One recorded op: its Function class name, its inputs and its output.

    An input is an index into `Graph.tensors`, or a short text for a constant that is
    not a tensor (the 2.0 of `x * 2.0`)."""

    name: str
    inputs: list[int | str]
    output: int


@dataclass
class Graph:
    """The structure of a graph, enough to draw it after backward() has freed it."""

    tensors: list[Tensor]  # every tensor, each after the tensors it was computed from
    ops: list[Op]


def trace(tensor: Tensor) -> Graph:
    """Record the graph that produced `tensor` (inputs first, `tensor` last).

    Iterative depth-first walk, so deep graphs never hit Python's recursion limit.
    """
    index: dict[int, int] = {}  # id(tensor) -> position in `tensors`
    tensors: list[Tensor] = []
    ops: list[Op] = []
    stack = [(tensor, False)]
    while stack:
        t, inputs_done = stack.pop()
        if id(t) in index:  # reached before by another path
            continue
        if t._freed:
            raise ValueError("this graph was freed by backward(); call trace(tensor) before "
                             "backward() and draw the returned graph afterwards")
        if t._ctx is not None and not inputs_done:  # first visit: its inputs go first
            stack.append((t, True))
            stack.extend((i, False) for i in reversed(t._ctx.inputs) if isinstance(i, Tensor))
            continue
        index[id(t)] = len(tensors)
        tensors.append(t)
        if t._ctx is not None:
            inputs = [index[id(i)] if isinstance(i, Tensor) else _constant(i)
                      for i in t._ctx.inputs if i is not None]  # None: an absent option (no bias)
            ops.append(Op(type(t._ctx).__name__, inputs, index[id(t)]))
    return Graph(tensors, ops)


def to_dot(tensor: Tensor | Graph, show_grads: bool = True) -> str:
    """Graphviz dot text of the graph behind `tensor` (or of a Graph from `trace`).

    Tensor boxes read "name (if set via t.name) / shape dtype / grad ..."; leaves that
    require grad (the parameters) are shaded. Ops are listed in the order they ran.
    """
    graph = tensor if isinstance(tensor, Graph) else trace(tensor)
    lines = ["digraph tinygrad_lite {", "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=10];']
    made_by = {op.output: (k, op) for k, op in enumerate(graph.ops)}
    for i, t in enumerate(graph.tensors):
        if i in made_by:  # the op first, then the tensor it made: reads in order
            k, op = made_by[i]
            o = f"op{k}"
            lines.append(f'  {o} [shape=ellipse, label="{op.name}"];')
            for j, inp in enumerate(op.inputs):
                if isinstance(inp, str):  # a constant: a plain text node of its own
                    lines.append(f'  {o}_c{j} [shape=plaintext, label="{_escape(inp)}"];')
                    lines.append(f"  {o}_c{j} -> {o};")
                else:
                    lines.append(f"  t{inp} -> {o};")
            lines.append(f"  {o} -> t{i};")
        # NOTE: a leaf is a tensor no op made; after backward every `_ctx` is None, so
        # `t.is_leaf` would call them all leaves
        style = ', style=filled, fillcolor="#dce8fa"' if i not in made_by and t.requires_grad else ""
        lines.append(f'  t{i} [shape=box{style}, label="{_escape(_tensor_label(t, show_grads))}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot_text: str, path_png: str | Path) -> bool:
    """Draw dot text into an image with Graphviz's `dot` program (format from the file
    suffix, png by default). False, and nothing written, when `dot` is not on PATH."""
    dot = shutil.which("dot")
    if dot is None:
        return False
    fmt = Path(path_png).suffix.lstrip(".") or "png"
    result = subprocess.run([dot, f"-T{fmt}", "-o", str(path_png)], input=dot_text,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"dot failed ({result.returncode}): {' '.join(result.stderr.split())}")
    return True


# --- labels ---------------------------------------------------------------------------


def _tensor_label(t: Tensor, show_grads: bool) -> str:
    lines = [t.name] if t.name else []
    lines.append(f"{t.shape} {t.dtype}")
    if show_grads and t.grad is not None:
        lines.append("grad " + _summary(backend.to_numpy(t.grad)))
    return "\n".join(lines)


def _summary(a) -> str:
    """A few numbers say it all for a small array; a big one gets its mean and extent."""
    if a.size <= 6:
        values = " ".join(f"{v:.4g}" for v in a.reshape(-1).tolist())
        return values if a.ndim == 0 else f"[{values}]"
    return f"{tuple(a.shape)} mean {a.mean():.3g}, |max| {abs(a).max():.3g}"


def _constant(x) -> str:
    """How a non-tensor input looks in the drawing: a number as is, an array by shape."""
    if isinstance(x, (int, float)):
        return f"{x:.4g}"
    shape = getattr(x, "shape", None)
    return f"array {tuple(shape)}" if shape is not None else type(x).__name__


def _escape(text: str) -> str:
    """Dot string syntax: escape backslashes and quotes; a newline becomes dot's \\n."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
