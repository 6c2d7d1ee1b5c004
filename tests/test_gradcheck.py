"""gradcheck itself: it passes on correct ops, and it can fail, with a message that
names the op, the input, the element and both values."""
from __future__ import annotations

import re

import numpy as np
import pytest

from tinygrad_lite import Function, Tensor, gradcheck
from tinygrad_lite.backend import xp_of
from tinygrad_lite.gradcheck import GradcheckError

from strategies import tensor


class WrongExp(Function):
    """exp with a backward that is off by a factor of 2 (the right one is grad * e^a)."""

    def forward(self, a):
        self.out = xp_of(a).exp(a)
        return self.out

    def backward(self, grad):
        return (2 * grad * self.out,)


class ExpWrongAtTwo(Function):
    """exp whose gradient is off by exactly +1 at element 2 of a 1-D input, right elsewhere."""

    def forward(self, a):
        self.out = xp_of(a).exp(a)
        return self.out

    def backward(self, grad):
        wrong = grad * self.out
        wrong[2] += 1.0
        return (wrong,)


def parse(message: str) -> tuple[float, float]:
    """The analytic and numeric values out of a GradcheckError message."""
    number = r"(-?[\d.]+(?:e[-+]?\d+)?)"
    found = re.search(rf"analytic {number} vs numeric {number}", message)
    assert found, message
    return float(found.group(1)), float(found.group(2))


def test_gradcheck_passes_on_correct_ops():
    x = tensor([0.5, -1.0, 2.0])
    w = tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]])
    assert gradcheck(lambda x: x.exp() * x.tanh(), [x], name="exp*tanh") is True
    assert gradcheck(lambda x, w: (x.reshape(1, 3) @ w).sigmoid(), [x, w], name="matmul") is True


def test_gradcheck_catches_a_wrong_backward_and_says_where():
    x = tensor([0.5, -1.0, 2.0])
    with pytest.raises(GradcheckError) as error:
        gradcheck(lambda x: WrongExp.apply(x), [x], name="WrongExp")
    message = str(error.value)
    assert "WrongExp" in message and "input 0" in message
    assert re.search(r"element \(\d,\)", message), message
    analytic, numeric = parse(message)
    assert analytic == pytest.approx(2 * numeric, rel=1e-6)  # the factor the bug put in


def test_gradcheck_names_the_exact_element_and_both_values():
    x = tensor([0.5, -1.0, 2.0, 0.0])
    with pytest.raises(GradcheckError) as error:
        gradcheck(lambda x: ExpWrongAtTwo.apply(x), [x], name="ExpWrongAtTwo")
    message = str(error.value)
    assert "ExpWrongAtTwo" in message and "element (2,)" in message
    assert "1 of 4 checks failed" in message
    analytic, numeric = parse(message)
    assert analytic - numeric == pytest.approx(1.0, rel=1e-5)


def test_gradcheck_names_the_input_by_its_position():
    const = Tensor(np.array([1.0, 2.0, 3.0]))  # no requires_grad: not checked
    good, bad = tensor([0.1, 0.2, 0.3]), tensor([0.5, -1.0, 2.0])
    with pytest.raises(GradcheckError, match="input 2"):
        gradcheck(lambda c, g, b: c * g + WrongExp.apply(b), [const, good, bad], name="mixed")


def test_random_direction_path_catches_a_wrong_backward():
    x = tensor(np.random.default_rng(0).uniform(-1, 1, size=(10, 10)))  # 100 > max_elements
    assert gradcheck(lambda x: x.exp(), [x], max_elements=64, name="exp") is True
    with pytest.raises(GradcheckError) as error:
        gradcheck(lambda x: WrongExp.apply(x), [x], max_elements=64, name="WrongExp")
    message = str(error.value)
    assert "WrongExp" in message and "input 0" in message and "random direction" in message
    analytic, numeric = parse(message)
    assert analytic == pytest.approx(2 * numeric, rel=1e-5)


def test_gradcheck_leaves_the_inputs_unchanged():
    values = np.array([[0.5, -1.0], [2.0, 0.25]])
    x = tensor(values)
    big = tensor(np.arange(80.0) / 80)
    gradcheck(lambda x, big: x.exp().sum() + big.tanh().sum(), [x, big])
    np.testing.assert_array_equal(x.numpy(), values)
    np.testing.assert_array_equal(big.numpy(), np.arange(80.0) / 80)


def test_gradcheck_rejects_float32():
    x = Tensor(np.ones(3, np.float32), requires_grad=True)
    with pytest.raises(TypeError, match="float32"):
        gradcheck(lambda x: x.exp(), [x], name="exp")


def test_gradcheck_needs_an_input_that_requires_grad():
    x = Tensor(np.ones(3))
    with pytest.raises(ValueError, match="requires_grad"):
        gradcheck(lambda x: x.exp(), [x], name="exp")


def test_gradcheck_error_is_an_assertion_error():
    assert issubclass(GradcheckError, AssertionError)  # pytest shows it as a failed check
