"""The three ops tiers against each other, numerical stability, and dropout statistics.

Each op of functional.py runs in three tiers: primitive (primitive.py, compositions of
primitive ops), fused (fused.py, one op with a hand-derived backward) and fast (fast.py,
CPU kernels). Here every pair of tiers must give the same values and the same gradients
(float64, Hypothesis over shapes and values). Then the edge cases the ops exist to
survive, in every tier: logits of +-1e4, masked (-inf) entries, constant layer-norm
rows, and elementwise functions over wide ranges.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

import tinygrad_lite.functional as F
from tinygrad_lite import Tensor, backend, nn
from tinygrad_lite.ops import causal_mask

from strategies import arrays, shapes, small_dims, tensor

RTOL, ATOL = 1e-9, 1e-11


def host(x) -> np.ndarray:
    return x.numpy() if isinstance(x, Tensor) else backend.to_numpy(x)


TIERS = list(F.TIERS)  # primitive, fused, fast


def values_and_grads(fn, arrays_, tier: str, seed: int = 0):
    """fn on fresh float64 leaves made from `arrays_`, in `tier`, backpropagating a fixed
    random projection: (output, [each input's gradient]) as host arrays."""
    inputs = [tensor(a) for a in arrays_]
    with F.ops_tier(tier):
        backend.manual_seed(seed)  # dropout draws the same mask in every tier
        out = fn(*inputs)
        out.backward(Tensor(np.random.default_rng(seed).standard_normal(out.shape)))
    return out.numpy(), [host(x.grad) for x in inputs]


def assert_tiers_agree(fn, arrays_, seed: int = 0, rtol: float = RTOL, atol: float = ATOL) -> None:
    """fn (written with F.*) gives the same values and gradients in every pair of tiers."""
    results = {tier: values_and_grads(fn, arrays_, tier, seed) for tier in TIERS}
    for i, a in enumerate(TIERS):
        for b in TIERS[i + 1:]:
            (out_a, grads_a), (out_b, grads_b) = results[a], results[b]
            np.testing.assert_allclose(out_a, out_b, rtol=rtol, atol=atol, err_msg=f"values, {a} vs {b}")
            for j, (g_a, g_b) in enumerate(zip(grads_a, grads_b)):
                np.testing.assert_allclose(g_a, g_b, rtol=rtol, atol=atol, err_msg=f"gradient {j}, {a} vs {b}")


def int_arrays(shape, upper: int):
    return hnp.arrays(np.int64, shape, elements=st.integers(0, upper - 1))


# --- every pair of tiers agrees --------------------------------------------------------------------


@given(data=st.data())
def test_gelu(data):
    x = data.draw(arrays(data.draw(shapes()), -5, 5))
    assert_tiers_agree(F.gelu, [x])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gelu_far_from_zero_agrees_without_overflow_warnings(dtype):
    # the fast tier computes 0.5 (1 + tanh u) as 1 / (1 + exp(-2u)): exp must not overflow
    x = np.array([-1e4, -60.0, -12.0, -9.5, -3.0, -1e-3, 0.0, 1e-3, 3.0, 9.5, 60.0, 1e4], dtype=dtype)
    results = {}
    for tier in TIERS:
        leaf = Tensor(x, requires_grad=True)
        with F.ops_tier(tier), np.errstate(over="raise", invalid="raise", divide="raise"):
            out = F.gelu(leaf)
            out.backward(Tensor(np.ones_like(x)))
        assert out.data.dtype == dtype
        results[tier] = out.numpy(), host(leaf.grad)
    tol = 1e-6 if dtype == "float32" else 1e-12
    for tier, (out, grad) in results.items():
        np.testing.assert_allclose(out, results["primitive"][0], rtol=tol, atol=tol, err_msg=f"{tier} values")
        np.testing.assert_allclose(grad, results["primitive"][1], rtol=tol, atol=tol, err_msg=f"{tier} gradient")


@given(data=st.data())
def test_softmax_and_log_softmax(data):
    shape = data.draw(shapes(min_dims=1))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = data.draw(arrays(shape, -10, 10))
    assert_tiers_agree(lambda x: F.softmax(x, axis), [x])
    assert_tiers_agree(lambda x: F.log_softmax(x, axis), [x])


@given(data=st.data(), ignore_index=st.sampled_from([None, -100, 0, 2]))
def test_cross_entropy(data, ignore_index):
    lead = data.draw(shapes(min_dims=1, max_dims=2))
    V = data.draw(st.integers(2, 6))
    logits = data.draw(arrays(lead + (V,), -6, 6))
    targets = data.draw(int_arrays(lead, V))
    if ignore_index == -100:
        targets.reshape(-1)[:: 2] = -100  # every other position is padding
    assert_tiers_agree(lambda x: F.cross_entropy(x, targets, ignore_index=ignore_index), [logits])


def test_cross_entropy_with_every_position_ignored_is_zero():
    logits = np.random.default_rng(0).standard_normal((3, 4))
    targets = np.full(3, -100)
    assert_tiers_agree(lambda x: F.cross_entropy(x, targets, ignore_index=-100), [logits])
    x = tensor(logits)
    loss = F.cross_entropy(x, targets, ignore_index=-100)
    loss.backward()
    assert loss.item() == 0.0 and not host(x.grad).any()


@given(data=st.data(), with_bias=st.booleans())
def test_layer_norm(data, with_bias):
    lead = data.draw(shapes(max_dims=2))
    C_ = data.draw(st.integers(2, 6))
    x = data.draw(arrays(lead + (C_,), -3, 3))
    w, b = data.draw(arrays((C_,))), data.draw(arrays((C_,)))
    if with_bias:
        assert_tiers_agree(F.layer_norm, [x, w, b])
    else:
        assert_tiers_agree(lambda x, w: F.layer_norm(x, w), [x, w])


@given(data=st.data(), with_bias=st.booleans())
def test_linear(data, with_bias):
    lead = data.draw(shapes(min_dims=1, max_dims=3))
    n_in, n_out = data.draw(small_dims), data.draw(small_dims)
    x, w, b = data.draw(arrays(lead + (n_in,))), data.draw(arrays((n_out, n_in))), data.draw(arrays((n_out,)))
    if with_bias:
        assert_tiers_agree(F.linear, [x, w, b])
    else:
        assert_tiers_agree(lambda x, w: F.linear(x, w), [x, w])


@given(data=st.data())
def test_embedding(data):
    V, dim = data.draw(st.integers(1, 6)), data.draw(small_dims)
    ids = data.draw(int_arrays(data.draw(shapes(min_dims=1, max_dims=2)), V))  # repeats likely
    weight = data.draw(arrays((V, dim)))
    assert_tiers_agree(lambda w: F.embedding(w, ids), [weight])


@pytest.mark.parametrize("V", [7, 3000])
def test_embedding_backward_one_hot_and_scatter_paths_agree(V):
    """A small vocabulary's backward is a one-hot matmul, a big one's a scatter-add:
    both must be the per-row sums of the gradients."""
    from tinygrad_lite.fast import ONE_HOT_LIMIT
    rng = np.random.default_rng(V)
    ids = rng.integers(0, V, (4, 100))
    assert (V * ids.size > ONE_HOT_LIMIT) == (V == 3000)
    w = Tensor(rng.standard_normal((V, 8)).astype(np.float32), requires_grad=True)
    g = rng.standard_normal((4, 100, 8)).astype(np.float32)
    with F.ops_tier("fast"):  # the tier with the one-hot path
        F.embedding(w, ids).backward(Tensor(g))
    expected = np.zeros((V, 8), dtype=np.float64)
    np.add.at(expected, ids.reshape(-1), g.reshape(-1, 8).astype(np.float64))
    np.testing.assert_allclose(backend.to_numpy(w.grad), expected, rtol=1e-5, atol=1e-5)


@given(data=st.data(), causal=st.booleans(), dropout=st.sampled_from([0.0, 0.4]))
def test_scaled_dot_product_attention(data, causal, dropout):
    B, H, D = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)), data.draw(small_dims)
    Tk = data.draw(st.integers(1, 5))
    Tq = data.draw(st.integers(1, Tk))  # Tq < Tk is the KV-cache case
    q, k, v = (data.draw(arrays((B, H, T, D), -3, 3)) for T in (Tq, Tk, Tk))
    assert_tiers_agree(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal, dropout_p=dropout),
                       [q, k, v])


