"""A Hypothesis gradient check for every differentiable op in the registry.

Each test draws random shapes (with broadcasting and size-1 dims) and values, and
checks backward() against central finite differences in float64 via `gradcheck`.
`test_every_op_has_a_gradient_test` fails when an op is added without one.
"""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, strategies as st

import tinygrad_lite.functional as F
from tinygrad_lite import Function, Tensor, backend, concatenate, fast, gradcheck, where

from strategies import (arrays, away_from_zero, axes, broadcastable_shapes, distinct,
                        matmul_shapes, shapes, small_dims, tensor)

GRADIENT_TESTED: set[str] = set()


def checks(*op_names):
    """Mark a test as the gradient check of these registry ops."""
    GRADIENT_TESTED.update(op_names)
    return lambda test: test


# --- arithmetic --------------------------------------------------------------------------

BINARY = {"Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b}


@checks("Add", "Sub", "Mul")
@pytest.mark.parametrize("name", sorted(BINARY))
@given(data=st.data())
def test_add_sub_mul(name, data):
    shape_a, shape_b = data.draw(broadcastable_shapes())
    a, b = tensor(data.draw(arrays(shape_a))), tensor(data.draw(arrays(shape_b)))
    gradcheck(BINARY[name], [a, b], name=name)


@checks("Div")
@given(data=st.data())
def test_div(data):
    shape_a, shape_b = data.draw(broadcastable_shapes())
    a, b = tensor(data.draw(arrays(shape_a))), tensor(data.draw(away_from_zero(shape_b, 0.5)))
    gradcheck(lambda a, b: a / b, [a, b], name="Div")


@checks("Pow")
@given(data=st.data())
def test_pow(data):
    shape_a, shape_b = data.draw(broadcastable_shapes())
    base = tensor(data.draw(arrays(shape_a, 0.3, 2.0)))  # a > 0: d/db a^b needs ln(a)
    exponent = tensor(data.draw(arrays(shape_b, -2.0, 3.0)))
    gradcheck(lambda a, b: a ** b, [base, exponent], name="Pow (tensor exponent)")
    power = data.draw(st.sampled_from([2, 3, 0.5, -1.0]))
    gradcheck(lambda a: a ** power, [base], name=f"Pow (a ** {power})")


@checks("Neg")
@given(data=st.data())
def test_neg(data):
    gradcheck(lambda a: -a, [tensor(data.draw(arrays(data.draw(shapes()))))], name="Neg")


@checks("MatMul")
@given(data=st.data())
def test_matmul(data):
    shape_a, shape_b = data.draw(matmul_shapes())
    a, b = tensor(data.draw(arrays(shape_a))), tensor(data.draw(arrays(shape_b)))
    gradcheck(lambda a, b: a @ b, [a, b], name="MatMul")


# --- elementwise functions ------------------------------------------------------------

UNARY = {  # name -> (function, values strategy factory)
    "Exp": (Tensor.exp, lambda s: arrays(s, -3, 3)),
    "Log": (Tensor.log, lambda s: arrays(s, 0.2, 4)),
    "Sqrt": (Tensor.sqrt, lambda s: arrays(s, 0.2, 4)),
    "ReLU": (Tensor.relu, lambda s: away_from_zero(s, 0.05)),  # stay off the kink at 0
    "Tanh": (Tensor.tanh, lambda s: arrays(s, -3, 3)),
    "Sigmoid": (Tensor.sigmoid, lambda s: arrays(s, -5, 5)),
    "Cast": (lambda x: x.astype("float64"), lambda s: arrays(s)),
}


@checks(*UNARY)
@pytest.mark.parametrize("name", sorted(UNARY))
@given(data=st.data())
def test_unary(name, data):
    fn, values = UNARY[name]
    x = tensor(data.draw(values(data.draw(shapes()))))
    gradcheck(fn, [x], name=name)


def test_cast_gradient_keeps_input_dtype():
    x = Tensor(np.ones(3, np.float32), requires_grad=True)
    x.astype("float64").sum().backward()
    assert x.grad.dtype == np.float32


@checks("Where")
@given(data=st.data())
def test_where(data):
    shape_a, shape_b = data.draw(broadcastable_shapes())
    condition = data.draw(arrays(shape_a)) > 0
    a, b = tensor(data.draw(arrays(shape_a))), tensor(data.draw(arrays(shape_b)))
    gradcheck(lambda a, b: where(condition, a, b), [a, b], name="Where")
    gradcheck(lambda b: b.masked_fill(condition, -1.5), [b], name="masked_fill")


# --- reductions -----------------------------------------------------------------------------


@checks("Sum")
@given(data=st.data())
def test_sum_and_mean(data):
    shape = data.draw(shapes())
    axis, keepdims = data.draw(axes(len(shape))), data.draw(st.booleans())
    x = tensor(data.draw(arrays(shape)))
    gradcheck(lambda x: x.sum(axis=axis, keepdims=keepdims), [x], name=f"Sum axis={axis}")
    gradcheck(lambda x: x.mean(axis=axis, keepdims=keepdims), [x], name=f"mean axis={axis}")


@checks("Max")
@given(data=st.data())
def test_max(data):
    shape = data.draw(shapes())
    axis, keepdims = data.draw(axes(len(shape))), data.draw(st.booleans())
    x = tensor(data.draw(distinct(shape)))  # no ties: max is differentiable there
    gradcheck(lambda x: x.max(axis=axis, keepdims=keepdims), [x], name=f"Max axis={axis}")


def test_max_ties_share_the_gradient():
    x = tensor([1.0, 3.0, 3.0])
    x.max().backward()
    np.testing.assert_allclose(backend.to_numpy(x.grad), [0, 0.5, 0.5])


# --- movement -------------------------------------------------------------------------------


@checks("Reshape")
@given(data=st.data())
def test_reshape(data):
    shape = data.draw(shapes(min_dims=1))
    size = int(np.prod(shape))
    new_shape = data.draw(st.sampled_from([(size,), (1, size), (size, 1), shape[::-1], (-1,)]))
    if np.prod(new_shape) not in (size, -size):
        new_shape = (size,)
    x = tensor(data.draw(arrays(shape)))
    gradcheck(lambda x: x.reshape(*new_shape), [x], name="Reshape")


@checks("Permute")
@given(data=st.data())
def test_permute_and_transpose(data):
    shape = data.draw(shapes(min_dims=2))
    order = data.draw(st.permutations(list(range(len(shape)))))
    x = tensor(data.draw(arrays(shape)))
    gradcheck(lambda x: x.permute(*order), [x], name="Permute")
    gradcheck(lambda x: x.transpose(0, -1), [x], name="transpose")


@checks("GetItem")
@given(data=st.data())
def test_getitem(data):
    shape = data.draw(shapes(min_dims=1))
    x = tensor(data.draw(arrays(shape)))
    start = data.draw(st.integers(0, shape[0] - 1))
    gradcheck(lambda x: x[start:], [x], name="GetItem slice")
    gradcheck(lambda x: x[start], [x], name="GetItem int")
    ids = np.array(data.draw(st.lists(st.integers(0, shape[0] - 1), min_size=1, max_size=6)))
    gradcheck(lambda x: x[ids], [x], name="GetItem int array (repeats add up)")
    if len(shape) >= 2:
        cols = np.array(data.draw(st.lists(st.integers(0, shape[1] - 1), min_size=1, max_size=4)))
        gradcheck(lambda x: x[:, cols], [x], name="GetItem [:, ids]")


@checks("Concatenate")
@given(data=st.data())
def test_concatenate_stack_split(data):
    shape = data.draw(shapes(min_dims=1))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    sizes = data.draw(st.lists(small_dims, min_size=1, max_size=3))
    parts = []
    for n in sizes:
        part_shape = list(shape)
        part_shape[axis] = n
        parts.append(tensor(data.draw(arrays(tuple(part_shape)))))
    gradcheck(lambda *p: concatenate(list(p), axis=axis), parts, name="Concatenate")
    same = [tensor(data.draw(arrays(shape))) for _ in sizes]
    from tinygrad_lite import stack
    gradcheck(lambda *p: stack(list(p), axis=0), same, name="stack")
    whole = tensor(data.draw(arrays((sum(sizes),) + tuple(shape[1:]))))
    gradcheck(lambda w: concatenate([p * (i + 1) for i, p in enumerate(w.split(sizes))]), [whole],
              name="split")


# --- the ops with three tiers (primitive, fused, fast) ------------------------------------
# Each test runs in every tier and names the Function classes it checks: the fused tier's
# (Fused...) and the fast tier's (Fast...; where the fast tier reuses a fused op, that one).
# The primitive tier has no classes of its own: its gradients are the primitives'.

TIERS = sorted(F.TIERS)


@checks("FusedGELU", "FastGELU")
@pytest.mark.parametrize("tier", TIERS)
@given(data=st.data())
def test_gelu(tier, data):
    x = tensor(data.draw(arrays(data.draw(shapes()), -4, 4)))
    with F.ops_tier(tier):
        gradcheck(F.gelu, [x], name=f"{tier} GELU")


@checks("FusedSoftmax", "FusedLogSoftmax", "FastSoftmax")
@pytest.mark.parametrize("tier", TIERS)
@given(data=st.data())
def test_softmax_log_softmax(tier, data):
    shape = data.draw(shapes(min_dims=1))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = tensor(data.draw(arrays(shape, -4, 4)))
    with F.ops_tier(tier):
        gradcheck(lambda x: x.softmax(axis), [x], name=f"{tier} Softmax")
        gradcheck(lambda x: x.log_softmax(axis), [x], name=f"{tier} LogSoftmax")


@st.composite
def logits_and_targets(draw):
    lead = draw(shapes(min_dims=1, max_dims=2))
    V = draw(st.integers(2, 6))
    logits = draw(arrays(lead + (V,), -4, 4))
    targets = draw(hnp_ints(lead, V))
    ignore = draw(st.sampled_from([None, -100, 0]))
    if ignore == -100 and targets.size > 1:
        targets.reshape(-1)[0] = -100
    return logits, targets, ignore


def hnp_ints(shape, upper):
    from hypothesis.extra import numpy as hnp
    return hnp.arrays(np.int64, shape, elements=st.integers(0, upper - 1))


@checks("FusedCrossEntropy")
@pytest.mark.parametrize("tier", TIERS)
@given(case=logits_and_targets())
def test_cross_entropy(tier, case):
    logits, targets, ignore = case
    with F.ops_tier(tier):
        gradcheck(lambda x: F.cross_entropy(x, targets, ignore_index=ignore), [tensor(logits)],
                  name=f"{tier} CrossEntropy")


@checks("FusedLayerNorm", "FastLayerNorm")
@pytest.mark.parametrize("tier", TIERS)
@given(data=st.data(), with_bias=st.booleans())
def test_layer_norm(tier, data, with_bias):
    shape = data.draw(shapes(min_dims=1))
    C = shape[-1] if shape[-1] > 1 else 2
    shape = shape[:-1] + (C,)
    x = tensor(data.draw(arrays(shape)) + data.draw(distinct((C,))) * 0.5)  # rows not constant
    w, b = tensor(data.draw(arrays((C,)))), tensor(data.draw(arrays((C,))))
    with F.ops_tier(tier):
        if with_bias:
            gradcheck(F.layer_norm, [x, w, b], name=f"{tier} LayerNorm")
        else:
            gradcheck(lambda x, w: F.layer_norm(x, w, None), [x, w], name=f"{tier} LayerNorm (no bias)")


@checks("FusedLinear", "FastLinear")
@pytest.mark.parametrize("tier", TIERS)
@given(data=st.data(), with_bias=st.booleans(), few_rows_product=st.booleans())
def test_linear(tier, data, with_bias, few_rows_product):
    lead = data.draw(shapes(min_dims=1, max_dims=2))
    n_in, n_out = data.draw(small_dims), data.draw(small_dims)
    x = tensor(data.draw(arrays(lead + (n_in,))))
    w, b = tensor(data.draw(arrays((n_out, n_in)))), tensor(data.draw(arrays((n_out,))))
    # the fast tier computes few rows as (W x^T)^T and many as x W^T: check both products
    rows_limit = fast.SMALL_ROWS if few_rows_product else 0
    with F.ops_tier(tier), mock.patch.object(fast, "SMALL_ROWS", rows_limit):
        if with_bias:
            gradcheck(F.linear, [x, w, b], name=f"{tier} Linear")
        else:
            gradcheck(lambda x, w: F.linear(x, w), [x, w], name=f"{tier} Linear (no bias)")


@checks("FusedEmbedding", "FastEmbedding")
@pytest.mark.parametrize("tier", TIERS)
@given(data=st.data())
def test_embedding(tier, data):
    V, C = data.draw(st.integers(1, 6)), data.draw(small_dims)
    ids = data.draw(hnp_ints(data.draw(shapes(min_dims=1, max_dims=2)), V))  # repeats likely
    with F.ops_tier(tier):
        gradcheck(lambda w: F.embedding(w, ids), [tensor(data.draw(arrays((V, C))))], name=f"{tier} Embedding")


@checks("FusedDropout")
@pytest.mark.parametrize("tier", TIERS)
@given(data=st.data(), p=st.sampled_from([0.1, 0.5, 0.9]))
def test_dropout(tier, data, p):
    x = tensor(data.draw(arrays(data.draw(shapes(min_dims=1)))))

    def dropped(x):
        backend.manual_seed(7)  # the same mask every call, so finite differences see one function
        return F.dropout(x, p, training=True)
    with F.ops_tier(tier):
        gradcheck(dropped, [x], name=f"{tier} Dropout")


@checks("FusedAttention", "FastAttention")
@pytest.mark.parametrize("tier", TIERS)
@given(data=st.data(), causal=st.booleans(), dropout=st.sampled_from([0.0, 0.3]))
def test_attention(tier, data, causal, dropout):
    B, H, D = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)), data.draw(small_dims)
    Tk = data.draw(small_dims)
    Tq = data.draw(st.integers(1, Tk))
    q = tensor(data.draw(arrays((B, H, Tq, D))))
    k, v = tensor(data.draw(arrays((B, H, Tk, D)))), tensor(data.draw(arrays((B, H, Tk, D))))

    def attention(q, k, v):
        backend.manual_seed(3)
        return F.scaled_dot_product_attention(q, k, v, causal=causal, dropout_p=dropout)
    with F.ops_tier(tier):
        gradcheck(attention, [q, k, v], name=f"{tier} Attention")


