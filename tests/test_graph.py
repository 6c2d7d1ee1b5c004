"""The graph drawer: dot text of a neuron's forward, gradients after backward, a shared
input drawn once, deep graphs without recursion, and rendering with or without Graphviz."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

import tinygrad_lite
from tinygrad_lite import Tensor, backend
from tinygrad_lite.graph import Graph, render, to_dot, trace
from tinygrad_lite.nn import Neuron


def neuron_forward():
    """tanh(w . x + b) with w = (0.5, -0.25, 0.1), b = 0.2, x = (1, 2, 3): y = tanh(0.5)."""
    n = Neuron(3, "tanh")
    n.load_state_dict({"w": np.array([0.5, -0.25, 0.1], np.float32), "b": np.array(0.2, np.float32)})
    for name, p in n.named_parameters():
        p.name = name
    x = Tensor([1.0, 2.0, 3.0])
    x.name = "x"
    y = n(x)
    y.name = "y"
    return n, y


def op_names(dot: str) -> list[str]:
    return re.findall(r'shape=ellipse, label="(\w+)"', dot)


def test_exported_from_the_package():
    assert tinygrad_lite.to_dot is to_dot


def test_neuron_forward_has_its_ops_shapes_and_names_in_order():
    _, y = neuron_forward()
    dot = to_dot(y)
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    assert op_names(dot) == ["Mul", "Sum", "Add", "Tanh"]  # the order they ran in
    for label in ('x\\n(3,) float32', 'w\\n(3,) float32', 'b\\n() float32', 'y\\n() float32'):
        assert label in dot
    assert "\\ngrad" not in dot  # no backward yet
    assert len(re.findall(r"shape=box", dot)) == 7  # x, w, b, y and three intermediates
    assert len(re.findall(r"->", dot)) == 10  # 6 edges into ops + 4 out of them


def test_parameters_are_shaded_inputs_and_intermediates_are_not():
    _, y = neuron_forward()
    graph = trace(y)
    y.backward()  # frees the graph: every _ctx is None now, yet the shading must not change
    shaded = re.findall(r'fillcolor="[^"]+", label="(\w+)', to_dot(graph))
    assert shaded == ["w", "b"]


def test_grads_appear_after_backward_through_a_trace():
    n, y = neuron_forward()
    graph = trace(y)
    y.backward()
    dot = to_dot(graph)
    # dy/dw = (1 - tanh(0.5)^2) x, dy/db = 1 - tanh(0.5)^2 = 0.7864
    assert "grad [0.7864 1.573 2.359]" in dot
    assert "grad 0.7864" in dot
    assert "\\ngrad" not in to_dot(graph, show_grads=False)
    np.testing.assert_allclose(backend.to_numpy(n.w.grad), (1 - np.tanh(0.5) ** 2) * np.array([1, 2, 3]), rtol=1e-5)


def test_a_freed_graph_is_refused_with_the_fix_in_the_message():
    _, y = neuron_forward()
    y.backward()
    with pytest.raises(ValueError, match="trace"):
        to_dot(y)


def test_a_tensor_used_twice_is_one_node_and_constants_are_shown():
    x = Tensor([1.0, 2.0], requires_grad=True)
    y = (x * x * 2.0).sum()
    graph = trace(y)
    assert [op.name for op in graph.ops] == ["Mul", "Mul", "Sum"]
    assert graph.ops[0].inputs == [0, 0]  # x is one node with two edges into Mul
    assert graph.ops[1].inputs[1] == "2"  # the Python number, drawn as a plain text node
    assert graph.tensors[-1] is y
    assert 'label="2"' in to_dot(graph)


def test_a_big_grad_is_summarised():
    w = Tensor(np.ones((4, 5), np.float32), requires_grad=True)
    graph = trace((w * 3.0).sum())
    graph.tensors[-1].backward()
    assert "grad (4, 5) mean 3, |max| 3" in to_dot(graph)


def test_a_deep_graph_needs_no_recursion():
    x = Tensor([1.0], requires_grad=True)
    y = x
    for _ in range(5000):  # far past Python's default recursion limit of 1000
        y = y * 1.0
    graph = trace(y)
    assert isinstance(graph, Graph) and len(graph.ops) == 5000 and len(graph.tensors) == 5001


def test_a_leaf_alone_is_one_box():
    dot = to_dot(Tensor([1.0, 2.0]))
    assert "(2,) float32" in dot and "ellipse" not in dot


def test_render_returns_false_without_graphviz(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    _, y = neuron_forward()
    assert render(to_dot(y), tmp_path / "neuron.png") is False
    assert not (tmp_path / "neuron.png").exists()


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_render_writes_a_png_with_graphviz(tmp_path):
    _, y = neuron_forward()
    path = tmp_path / "neuron.png"
    assert render(to_dot(y), path) is True
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_render_reports_dot_errors(tmp_path):
    with pytest.raises(RuntimeError, match="dot failed"):
        render("digraph {", tmp_path / "broken.png")
