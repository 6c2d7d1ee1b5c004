"""Hypothesis strategies for tensors: shapes, broadcastable pairs, matmul pairs, and
values kept away from kinks and ties (ReLU at 0, equal maxima) so checks never flake."""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tinygrad_lite import Tensor

small_dims = st.integers(min_value=1, max_value=4)


def shapes(min_dims: int = 0, max_dims: int = 3):
    return st.lists(small_dims, min_size=min_dims, max_size=max_dims).map(tuple)


def arrays(shape, low: float = -2.0, high: float = 2.0):
    """float64 arrays of `shape` with values in [low, high]."""
    return hnp.arrays(np.float64, shape, elements=st.floats(low, high, allow_nan=False,
                                                             allow_infinity=False, width=64))


@st.composite
def away_from_zero(draw, shape, low: float = 0.3, high: float = 2.0):
    """Values with |x| in [low, high]: safe for division, ReLU's kink, log of |x|."""
    magnitude = draw(arrays(shape, low, high))
    signs = draw(hnp.arrays(np.bool_, shape))
    return np.where(signs, magnitude, -magnitude)


@st.composite
def distinct(draw, shape):
    """Values that are all different (no ties for max), spread over about [-2, 2]."""
    size = int(np.prod(shape)) if shape else 1
    order = draw(st.permutations(list(range(size))))
    return (np.array(order, dtype=np.float64).reshape(shape) - size / 2) * (4.0 / max(size, 1))


@st.composite
def broadcastable_shapes(draw, min_dims: int = 0):
    """A pair of shapes that NumPy broadcasts together, with size-1 and missing dims."""
    full = draw(shapes(min_dims=min_dims))
    other = list(full[draw(st.integers(0, len(full))):])  # drop some leading dims
    for i in range(len(other)):
        if draw(st.booleans()):
            other[i] = 1
    pair = [full, tuple(other)]
    if draw(st.booleans()):
        pair.reverse()
    return tuple(pair)


@st.composite
def matmul_shapes(draw):
    """(..., n, k) and (..., k, m) with broadcast batch dims."""
    n, k, m = draw(small_dims), draw(small_dims), draw(small_dims)
    batch_a, batch_b = draw(broadcastable_shapes())
    batch_a, batch_b = batch_a[-2:], batch_b[-2:]  # trailing dims: broadcasting aligns from the right
    if len(batch_a) != len(batch_b) and draw(st.booleans()):
        batch_a = batch_b = batch_a  # sometimes the same batch
    return batch_a + (n, k), batch_b + (k, m)


def axes(ndim: int):
    """None, one axis (maybe negative) or a tuple of distinct axes."""
    if ndim == 0:
        return st.none()
    one = st.integers(-ndim, ndim - 1)
    many = st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True).map(tuple)
    return st.one_of(st.none(), one, many)


def tensor(array, requires_grad: bool = True) -> Tensor:
    """A float64 tensor on the default device (so the suite also runs on strict/cuda)."""
    return Tensor(np.asarray(array, dtype=np.float64), requires_grad=requires_grad)
