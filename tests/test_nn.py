"""Module bookkeeping (parameters, train/eval, state dicts), the layers against the
functional API, and the seed idea: an MLP of Neurons that learns XOR."""
from __future__ import annotations

import re

import numpy as np
import pytest

import tinygrad_lite.functional as F
from tinygrad_lite import Tensor, backend, manual_seed, optim
from tinygrad_lite.nn import MLP, Embedding, Layer, LayerNorm, Linear, Module, Neuron, Parameter


def host(x) -> np.ndarray:
    return x.numpy() if isinstance(x, Tensor) else backend.to_numpy(x)


class Block(Module):
    def __init__(self) -> None:
        self.fc = Linear(3, 4)
        self.ln = LayerNorm(4)


class Net(Module):
    """Nested modules, a list of modules, a bare parameter, and a tied weight."""

    def __init__(self) -> None:
        self.wte = Embedding(10, 3)
        self.blocks = [Block(), Block()]
        self.scale = Parameter(np.ones(3, np.float32))
        self.lm_head = Linear(3, 10, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one (10, 3) matrix, two uses


EXPECTED_NAMES = {"wte.weight", "scale",
                  "blocks.0.fc.weight", "blocks.0.fc.bias", "blocks.0.ln.weight", "blocks.0.ln.bias",
                  "blocks.1.fc.weight", "blocks.1.fc.bias", "blocks.1.ln.weight", "blocks.1.ln.bias"}


# --- Module ----------------------------------------------------------------------------


def test_named_parameters_finds_nested_modules_and_lists_and_ties_once():
    net = Net()
    names = [name for name, _ in net.named_parameters()]
    assert len(names) == len(set(names))
    assert set(names) == EXPECTED_NAMES  # lm_head.weight is wte.weight: listed once
    params = net.parameters()
    assert len({id(p) for p in params}) == len(params) == len(EXPECTED_NAMES)
    assert net.lm_head.weight is net.wte.weight
    assert net.num_parameters() == 10 * 3 + 3 + 2 * (4 * 3 + 4 + 4 + 4)
    assert all(p.requires_grad for p in params)


def test_train_and_eval_propagate():
    net = Net()
    assert all(m.training for m in net.modules())
    assert net.eval() is net
    modules = list(net.modules())
    assert len(modules) >= 8 and not any(m.training for m in modules)
    assert not net.blocks[1].ln.training
    net.train()
    assert all(m.training for m in net.modules())


def test_zero_grad_clears_every_parameter():
    net = Net()
    for p in net.parameters():
        p.grad = p.data * 0 + 1
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_state_dict_round_trip():
    manual_seed(0)
    a = Net()
    manual_seed(1)
    b = Net()
    state = a.state_dict()
    assert set(state) == EXPECTED_NAMES
    assert all(type(v) is np.ndarray for v in state.values())  # host copies, whatever the device
    b.load_state_dict(state)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(pa.numpy(), pb.numpy(), err_msg=name)
        assert pb.device == pa.device and pb.dtype == pa.dtype
    assert b.lm_head.weight is b.wte.weight  # loading keeps the tie
    state["scale"][0] = 123.0  # the state dict is a copy
    assert a.scale.numpy()[0] == 1.0


def test_load_state_dict_missing_key():
    net = Net()
    state = net.state_dict()
    del state["blocks.1.fc.bias"]
    with pytest.raises(KeyError, match=re.escape("blocks.1.fc.bias")):
        net.load_state_dict(state)


def test_load_state_dict_unexpected_key():
    net = Net()
    state = net.state_dict()
    state["blocks.2.fc.weight"] = np.zeros((4, 3), np.float32)
    with pytest.raises(KeyError, match=re.escape("blocks.2.fc.weight")):
        net.load_state_dict(state)


def test_load_state_dict_shape_mismatch_names_key_and_both_shapes():
    net = Net()
    state = net.state_dict()
    state["blocks.0.fc.weight"] = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"blocks\.0\.fc\.weight.*\(3, 4\).*\(4, 3\)"):
        net.load_state_dict(state)


# --- layers match the functional API -----------------------------------------------------


def test_linear():
    manual_seed(0)
    layer = Linear(5, 3)
    assert layer.weight.shape == (3, 5) and layer.bias.shape == (3,)
    bound = 1 / np.sqrt(5)
    assert np.abs(layer.weight.numpy()).max() <= bound
    x = Tensor(np.random.default_rng(0).standard_normal((2, 4, 5)).astype(np.float32))
    out = layer(x)
    assert out.shape == (2, 4, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out.numpy(), F.linear(x, layer.weight, layer.bias).numpy())
    expected = x.numpy() @ layer.weight.numpy().T + layer.bias.numpy()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert Linear(5, 3, bias=False).bias is None
    assert len(Linear(5, 3, bias=False).parameters()) == 1


