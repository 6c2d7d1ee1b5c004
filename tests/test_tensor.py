"""Engine semantics of Tensor: gradient accumulation, no_grad, detach, dtypes, the
graph's lifetime, error messages, devices, and the `unbroadcast` helper.

The per-op gradient checks live in test_ops.py; this file tests the machinery around them.
Every tensor is made from a NumPy array, so it lands on the default device and the file
also runs with TINYGRAD_LITE_DEVICE=strict.
"""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from hypothesis import given, strategies as st

import tinygrad_lite.functional as F
from tinygrad_lite import Function, Tensor, backend, concatenate, is_grad_enabled, no_grad, stack, where
from tinygrad_lite.ops import broadcast_shape, unbroadcast

from strategies import arrays, broadcastable_shapes, tensor


def host(x) -> np.ndarray:
    """A host NumPy copy of a Tensor or a backend array."""
    return x.numpy() if isinstance(x, Tensor) else backend.to_numpy(x)


def f32(array, requires_grad: bool = True) -> Tensor:
    return Tensor(np.asarray(array, dtype=np.float32), requires_grad=requires_grad)


# --- gradients add up ------------------------------------------------------------------


def test_tensor_used_twice_gets_the_sum_of_both_gradients():
    x = tensor([1.0, 2.0, 3.0])
    (x * x).sum().backward()  # both inputs of Mul are x: d/dx x^2 = x + x
    np.testing.assert_allclose(host(x.grad), [2.0, 4.0, 6.0])

    y = tensor([1.0, 2.0, 3.0])
    a = y * 2.0  # an intermediate used twice
    (a + a * a).sum().backward()  # d/dy (2y + 4y^2) = 2 + 8y
    np.testing.assert_allclose(host(y.grad), [10.0, 18.0, 26.0])


def test_backward_twice_accumulates_into_grad():
    x = tensor([1.0, -2.0])
    (x * 3.0).sum().backward()
    (x * 3.0).sum().backward()  # a fresh forward, so a fresh graph
    np.testing.assert_allclose(host(x.grad), [6.0, 6.0])


def test_backward_with_an_explicit_gradient():
    x = tensor(np.arange(6.0).reshape(2, 3))
    g = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
    (x * 3.0).backward(Tensor(g))
    np.testing.assert_allclose(host(x.grad), 3.0 * g)