@given(data=st.data(), p=st.sampled_from([0.2, 0.7]))
def test_dropout(data, p):
    x = data.draw(arrays(data.draw(shapes(min_dims=1))))
    assert_tiers_agree(lambda x: F.dropout(x, p, training=True), [x])


def multi_head_attention(qkv: Tensor, n_head: int) -> Tensor:
    """(B, T, 3C) -> (B, T, C) step by step: split, heads, attention, merge (as model/attention.py)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.reshape(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(3, axis=2))
    y = F.scaled_dot_product_attention(q, k, v, causal=True)  # (B, nh, T, hs)
    return y.transpose(1, 2).reshape(B, T, C)


@given(data=st.data())
def test_packed_attention_equals_the_step_by_step_one_in_every_tier(data):
    B, T, H, D = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 5)), data.draw(st.integers(1, 3)), data.draw(small_dims)
    qkv = data.draw(arrays((B, T, 3 * H * D), -3, 3))
    out, grads = values_and_grads(lambda t: F.packed_causal_attention(t, H), [qkv], "fast")
    for tier in TIERS:
        ref_out, ref_grads = values_and_grads(lambda t: multi_head_attention(t, H), [qkv], tier)
        np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL, err_msg=f"values vs {tier}")
        np.testing.assert_allclose(grads[0], ref_grads[0], rtol=RTOL, atol=ATOL, err_msg=f"gradient vs {tier}")


def test_packed_attention_over_a_kv_cache_equals_the_whole_sequence():
    """Prefill 3 positions, then decode 1 and 2 more: the cache stores each step's keys and
    values, the kernel reads them; the same outputs as attending over all 6 at once. A
    cached call has no backward."""
    from model.kv_cache import KVCache
    B, T, H, D = 2, 6, 2, 3
    qkv = np.random.default_rng(5).standard_normal((B, T, 3 * H * D))
    with F.ops_tier("fast"):
        whole = F.packed_causal_attention(Tensor(qkv), H).numpy()
        cache = KVCache(1, B, H, 8, D, dtype="float64")
        pieces = []
        for a, b in ((0, 3), (3, 4), (4, 6)):
            cache.write_packed(0, Tensor(qkv[:, a:b]), a)
            pieces.append(F.packed_causal_attention(Tensor(qkv[:, a:b]), H, kv=cache.read(0, b)).numpy())
            cache.pos = b
        np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole, rtol=1e-12, atol=1e-12)
        t = Tensor(qkv[:, :2], requires_grad=True)
        with pytest.raises(RuntimeError, match="no backward through KV-cached attention"):
            F.packed_causal_attention(t, H, kv=cache.read(0, 2)).sum().backward()


def test_only_the_fast_tier_has_a_packed_kernel():
    qkv = Tensor(np.zeros((1, 2, 6)))
    for tier in ("primitive", "fused"):
        with F.ops_tier(tier):
            assert not F.has_packed_attention()
            with pytest.raises(RuntimeError, match=f"the '{tier}' ops tier has no packed attention kernel"):
                F.packed_causal_attention(qkv, 1)


# --- numerical stability: NumPy float64 references, in every tier --------------------------------


@pytest.fixture(params=TIERS)
def tier(request):
    """Run the test in each ops tier."""
    with F.ops_tier(request.param):
        yield request.param


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


BIG = np.array([[1e4, -1e4, 0.0, 1e4 - 1.0],
                [-1e4, -1e4 + 2.0, -1e4 + 1.0, -1e4],
                [3.0, -1e4, 1e4, 2.0]])
MASKED = np.array([[0.5, -np.inf, 1.5, -np.inf],
                   [-np.inf, -np.inf, -np.inf, 2.0],
                   [1e4, -np.inf, -1e4, 0.0]])
UPSTREAM = np.array([[0.3, -1.0, 2.0, 0.5],
                     [1.0, 0.2, -0.7, 1.5],
                     [-0.4, 0.8, 0.1, -2.0]])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("logits", [BIG, MASKED], ids=["big", "masked"])
def test_softmax_extreme_logits(logits, dtype, tier):
    x = Tensor(logits.astype(dtype), requires_grad=True)
    out = F.softmax(x)
    out.backward(Tensor(UPSTREAM.astype(dtype)))
    s = np_softmax(logits)
    expected_grad = s * (UPSTREAM - (UPSTREAM * s).sum(axis=-1, keepdims=True))
    tol = 1e-12 if dtype == "float64" else 1e-6
    assert np.isfinite(out.numpy()).all() and np.isfinite(host(x.grad)).all()
    np.testing.assert_allclose(out.numpy(), s, rtol=tol, atol=tol)
    np.testing.assert_allclose(host(x.grad), expected_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("logits", [BIG, MASKED], ids=["big", "masked"])
def test_log_softmax_extreme_logits(logits, dtype, tier):
    x = Tensor(logits.astype(dtype), requires_grad=True)
    out = F.log_softmax(x)
    out.backward(Tensor(UPSTREAM.astype(dtype)))
    expected = np_log_softmax(logits)
    expected_grad = UPSTREAM - np_softmax(logits) * UPSTREAM.sum(axis=-1, keepdims=True)
    finite = np.isfinite(logits)
    values = out.numpy()
    assert np.isfinite(values[finite]).all()
    assert (values[~finite] == -np.inf).all()  # log of probability 0: exactly -inf, not nan
    # NOTE: in float32 this needs (x - max) - log(sum) in that order: x - (max + log(sum))
    # rounds max + log(sum) to the float32 spacing of 1e4 (~1e-3) first
    rtol, atol = (1e-12, 1e-12) if dtype == "float64" else (1e-6, 1e-6)
    np.testing.assert_allclose(values[finite], expected[finite], rtol=rtol, atol=atol)
    assert np.isfinite(host(x.grad)).all()
    np.testing.assert_allclose(host(x.grad), expected_grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("logits", [BIG, MASKED], ids=["big", "masked"])
def test_cross_entropy_extreme_logits(logits, dtype, tier):
    targets = np.array([2, 3, 0])  # never a masked (-inf) entry
    x = Tensor(logits.astype(dtype), requires_grad=True)
    loss = F.cross_entropy(x, targets)
    loss.backward()
    rows = np.arange(3)
    expected = -np_log_softmax(logits)[rows, targets].mean()
    onehot = np.eye(4)[targets]
    expected_grad = (np_softmax(logits) - onehot) / 3
    assert np.isfinite(loss.item()) and np.isfinite(host(x.grad)).all()
    tol = 1e-6 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(loss.item(), expected, rtol=tol)
    np.testing.assert_allclose(host(x.grad), expected_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("value", [0.0, 0.1, -7.0, 1e3])
def test_layer_norm_on_constant_rows(value, dtype, tier):
    """A constant row has variance 0: eps keeps 1/sqrt(var + eps) finite, xhat = 0, out = bias."""
    rows = np.full((3, 5), value)
    w, b = np.linspace(0.5, 2.0, 5), np.linspace(-1.0, 1.0, 5)
    x_t, w_t, b_t = (Tensor(a.astype(dtype), requires_grad=True) for a in (rows, w, b))
    out = F.layer_norm(x_t, w_t, b_t)
    out.backward(Tensor(np.random.default_rng(0).standard_normal((3, 5)).astype(dtype)))
    assert np.isfinite(out.numpy()).all()
    atol = 1e-5 if dtype == "float32" else 1e-9
    np.testing.assert_allclose(out.numpy(), np.broadcast_to(b, (3, 5)), atol=atol)
    for t in (x_t, w_t, b_t):
        assert np.isfinite(host(t.grad)).all()
    if dtype == "float64":  # and the gradients agree in every tier
        assert_tiers_agree(F.layer_norm, [rows, w, b], rtol=1e-9, atol=1e-9)


def wide(low: float, high: float, dtype=np.float64):
    """1-D arrays of 1..8 values anywhere in [low, high]."""
    bits = np.dtype(dtype).itemsize * 8
    return hnp.arrays(dtype, st.integers(1, 8), elements=st.floats(low, high, allow_nan=False, width=bits))


def check_finite(fn, x: np.ndarray, expected: np.ndarray, expected_grad: np.ndarray,
                 rtol: float, atol: float = 0.0) -> None:
    """fn(x) and its gradient (of sum) are finite and match the float64 references."""
    t = Tensor(x, requires_grad=True)
    out = fn(t)
    out.sum().backward()
    assert np.isfinite(out.numpy()).all(), (x, out.numpy())
    assert np.isfinite(host(t.grad)).all(), (x, host(t.grad))
    np.testing.assert_allclose(out.numpy(), expected, rtol=rtol, atol=atol)
    np.testing.assert_allclose(host(t.grad), expected_grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(data=st.data())
def test_tanh_and_sigmoid_over_a_wide_range(dtype, data):
    x = data.draw(wide(-1e4, 1e4, dtype))
    x64 = x.astype(np.float64)
    rtol, atol = (1e-12, 1e-15) if dtype == np.float64 else (1e-5, 1e-7)
    t = np.tanh(x64)
    check_finite(Tensor.tanh, x, t, 1 - t * t, rtol, atol)
    # NOTE: the reference sigmoid picks the form whose exp() cannot overflow. The engine's
    # sigmoid goes through tanh, so far in the negative tail (s < 1e-16) it is exact
    # only absolutely: hence the atol.
    e = np.exp(-np.abs(x64))
    s = np.where(x64 >= 0, 1 / (1 + e), e / (1 + e))
    check_finite(Tensor.sigmoid, x, s, s * (1 - s), rtol, atol)


@given(x=wide(-700, 700))
def test_exp_over_a_wide_range(x):
    check_finite(Tensor.exp, x, np.exp(x), np.exp(x), rtol=1e-12)


@given(x=wide(1e-300, 1e300))
def test_log_over_a_wide_range(x):
    check_finite(Tensor.log, x, np.log(x), 1 / x, rtol=1e-12)


# --- attention's masking policy --------------------------------------------------------------


@pytest.mark.parametrize("tier_name", TIERS)
@given(Tk=st.integers(1, 12), data=st.data())
def test_causal_attention_never_masks_a_whole_row(tier_name, Tk, data):
    """Policy for fully-masked attention rows: they cannot happen.

    With causal attention the Tq queries are the last Tq of the Tk positions (the
    KV-cache case), so query i sees keys 0 .. i + Tk - Tq: always at least key 0. With
    Tq <= Tk no row of scores is all -inf, so the softmax never divides 0 by 0 and the
    output is always finite. Tq > Tk would make some queries see nothing; that is
    refused with a ValueError rather than given a made-up answer (zeros or nan).
    """
    Tq = data.draw(st.integers(1, Tk))
    xp = backend.namespace(backend.default_device())
    mask = backend.to_numpy(causal_mask(xp, Tq, Tk))
    assert mask.shape == (Tq, Tk)
    assert not mask.all(axis=-1).any()
    assert not mask[:, 0].any()  # every query sees the first key
    assert not mask[-1].any()  # the last query sees every key
    q, k, v = (tensor(np.random.default_rng(T).standard_normal((1, 2, T, 3)) * 30) for T in (Tq, Tk, Tk))
    with F.ops_tier(tier_name):
        out = F.scaled_dot_product_attention(q, k, v, causal=True)
        out.sum().backward()
    assert np.isfinite(out.numpy()).all()
    assert all(np.isfinite(host(t.grad)).all() for t in (q, k, v))


def test_causal_attention_with_more_queries_than_keys_raises(tier):
    q, k = tensor(np.zeros((1, 1, 4, 2))), tensor(np.zeros((1, 1, 3, 2)))
    with pytest.raises(ValueError, match="3 < 4"):
        F.scaled_dot_product_attention(q, k, k, causal=True)
    out = F.scaled_dot_product_attention(q, k, k, causal=False)  # fine without the mask
    assert out.shape == (1, 1, 4, 2)


# --- dropout ---------------------------------------------------------------------------------


def test_dropout_in_eval_mode_is_the_identity(tier):
    x = tensor(np.random.default_rng(0).standard_normal((4, 5)))
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0, training=True) is x
    layer = nn.Dropout(0.5)
    layer.eval()
    np.testing.assert_array_equal(layer(x).numpy(), x.numpy())


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_statistics(p, tier):
    n = 400_000
    backend.manual_seed(1234)
    x = Tensor(np.ones(n, np.float32), requires_grad=True)
    out = F.dropout(x, p, training=True)
    values = out.numpy()
    zeros = (values == 0).mean()
    # the count of zeros is Binomial(n, p); the mean of out is 1 with std sqrt(p/(1-p)/n)
    assert abs(zeros - p) < 5 * np.sqrt(p * (1 - p) / n)
    assert abs(values.mean() - 1.0) < 5 * np.sqrt(p / (1 - p) / n)
    np.testing.assert_allclose(values[values != 0], 1 / (1 - p), rtol=1e-6)
    out.sum().backward()
    np.testing.assert_array_equal(host(x.grad), values)  # d out / dx = the scaled mask


def test_dropout_is_reproducible_with_manual_seed(tier):
    x = Tensor(np.ones(1000))
    backend.manual_seed(5)
    a = F.dropout(x, 0.3, training=True).numpy()
    backend.manual_seed(5)
    b = F.dropout(x, 0.3, training=True).numpy()
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_probability_out_of_range_raises(p):
    x = tensor(np.ones(3))
    for training in (True, False):
        with pytest.raises(ValueError, match="dropout probability"):
            F.dropout(x, p, training=training)


# --- the fused tier reads as plain math ---------------------------------------------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
PLAIN_TIERS = ("tinygrad_lite/primitive.py", "tinygrad_lite/fused.py", "tinygrad_lite/fused_attention.py")
KERNEL_MODULES = {"fast", "fast_attention", "cpu", "parallel"}


def kernel_tricks(path) -> list[str]:
    """What in a file's source belongs to the fast layer: imports of it, the thread pool,
    writes into preallocated buffers (out=)."""
    import ast
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            names = {(node.module or "").split(".")[-1]} | {a.name for a in node.names}
            if names & KERNEL_MODULES or any("parallel_rows" in n or "row_blocks" in n for n in names):
                found.append(f"line {node.lineno}: imports {ast.unparse(node)}")
        elif isinstance(node, ast.Import) and any(a.name.split(".")[-1] in KERNEL_MODULES for a in node.names):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.keyword) and node.arg == "out":
            found.append(f"line {node.value.lineno}: writes into a buffer (out=)")
        elif isinstance(node, (ast.Name, ast.Attribute)) and getattr(node, "id", getattr(node, "attr", "")) in (
                "parallel_rows", "row_blocks", "ThreadPoolExecutor", "empty_like", "empty"):
            found.append(f"line {node.lineno}: uses {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("path", PLAIN_TIERS)
def test_the_readable_tiers_use_no_kernel_tricks(path):
    """A learner reads primitive.py and fused.py without meeting a buffer, a thread or a
    layout trick: no import of the fast layer or the thread pool, no out= buffers."""
    assert kernel_tricks(ROOT / path) == []


def test_the_kernel_trick_scan_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from .cpu import parallel_rows\nimport numpy as np\nnp.exp(x, out=y)\nz = np.empty_like(x)\n")
    assert [line.split(":")[0] for line in kernel_tricks(bad)] == ["line 1", "line 3", "line 4"]


def test_each_tier_names_its_ops():
    """Class names say their tier, so a fast GELU can never take the fused one's place."""
    from tinygrad_lite import Function
    for module, prefix in (("tinygrad_lite.fused", "Fused"), ("tinygrad_lite.fused_attention", "Fused"),
                           ("tinygrad_lite.fast", "Fast"), ("tinygrad_lite.fast_attention", "Fast")):
        ops = [name for name, cls in Function.registry.items() if cls.__module__ == module]
        assert ops and all(name.startswith(prefix) for name in ops), (module, ops)