def test_linear_keeps_its_weight_column_major_through_loads_gradients_and_the_optimizer():
    """Linear stores W column-major (its docstring says why). Every array the optimizer combines
    with W elementwise must be laid out alike, or the update runs 10-20x slower: a check on
    each place that makes one (the kernel's gradient, a load, the moments, their reload)."""
    from model.gpt import GPT, GPTConfig
    manual_seed(0)
    assert backend.column_major(Linear(5, 3).weight.data)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    weights = [p for name, p in model.named_parameters() if p.ndim == 2 and name.startswith("h.")]
    assert weights and all(backend.column_major(p.data) for p in weights)
    row_major = {name: np.ascontiguousarray(value) for name, value in model.state_dict().items()}
    model.load_state_dict(row_major)  # a checkpoint's arrays are row-major
    assert all(backend.column_major(p.data) for p in weights)
    np.testing.assert_array_equal(model.state_dict()["h.0.mlp.c_fc.weight"], row_major["h.0.mlp.c_fc.weight"])
    ids = np.random.default_rng(0).integers(0, 11, (2, 8))
    for tier in ("primitive", "fused", "fast"):
        with F.ops_tier(tier):
            model.zero_grad()
            model(ids, ids)[1].backward()
        assert all(backend.column_major(p.grad) for p in weights), tier
    opt = optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    moments = [opt.state[id(p)][name] for p in weights for name in ("exp_avg", "exp_avg_sq")]
    assert all(backend.column_major(m) for m in moments)
    fresh = optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict({**opt.state_dict(), "buffers": {k: np.ascontiguousarray(v)
                                                           for k, v in opt.state_dict()["buffers"].items()}})
    assert all(backend.column_major(fresh.state[id(p)]["exp_avg"]) for p in weights)
    for a in (np.arange(12.0).reshape(3, 4), np.asfortranarray(np.arange(12.0).reshape(3, 4))):
        flat = backend.flatten(a)  # memory order: a view, never a copy
        assert np.shares_memory(flat, a)
        np.testing.assert_array_equal(backend.unflatten(flat, a), a)
        assert backend.column_major(backend.unflatten(flat, a)) == backend.column_major(a)


def test_embedding():
    table = Embedding(10, 4)
    assert table.weight.shape == (10, 4)
    ids = np.array([[1, 9, 1], [0, 0, 5]])
    out = table(ids)
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out.numpy(), F.embedding(table.weight, ids).numpy())
    np.testing.assert_array_equal(out.numpy(), table.weight.numpy()[ids])
    out.sum().backward()
    counts = np.bincount(ids.ravel(), minlength=10)[:, None] * np.ones((1, 4))
    np.testing.assert_array_equal(host(table.weight.grad), counts)  # repeated ids add up


def test_layer_norm():
    norm = LayerNorm(6)
    np.testing.assert_array_equal(norm.weight.numpy(), np.ones(6))
    np.testing.assert_array_equal(norm.bias.numpy(), np.zeros(6))
    x = Tensor(np.random.default_rng(1).standard_normal((2, 3, 6)).astype(np.float32) * 4 + 2)
    out = norm(x)
    assert out.shape == (2, 3, 6)
    np.testing.assert_array_equal(out.numpy(), F.layer_norm(x, norm.weight, norm.bias).numpy())
    xn = x.numpy().astype(np.float64)
    expected = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)
    no_bias = LayerNorm(6, bias=False)
    assert no_bias.bias is None and len(no_bias.parameters()) == 1
    np.testing.assert_allclose(no_bias(x).numpy(), expected, rtol=1e-4, atol=1e-5)


# --- Neuron, Layer, MLP ------------------------------------------------------------------


def test_neuron_layer_mlp_shapes():
    x = Tensor(np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32))
    neuron = Neuron(3)
    out = neuron(x)
    assert out.shape == (5,)
    expected = np.tanh(x.numpy() @ neuron.w.numpy() + neuron.b.numpy())
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert Layer(3, 4)(x).shape == (5, 4)
    mlp = MLP([3, 8, 8, 1])
    assert mlp(x).shape == (5, 1)
    assert len(mlp.parameters()) == 2 * (8 + 8 + 1)  # a w and a b per neuron
    assert mlp.num_parameters() == 8 * 4 + 8 * 9 + 1 * 9
    assert mlp.layers[-1].neurons[0].activation == "linear"  # the output is not squashed
    with pytest.raises(ValueError, match="relu"):
        Neuron(3, activation="swish")


def xor_data(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Points in [-1, 1]^2 away from the axes; label +1 where x*y > 0, else -1."""
    x = rng.uniform(0.15, 1.0, size=(n, 2)) * rng.choice([-1.0, 1.0], size=(n, 2))
    y = np.sign(x[:, 0] * x[:, 1])
    return x.astype(np.float32), y.astype(np.float32)


def test_mlp_of_neurons_learns_xor():
    manual_seed(0)
    rng = np.random.default_rng(0)
    x_train, y_train = xor_data(128, rng)
    x_test, y_test = xor_data(256, rng)
    model = MLP([2, 8, 8, 1], activation="tanh")
    opt = optim.Adam(model.parameters(), lr=0.03)
    x, y = Tensor(x_train), Tensor(y_train)
    for _ in range(150):
        loss = ((model(x).reshape(-1) - y) ** 2).mean()  # squared error against +-1
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    accuracy = (np.sign(model(Tensor(x_test)).numpy().reshape(-1)) == y_test).mean()
    assert accuracy >= 0.95, f"test accuracy {accuracy:.3f} after training (final loss {loss.item():.4f})"