def test_backward_gradient_of_the_wrong_shape_raises():
    x = tensor(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(2, 3\)"):
        (x * 2.0).backward(Tensor(np.ones((3, 2))))


def test_backward_on_non_scalar_without_gradient_names_the_shape():
    x = tensor(np.ones((2, 3)))
    with pytest.raises(RuntimeError, match=r"\(2, 3\)"):
        (x * 2.0).backward()


def test_backward_on_a_tensor_without_grad_raises():
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor(np.ones(3)).sum().backward()


def test_deep_graph_backward_has_no_recursion_error():
    x = tensor([1.0, 2.0])
    y = x
    for _ in range(5000):
        y = y + 1.0
    y.sum().backward()
    np.testing.assert_allclose(host(x.grad), [1.0, 1.0])
    np.testing.assert_allclose(host(y), [5001.0, 5002.0])


# --- gradient mode and detach -------------------------------------------------------------


def test_no_grad_records_nothing():
    x = tensor([1.0, 2.0])
    with no_grad():
        assert not is_grad_enabled()
        y = (x * 2.0).exp().sum()
    assert is_grad_enabled()
    assert not y.requires_grad and y._ctx is None
    with pytest.raises(RuntimeError):
        y.backward()


def test_no_grad_restores_the_mode_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with no_grad():
            1 / 0
    assert is_grad_enabled()
    with no_grad():  # nested: the inner exit restores "disabled", not "enabled"
        with pytest.raises(KeyError):
            with no_grad():
                raise KeyError("boom")
        assert not is_grad_enabled()
    assert is_grad_enabled()


def test_detach_cuts_the_graph():
    x = tensor([1.0, 2.0, 3.0])
    d = x.detach()
    assert not d.requires_grad and d.is_leaf
    np.testing.assert_array_equal(host(d), host(x))
    (d * x).sum().backward()  # d is a constant: d/dx (d x) = d
    np.testing.assert_allclose(host(x.grad), [1.0, 2.0, 3.0])


def test_numpy_returns_a_host_copy():
    t = Tensor(np.array([1.0, 2.0, 3.0]))
    a = t.numpy()
    assert type(a) is np.ndarray
    a[0] = 99.0
    np.testing.assert_array_equal(t.numpy(), [1.0, 2.0, 3.0])


# --- dtypes -----------------------------------------------------------------------------


def test_dtype_rules():
    assert Tensor(np.zeros(2, np.float64)).dtype == np.float64  # arrays keep their dtype
    assert Tensor(np.zeros(2, np.float32)).dtype == np.float32
    assert Tensor(np.zeros(2, np.int64)).dtype == np.int64
    assert Tensor([1.0, 2.0]).dtype == np.float32  # lists and scalars become float32
    assert Tensor([1, 2]).dtype == np.float32
    assert Tensor(3.0).dtype == np.float32
    assert Tensor(3).dtype == np.float32
    assert Tensor([1, 2], dtype="float64").dtype == np.float64  # dtype= overrides
    assert Tensor(np.zeros(2, np.float32), dtype="float64").dtype == np.float64


def test_float32_with_python_scalars_stays_float32():
    x = f32([1.0, 2.0, 3.0])
    results = [x + 1, 1 + x, x - 2.5, 2.5 - x, x * 3, 0.5 * x, x / 7, 7 / x, x ** 2, x ** 0.5,
               2.0 ** x, -x, x.mean(), where(x > 1.5, x, 0.0), x.masked_fill(x > 2.5, -1e9)]
    for r in results:
        assert r.dtype == np.float32, r
    sum(r.sum() for r in results).backward()
    assert x.grad.dtype == np.float32


# Every public differentiable op, on float32 inputs: name -> (function, input arrays).
# The output and every input's gradient must stay float32 (no silent float64 upcast).
rng = np.random.default_rng(0)
M = rng.standard_normal((2, 3, 4)).astype(np.float32)
W = rng.standard_normal((5, 4)).astype(np.float32)
C4 = rng.standard_normal(4).astype(np.float32)
QKV = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
POSITIVE = (np.abs(M) + 0.5).astype(np.float32)
IDS = np.array([[0, 4, 4], [2, 1, 0]])

FLOAT32_OPS = {
    "Add": (lambda a, b: a + b, [M, C4]),
    "Sub": (lambda a, b: a - b, [M, C4]),
    "Mul": (lambda a, b: a * b, [M, C4]),
    "Div": (lambda a, b: a / b, [M, POSITIVE]),
    "Neg": (lambda a: -a, [M]),
    "Pow": (lambda a, b: a ** b, [POSITIVE, M]),
    "MatMul": (lambda a, b: a @ b, [M, W.T.copy()]),
    "Exp": (Tensor.exp, [M]),
    "Log": (Tensor.log, [POSITIVE]),
    "Sqrt": (Tensor.sqrt, [POSITIVE]),
    "ReLU": (Tensor.relu, [M]),
    "Tanh": (Tensor.tanh, [M]),
    "Sigmoid": (Tensor.sigmoid, [M]),
    "Cast": (lambda a: a.astype("float64").astype("float32"), [M]),
    "Where": (lambda a, b: where(M > 0, a, b), [M, C4]),
    "Sum": (lambda a: a.sum(axis=1), [M]),
    "Max": (lambda a: a.max(axis=-1), [M]),
    "Reshape": (lambda a: a.reshape(6, 4), [M]),
    "Permute": (lambda a: a.permute(2, 0, 1), [M]),
    "GetItem": (lambda a: a[:, np.array([0, 2, 2])], [M]),
    "Concatenate": (lambda a, b: concatenate([a, b], axis=1), [M, M]),
    "stack": (lambda a, b: stack([a, b], axis=-1), [M, M]),
    "GELU": (Tensor.gelu, [M]),
    "Softmax": (Tensor.softmax, [M]),
    "LogSoftmax": (Tensor.log_softmax, [M]),
    "CrossEntropy": (lambda a: F.cross_entropy(a, np.array([[0, 1, 3], [2, 2, 0]]), ignore_index=0), [M]),
    "LayerNorm": (F.layer_norm, [M, C4, C4]),
    "Linear": (F.linear, [M, W, W[:, 0].copy()]),
    "Embedding": (lambda w: F.embedding(w, IDS), [W]),
    "Dropout": (lambda a: F.dropout(a, 0.5, training=True), [M]),
    "Attention": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.2), [QKV, QKV, QKV]),
    "PackedAttention": (lambda qkv: F.packed_causal_attention(qkv, 2, dropout_p=0.2), [QKV.reshape(1, 2, 12)]),
}
TIERED = ("GELU", "Softmax", "LogSoftmax", "CrossEntropy", "LayerNorm", "Linear", "Embedding", "Dropout",
          "Attention")  # these run in each ops tier; PackedAttention exists in the fast tier only