@checks("FastPackedAttention")
@given(data=st.data(), dropout=st.sampled_from([0.0, 0.3]))
def test_packed_attention(data, dropout):
    B, T, H, D = data.draw(st.integers(1, 2)), data.draw(small_dims), data.draw(st.integers(1, 2)), data.draw(small_dims)
    qkv = tensor(data.draw(arrays((B, T, 3 * H * D))))

    def attention(qkv):
        backend.manual_seed(3)
        return F.packed_causal_attention(qkv, H, dropout_p=dropout)
    with F.ops_tier("fast"):  # the only tier with a packed kernel
        gradcheck(attention, [qkv], name="FastPackedAttention")


# --- the meta-test ----------------------------------------------------------------------------


def test_every_op_has_a_gradient_test():
    ops = {name for name, cls in Function.registry.items()
           if cls.__module__.startswith("tinygrad_lite.") and "forward" in vars(cls)}
    missing = sorted(ops - GRADIENT_TESTED)
    assert not missing, f"ops without a Hypothesis gradient check: {missing}"
    assert len(ops) >= 35, sorted(ops)  # 21 primitives, 9 fused, 6 fast


def test_every_tier_has_every_op():
    """Each tier module offers the same functions, so switching tiers never breaks a model."""
    names = ("gelu", "softmax", "log_softmax", "cross_entropy", "layer_norm", "linear", "embedding",
             "dropout", "scaled_dot_product_attention")
    for tier, module in F.TIERS.items():
        missing = [n for n in names if not callable(getattr(module, n, None))]
        assert not missing, f"tier {tier} lacks {missing}"


def test_tier_switch_selects_and_restores():
    x = tensor(np.linspace(-2, 2, 6).reshape(2, 3))
    assert F.get_ops_tier() == "fast"
    ran = {}
    for tier in F.TIERS:
        with F.ops_tier(tier):
            out = F.gelu(x)
            ran[tier] = type(out._ctx).__name__
    assert ran == {"primitive": "Mul", "fused": "FusedGELU", "fast": "FastGELU"}
    assert F.get_ops_tier() == "fast"
    with pytest.raises(ValueError, match="unknown ops tier 'slow'; choose one of: primitive, fused, fast"):
        F.set_ops_tier("slow")


def test_two_ops_of_one_name_are_refused():
    with pytest.raises(TypeError, match="op name FusedGELU is taken"):
        type("FusedGELU", (Function,), {"__module__": "tinygrad_lite.fused_again"})
