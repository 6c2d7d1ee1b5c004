"""Optimizers against their update rules written out in NumPy (PyTorch's definitions),
the learning-rate schedule, gradient clipping, and exact resume from a state dict."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tinygrad_lite import Tensor, backend, optim
from tinygrad_lite.nn import Parameter

P0 = [np.array([1.0, -2.0, 3.0]), np.array([[0.5, -0.25], [2.0, 0.0]])]
GRADS = [  # GRADS[step][param]
    [np.array([0.1, -0.2, 0.3]), np.array([[1.0, -1.0], [0.5, 0.0]])],
    [np.array([-0.5, 0.4, 0.0]), np.array([[0.2, 0.3], [-0.1, 2.0]])],
    [np.array([0.2, 0.2, -0.1]), np.array([[-0.3, 0.1], [0.0, -1.5]])],
]


def host(x) -> np.ndarray:
    return x.numpy() if isinstance(x, Tensor) else backend.to_numpy(x)


def run_three_steps(make_optimizer) -> list[np.ndarray]:
    """Three steps from P0 with the gradients set by hand; the final parameters on the host."""
    params = [Parameter(p.copy()) for p in P0]  # float64: compare to ~1e-12
    opt = make_optimizer(params)
    for grads in GRADS:
        for p, g in zip(params, grads):
            p.grad = Tensor(g).data  # on the default device
        opt.step()
    return [p.numpy() for p in params]


def assert_params(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-14)


# --- reference update rules, written out (PyTorch's definitions) ----------------------------


def reference_sgd(lr, momentum=0.0, nesterov=False, weight_decay=0.0) -> list[np.ndarray]:
    out = []
    for i, p in enumerate(P0):
        p, buf = p.copy(), None
        for step, grads in enumerate(GRADS):
            g = grads[i] + weight_decay * p
            if momentum:
                buf = g.copy() if step == 0 else momentum * buf + g  # the buffer starts at g
                g = g + momentum * buf if nesterov else buf
            p = p - lr * g
        out.append(p)
    return out


def reference_adam(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False) -> list[np.ndarray]:
    beta1, beta2 = betas
    out = []
    for i, p in enumerate(P0):
        p, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
        for step, grads in enumerate(GRADS):
            t = step + 1
            g = grads[i]
            if decoupled:
                p = p * (1 - lr * weight_decay)  # AdamW: decay the weights directly
            else:
                g = g + weight_decay * p  # Adam: L2 through the gradient
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            m_hat = m / (1 - beta1 ** t)  # bias correction: m and v start at 0
            v_hat = v / (1 - beta2 ** t)
            p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(p)
    return out


@pytest.mark.parametrize("kwargs", [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                    dict(weight_decay=0.1), dict(momentum=0.8, nesterov=True, weight_decay=0.05)],
                         ids=["plain", "momentum", "nesterov", "weight_decay", "all"])
def test_sgd_matches_reference(kwargs):
    actual = run_three_steps(lambda params: optim.SGD(params, lr=0.1, **kwargs))
    assert_params(actual, reference_sgd(0.1, **kwargs))


@pytest.mark.parametrize("kwargs", [dict(), dict(weight_decay=0.1), dict(betas=(0.8, 0.99), eps=1e-3)],
                         ids=["plain", "l2", "betas_eps"])
def test_adam_matches_reference(kwargs):
    actual = run_three_steps(lambda params: optim.Adam(params, lr=0.01, **kwargs))
    assert_params(actual, reference_adam(0.01, **kwargs))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1, 0.5])
def test_adamw_matches_reference(weight_decay):
    actual = run_three_steps(lambda params: optim.AdamW(params, lr=0.01, weight_decay=weight_decay))
    assert_params(actual, reference_adam(0.01, weight_decay=weight_decay, decoupled=True))


def test_adamw_and_adam_differ_with_weight_decay():
    adam = run_three_steps(lambda params: optim.Adam(params, lr=0.01, weight_decay=0.5))
    adamw = run_three_steps(lambda params: optim.AdamW(params, lr=0.01, weight_decay=0.5))
    assert not np.allclose(adam[0], adamw[0])


def test_param_group_without_weight_decay_is_not_decayed():
    decayed, kept = Parameter(np.array([1.0, -2.0])), Parameter(np.array([3.0, 4.0]))
    opt = optim.AdamW([{"params": [decayed]}, {"params": [kept], "weight_decay": 0.0}],
                      lr=0.1, weight_decay=0.5)
    for _ in range(3):
        for p in (decayed, kept):
            p.grad = p.data * 0  # zero gradients: only weight decay can move a parameter
        opt.step()
    np.testing.assert_allclose(decayed.numpy(), np.array([1.0, -2.0]) * (1 - 0.1 * 0.5) ** 3, rtol=1e-12)
    np.testing.assert_array_equal(kept.numpy(), [3.0, 4.0])
    assert opt.param_groups[0]["weight_decay"] == 0.5 and opt.param_groups[1]["weight_decay"] == 0.0


def test_param_groups_have_their_own_lr():
    a, b = Parameter(np.array([1.0])), Parameter(np.array([1.0]))
    opt = optim.SGD([{"params": [a], "lr": 0.5}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = Tensor(np.array([1.0])).data, Tensor(np.array([1.0])).data
    opt.step()
    np.testing.assert_allclose(a.numpy(), [0.5])
    np.testing.assert_allclose(b.numpy(), [0.9])


def test_params_without_grad_are_skipped():
    a, b = Parameter(np.array([1.0])), Parameter(np.array([2.0]))
    opt = optim.Adam([a, b], lr=0.1)
    a.grad = Tensor(np.array([1.0])).data
    opt.step()
    assert a.numpy()[0] != 1.0 and b.numpy()[0] == 2.0


# --- the learning-rate schedule ---------------------------------------------------------------


def test_cosine_lr():
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_iters=4, decay_iters=14)
    # 1) warmup: (it + 1) / (warmup + 1) of max_lr
    assert [optim.cosine_lr(it, **kw) for it in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8], rel=1e-15)
    # 2) the peak, where the cosine starts
    assert optim.cosine_lr(4, **kw) == 1.0
    # 3) halfway through the decay: the midpoint of max and min
    assert optim.cosine_lr(9, **kw) == pytest.approx((1.0 + 0.1) / 2, rel=1e-14)
    # 4) from decay_iters on: min_lr
    assert optim.cosine_lr(14, **kw) == pytest.approx(0.1, rel=1e-15)
    assert optim.cosine_lr(15, **kw) == 0.1
    assert optim.cosine_lr(10_000, **kw) == 0.1
    decay = [optim.cosine_lr(it, **kw) for it in range(4, 16)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # never rises during the decay


def test_cosine_lr_nanogpt_numbers():
    kw = dict(max_lr=6e-4, min_lr=6e-5, warmup_iters=100, decay_iters=5000)
    assert optim.cosine_lr(0, **kw) == pytest.approx(6e-4 / 101, rel=1e-12)
    assert optim.cosine_lr(100, **kw) == pytest.approx(6e-4, rel=1e-12)
    assert optim.cosine_lr(2550, **kw) == pytest.approx(3.3e-4, rel=1e-12)
    assert optim.cosine_lr(5001, **kw) == 6e-5


# --- gradient clipping ---------------------------------------------------------------------------


def params_with_grads(*grads: np.ndarray) -> list[Parameter]:
    params = []
    for g in grads:
        p = Parameter(np.zeros_like(g))
        p.grad = Tensor(g).data
        params.append(p)
    return params


def global_norm(params) -> float:
    return math.sqrt(sum(float((host(p.grad) ** 2).sum()) for p in params))


def test_clip_grad_norm_returns_the_norm_and_clips_to_max_norm():
    grads = [np.array([3.0, -4.0]), np.array([[12.0]])]  # global norm 13
    params = params_with_grads(*grads)
    total = optim.clip_grad_norm(params, max_norm=1.0)
    assert total == pytest.approx(13.0, rel=1e-12)
    assert global_norm(params) == pytest.approx(1.0, abs=1e-5)
    for p, g in zip(params, grads):  # one common scale keeps the direction
        np.testing.assert_allclose(host(p.grad), g / 13.0, rtol=1e-5)


def test_clip_grad_norm_below_max_changes_nothing():
    grads = [np.array([0.3, -0.4])]  # norm 0.5
    params = params_with_grads(*grads)
    assert optim.clip_grad_norm(params, max_norm=1.0) == pytest.approx(0.5, rel=1e-12)
    np.testing.assert_array_equal(host(params[0].grad), grads[0])


def test_clip_grad_norm_does_not_double_scale_shared_gradients():
    a, b = Parameter(np.zeros(2)), Parameter(np.zeros(2))
    shared = Tensor(np.array([6.0, 8.0])).data  # one array, the .grad of two parameters
    a.grad = b.grad = shared
    total = optim.clip_grad_norm([a, b], max_norm=1.0)
    assert total == pytest.approx(math.sqrt(200.0), rel=1e-12)
    expected = np.array([6.0, 8.0]) / math.sqrt(200.0)
    np.testing.assert_allclose(host(a.grad), expected, rtol=1e-5)
    np.testing.assert_allclose(host(b.grad), expected, rtol=1e-5)
    np.testing.assert_array_equal(host(shared), [6.0, 8.0])  # the shared array itself is untouched


def test_clip_grad_norm_skips_params_without_grad():
    params = params_with_grads(np.array([3.0, 4.0]))
    params.append(Parameter(np.ones(2)))  # .grad is None
    assert optim.clip_grad_norm(params, max_norm=10.0) == pytest.approx(5.0)


def test_zero_grad_sets_grads_to_none():
    params = params_with_grads(np.array([1.0]), np.array([2.0, 3.0]))
    opt = optim.SGD(params, lr=0.1)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


# --- exact resume -----------------------------------------------------------------------------


def quadratic_step(params: list[Parameter], opt: optim.Optimizer, step: int) -> None:
    """One step on sum((p - target)^2 * weights) with gradients from the engine."""
    rng = np.random.default_rng(step)
    opt.zero_grad()
    loss = sum((((p - Tensor(rng.standard_normal(p.shape).astype(np.float32))) ** 2)
                * Tensor(rng.uniform(0.5, 2.0, p.shape).astype(np.float32))).sum() for p in params)
    loss.backward()
    opt.step()


@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
                                  lambda ps: optim.Adam(ps, lr=0.01, weight_decay=0.01),
                                  lambda ps: optim.AdamW(ps, lr=0.01)],
                         ids=["sgd", "adam", "adamw"])
def test_state_dict_round_trip_resumes_bitwise(make):
    init = [np.random.default_rng(9).standard_normal(s).astype(np.float32) for s in [(3, 4), (4,)]]

    straight = [Parameter(a.copy()) for a in init]
    opt = make(straight)
    for step in range(6):
        quadratic_step(straight, opt, step)

    first = [Parameter(a.copy()) for a in init]
    opt_first = make(first)
    for step in range(3):
        quadratic_step(first, opt_first, step)
    saved_params = [p.numpy() for p in first]
    saved_state = opt_first.state_dict()
    assert saved_state["step"] == 3 and saved_state["buffers"]
    assert all(type(v) is np.ndarray for v in saved_state["buffers"].values())

    resumed = [Parameter(a) for a in saved_params]  # a fresh process, as it were
    opt_resumed = make(resumed)
    opt_resumed.load_state_dict(saved_state)
    for step in range(3, 6):
        quadratic_step(resumed, opt_resumed, step)

    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        assert a.dtype == b.dtype == np.float32


# --- errors -------------------------------------------------------------------------------------


def test_empty_param_list_raises():
    for make in (optim.SGD, optim.Adam, optim.AdamW):
        with pytest.raises(ValueError, match="empty"):
            make([], lr=0.1)


def test_negative_lr_raises():
    for make in (optim.SGD, optim.Adam, optim.AdamW):
        with pytest.raises(ValueError, match="-0.5"):
            make([Parameter(np.zeros(2))], lr=-0.5)
    with pytest.raises(ValueError, match="-1"):
        optim.SGD([{"params": [Parameter(np.zeros(2))], "lr": -1.0}], lr=0.1)


def test_nesterov_without_momentum_raises():
    with pytest.raises(ValueError, match="momentum"):
        optim.SGD([Parameter(np.zeros(2))], lr=0.1, nesterov=True)