FLOAT32_CASES = [(name, tier) for name in sorted(FLOAT32_OPS)
                 for tier in (F.TIERS if name in TIERED else ["fast"])]


def run_float32(name: str, tier: str) -> set[str]:
    """Forward and backward of one table entry in float32, checking every dtype; returns
    the names of the Function classes its graph recorded."""
    from tinygrad_lite.graph import trace
    fn, arrays_ = FLOAT32_OPS[name]
    inputs = [f32(a) for a in arrays_]
    with F.ops_tier(tier):
        out = fn(*inputs)
    assert out.dtype == np.float32, f"{name} ({tier}) forward gave {out.dtype}"
    recorded = {op.name for op in trace(out).ops}
    out.backward(Tensor(np.ones(out.shape, np.float32)))
    for i, x in enumerate(inputs):
        assert x.grad is not None, f"{name} ({tier}): input {i} got no gradient"
        assert x.grad.dtype == np.float32, f"{name} ({tier}): input {i} gradient is {x.grad.dtype}"
    return recorded


@pytest.mark.parametrize("name,tier", FLOAT32_CASES)
def test_float32_forward_and_backward_stay_float32(name, tier):
    run_float32(name, tier)


def test_float32_table_covers_every_registered_op():
    ops = {name for name, cls in Function.registry.items()
           if cls.__module__.startswith("tinygrad_lite.") and "forward" in vars(cls)}
    covered = set().union(*(run_float32(name, tier) for name, tier in FLOAT32_CASES))
    assert not ops - covered, f"ops without a float32 dtype check: {sorted(ops - covered)}"


def test_float32_pipeline_has_float32_grads():
    """A small model-like pipeline through many ops; every leaf's gradient stays float32."""
    x, w, g, b = f32(M), f32(W), f32(np.ones(5)), f32(np.zeros(5))
    h = F.layer_norm(F.linear(x, w).gelu(), g, b)  # (2, 3, 5)
    h = (h.tanh() + h.sigmoid() * h.relu()).softmax() + h.exp().sqrt().log()
    loss = F.cross_entropy(h, np.array([[0, 1, 4], [3, 2, 0]]))
    assert loss.dtype == np.float32
    loss.backward()
    for leaf in (x, w, g, b):
        assert leaf.grad.dtype == np.float32


def test_requires_grad_on_an_int_tensor_raises():
    with pytest.raises(TypeError, match="int64"):
        Tensor(np.arange(3), requires_grad=True)


def test_comparisons_return_bool_tensors():
    a, b = Tensor(np.array([1.0, 2.0, 3.0])), Tensor(np.array([3.0, 2.0, 1.0]))
    for result, expected in [(a < b, [True, False, False]), (a <= b, [True, True, False]),
                             (a > b, [False, False, True]), (a >= b, [False, True, True]),
                             (a > 1.5, [False, True, True])]:
        assert result.dtype == np.bool_ and not result.requires_grad
        np.testing.assert_array_equal(result.numpy(), expected)


# --- the graph's lifetime --------------------------------------------------------------------


def test_second_backward_through_a_freed_graph_raises():
    x = tensor([1.0, 2.0])
    loss = (x * 2.0).exp().sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="freed"):
        loss.backward()


def test_backward_through_a_freed_intermediate_raises():
    x = tensor([1.0, 2.0])
    h = x.exp()
    h.sum().backward()
    with pytest.raises(RuntimeError, match="freed"):
        (h * 3.0).sum().backward()


def test_saved_arrays_are_released_after_backward():
    x = tensor(np.arange(6.0).reshape(2, 3))
    w, b = tensor(np.ones(3)), tensor(np.zeros(3))
    h = F.layer_norm(x, w, b)  # saves xhat and rstd for its backward
    ctx = weakref.ref(h._ctx)
    saved = weakref.ref(h._ctx.xhat)
    loss = (h * h).sum()
    loss.backward()
    gc.collect()
    assert h._ctx is None and loss._ctx is None
    assert ctx() is None, "the LayerNorm context outlived backward"
    assert saved() is None, "the array LayerNorm saved outlived backward"


# --- error messages name the shapes / devices -------------------------------------------------


def test_broadcast_mismatch_names_both_shapes():
    a, b = Tensor(np.zeros((2, 3))), Tensor(np.zeros(4))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4,\)"):
        a + b


def test_matmul_mismatch_names_both_shapes():
    a, b = Tensor(np.zeros((2, 3))), Tensor(np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 5\)"):
        a @ b


@pytest.mark.skipif(backend.default_device() != "cpu", reason="needs cpu as the default device")
def test_mixing_devices_raises_naming_both():
    a = Tensor(np.ones(3))
    b = Tensor(np.ones(3), device="strict")
    assert (a.device, b.device) == ("cpu", "strict")
    with pytest.raises(RuntimeError, match=r"cpu.*strict"):
        a + b
    with pytest.raises(RuntimeError, match=r"strict.*cpu"):
        b * a


def test_an_op_on_a_numpy_scalar_and_an_array_is_on_one_device():
    a, scalar = Tensor(np.ones(3, np.float32)), Tensor._from_array(np.float32(2.0))  # two types, one device
    np.testing.assert_array_equal((a * scalar).numpy(), np.full(3, 2.0, np.float32))


def test_an_op_that_fails_under_no_grad_keeps_nothing():
    """An op that records nothing runs on a spare instance, wiped after it: also when its
    forward raised (it must not hold on to its inputs' buffers)."""
    from tinygrad_lite import tensor as tensor_module
    a, b = Tensor(np.zeros((2, 3))), Tensor(np.zeros((4, 5)))
    with no_grad():
        with pytest.raises(ValueError):
            a @ b
    assert all(vars(ctx) == {} for ctx in tensor_module._spares.__dict__.values())


def test_to_strict_and_back_round_trip():
    t = Tensor(np.array([[1.0, 2.0], [3.0, 4.0]]), requires_grad=True)
    s = t.to("strict")
    assert s.device == "strict" and s.requires_grad
    c = s.to("cpu")
    assert c.device == "cpu" and c.dtype == np.float64
    assert type(c.data) is np.ndarray
    np.testing.assert_array_equal(c.numpy(), t.numpy())
    back = c.to("strict")
    assert back.device == "strict"
    np.testing.assert_array_equal(back.numpy(), t.numpy())
    assert t.to(t.device) is t


# --- unbroadcast ------------------------------------------------------------------------------


def reference_unbroadcast(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum over the axes broadcasting added or stretched, written out with np.sum."""
    extra = grad.ndim - len(shape)
    axes = list(range(extra))
    axes += [extra + i for i, n in enumerate(shape) if n == 1 and grad.shape[extra + i] != 1]
    return np.sum(grad, axis=tuple(axes)).reshape(shape)


@given(data=st.data())
def test_unbroadcast_sums_back_over_broadcast_axes(data):
    shape_a, shape_b = data.draw(broadcastable_shapes())
    full = np.broadcast_shapes(shape_a, shape_b)
    assert broadcast_shape(shape_a, shape_b) == full
    grad = data.draw(arrays(full))
    for shape in (shape_a, shape_b):
        out = unbroadcast(backend.asarray(grad, backend.default_device()), shape)
        assert tuple(out.shape) == shape
        np.testing.assert_allclose(host(out), reference_unbroadcast(grad, shape), rtol=1e-12, atol=1e-12)


@given(data=st.data())
def test_binary_op_gradients_have_the_input_shapes(data):
    shape_a, shape_b = data.draw(broadcastable_shapes())
    a, b = tensor(data.draw(arrays(shape_a))), tensor(data.draw(arrays(shape_b)))
    (a * b).sum().backward()
    assert a.grad.shape == shape_a and b.grad.shape == shape_b
    full = np.broadcast_shapes(shape_a, shape_b)
    expected_a = reference_unbroadcast(np.broadcast_to(b.numpy(), full), shape_a)
    np.testing.assert_allclose(host(a.grad), expected_a, rtol=1e-12, atol=1e-12)
