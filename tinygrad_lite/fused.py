"""Fused ops: several primitive ops done as one, with a hand-derived backward.

Each of these could be written from the primitives in `ops.py` (see `composed.py`,
where each one is, and the tests check both give the same values and gradients).
Fusing them saves the memory and time of every intermediate array, and lets the
backward use a simpler closed form than the chain of primitive backwards.
"""
from __future__ import annotations

import math

from .backend import device_of, parallel_rows, rand, scatter_add, xp_of
from .tensor import Function

# --- activations -----------------------------------------------------------------------

GELU_C = math.sqrt(2.0 / math.pi)


def _gelu_forward(x, t, out):
    """out = gelu(x), t = tanh(c (x + 0.044715 x^3)): in place, one block of rows."""
    xp = xp_of(x)
    xp.multiply(x, x, out=t)
    t *= 0.044715 * GELU_C
    t += GELU_C
    t *= x  # c (x + 0.044715 x^3)
    xp.tanh(t, out=t)
    xp.add(t, 1, out=out)
    out *= x
    out *= 0.5


def _gelu_backward(x, t, y, grad, d):
    """d = grad * gelu'(x), given t and the output y from the forward: in place, one block.

    gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) P with P = c (1 + 3 * 0.044715 x^2); since
    y = 0.5 x (1 + t), the second term is Q (1 - t) with Q = y P, so
    gelu'(x) = 0.5 + Q + t (0.5 - Q): nine passes over memory instead of eleven.
    """
    xp = xp_of(x)
    xp.multiply(x, x, out=d)
    d *= 3 * 0.044715 * GELU_C
    d += GELU_C  # P
    d *= y  # Q
    tmp = xp.subtract(0.5, d)
    tmp *= t
    d += tmp
    d += 0.5
    d *= grad


class GELU(Function):
    """GPT-2's GELU, tanh approximation: 0.5 x (1 + tanh(c (x + 0.044715 x^3))).

    NOTE: written as in-place steps on preallocated buffers, in row blocks on all CPU
    cores: a (B, T, 4C) activation is the largest array in the model, and every
    temporary costs a pass over memory.
    """

    def forward(self, x):
        xp = xp_of(x)
        x = xp.ascontiguousarray(x).reshape(x.shape)  # (ascontiguousarray makes 0-d into 1-d)
        t, out = xp.empty_like(x), xp.empty_like(x)
        parallel_rows(_gelu_forward, x.reshape(-1), t.reshape(-1), out.reshape(-1), chunked=True)
        self.x, self.t, self.out = x, t, out
        return out

    # d/dx gelu: 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2)  (see _gelu_backward)
    def backward(self, grad):
        xp = xp_of(grad)
        grad = xp.ascontiguousarray(grad).reshape(grad.shape)
        d = xp.empty_like(self.x)
        parallel_rows(_gelu_backward, self.x.reshape(-1), self.t.reshape(-1), self.out.reshape(-1),
                      grad.reshape(-1), d.reshape(-1), chunked=True)
        return (d,)


class Softmax(Function):
    """exp(x) / sum(exp(x)) along `axis`."""

    def forward(self, x, axis=-1):
        xp = xp_of(x)
        # NOTE: subtracting the row max changes nothing mathematically but keeps exp() <= 1
        s = x - x.max(axis=axis, keepdims=True)
        xp.exp(s, out=s)
        s /= s.sum(axis=axis, keepdims=True)
        self.s, self.axis = s, axis
        return s

    # d/dx softmax: s * (g - sum(g * s))
    def backward(self, grad):
        s = self.s
        return (s * (grad - (grad * s).sum(axis=self.axis, keepdims=True)),)


def _log_softmax(x, axis):
    """x - logsumexp(x) without overflow: (x - m) - log(sum(exp(x - m))), m the row max.

    NOTE: x - (m + log(sum(...))) would round m + log(...) to the spacing of m first
    (about 1e-3 for logits near 1e4 in float32); subtracting m first is exact.
    """
    xp = xp_of(x)
    m = x.max(axis=axis, keepdims=True)
    shifted = x - xp.where(xp.isfinite(m), m, 0)  # a row of all -inf gives no inf - inf here
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


class LogSoftmax(Function):
    """x - logsumexp(x) along `axis`."""

    def forward(self, x, axis=-1):
        # NOTE: log(softmax(x)) would give log(0) = -inf for tiny probabilities; going
        # through logsumexp keeps every value finite where the math is finite.
        self.out, self.axis = _log_softmax(x, axis), axis
        return self.out

    # d/dx log_softmax: g - softmax * sum(g)
    def backward(self, grad):
        xp = xp_of(grad)
        return (grad - xp.exp(self.out) * grad.sum(axis=self.axis, keepdims=True),)


# --- losses and normalisation ------------------------------------------------------------


def check_indices(indices, upper: int, what: str, ignore_index=None) -> None:
    """Raise IndexError if an index falls outside [0, upper). CuPy would wrap silently."""
    if indices.size == 0:
        return
    valid = indices if ignore_index is None else indices[indices != ignore_index]
    if valid.size and (int(valid.min()) < 0 or int(valid.max()) >= upper):
        bad = int(valid.min()) if int(valid.min()) < 0 else int(valid.max())
        raise IndexError(f"{what} {bad} is out of range for size {upper}")


class CrossEntropy(Function):
    """Mean over positions of -log softmax(logits)[target].

    logits (..., V), targets (...) integer class ids; positions whose target equals
    `ignore_index` count for nothing.
    """

    def forward(self, logits, targets, ignore_index=None):
        xp = xp_of(logits)
        V = logits.shape[-1]
        if tuple(targets.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"cross_entropy: targets shape {tuple(targets.shape)} does not match "
                             f"logits shape {tuple(logits.shape)} without its last axis")
        check_indices(targets, V, "cross_entropy: target", ignore_index)
        flat = logits.reshape(-1, V)  # (N, V)
        t = targets.reshape(-1)  # (N,)
        valid = xp.ones(t.shape, dtype=bool) if ignore_index is None else t != ignore_index
        t = xp.where(valid, t, 0)
        self.count = max(int(valid.sum()), 1)
        log_probs = _log_softmax(flat, axis=-1)  # (N, V)
        picked = log_probs[xp.arange(t.shape[0]), t]  # (N,)
        self.log_probs, self.t, self.valid, self.shape = log_probs, t, valid, logits.shape
        return -(picked * valid).sum() / self.count

    # d/dlogits CE = (softmax - onehot(target)) / count, zero on ignored rows
    def backward(self, grad):
        xp = xp_of(grad)
        d = xp.exp(self.log_probs)  # (N, V) softmax
        d[xp.arange(self.t.shape[0]), self.t] -= 1
        d *= (grad / self.count) * self.valid[:, None].astype(d.dtype)
        return d.reshape(self.shape), None


def _row_means(x):
    """(n, C) -> (n, 1) mean of each row.

    NOTE: as a mat-vec with a vector of 1/C: BLAS does it in one pass, where NumPy's
    sum(axis=-1) pays a fixed cost for each short row (~4x slower at C = 128).
    """
    xp = xp_of(x)
    return (x @ xp.full(x.shape[-1], 1.0 / x.shape[-1], dtype=x.dtype))[:, None]


def _layer_norm_forward(x, weight, bias, eps, out, xhat, rstd):
    """One block of rows (n, C): xhat = (x - mean) / sqrt(var + eps); out = xhat w + b."""
    xp = xp_of(x)
    xp.subtract(x, _row_means(x), out=xhat)  # centred
    var = _row_means(xp.multiply(xhat, xhat, out=out))  # (n, 1); `out` is free until the end
    xp.divide(1.0, xp.sqrt(var + eps), out=rstd)
    xhat *= rstd  # mean 0, variance 1
    xp.multiply(xhat, weight, out=out)
    if bias is not None:
        out += bias


def _layer_norm_backward(grad, xhat, rstd, weight, dx, g_xhat):
    """One block of rows: dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = g w."""
    xp = xp_of(grad)
    C = grad.shape[-1]
    xp.multiply(grad, xhat, out=g_xhat)  # kept: dw = sum over rows of g xhat
    mean_dxhat_xhat = (g_xhat @ weight)[:, None] * (1.0 / C)  # sum_c g w xhat, as a mat-vec
    xp.multiply(grad, weight, out=dx)  # dxhat
    dx -= _row_means(dx)
    dx -= xhat * mean_dxhat_xhat
    dx *= rstd


class LayerNorm(Function):
    """(x - mean) / sqrt(var + eps) * weight + bias, over the last axis. x (..., C).

    Rows are independent, so both passes run in row blocks on all CPU cores.
    """

    def forward(self, x, weight, bias, eps=1e-5):
        xp = xp_of(x)
        C = x.shape[-1]
        x2d = x.reshape(-1, C)  # (N, C)
        out, xhat = xp.empty_like(x2d), xp.empty_like(x2d)
        rstd = xp.empty((x2d.shape[0], 1), dtype=x.dtype)
        parallel_rows(lambda x, o, xh, r: _layer_norm_forward(x, weight, bias, eps, o, xh, r),
                      x2d, out, xhat, rstd)
        self.xhat, self.rstd, self.weight, self.has_bias = xhat, rstd, weight, bias is not None
        return out.reshape(x.shape)

    # dxhat = g w;  dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat));
    # dw = sum(g xhat), db = sum(g) over every axis but the last
    def backward(self, grad):
        xp = xp_of(grad)
        g2d = grad.reshape(self.xhat.shape)  # (N, C)
        dx, g_xhat = xp.empty_like(self.xhat), xp.empty_like(self.xhat)
        parallel_rows(lambda g, xh, r, d, gx: _layer_norm_backward(g, xh, r, self.weight, d, gx),
                      g2d, self.xhat, self.rstd, dx, g_xhat)
        dw = g_xhat.sum(axis=0) if self.needs_grad[1] else None
        db = g2d.sum(axis=0) if self.has_bias and self.needs_grad[2] else None
        return dx.reshape(grad.shape), dw, db


# --- layers ------------------------------------------------------------------------------


class Linear(Function):
    """x @ weight^T + bias, with x (..., in), weight (out, in) as in PyTorch, bias (out,)."""

    def forward(self, x, weight, bias=None):
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"linear: input has {x.shape[-1]} features but weight {tuple(weight.shape)} "
                             f"expects {weight.shape[1]}")
        self.x2d = x.reshape(-1, x.shape[-1])  # (N, in): one big BLAS call, not a batch of small ones
        self.weight, self.has_bias, self.in_shape = weight, bias is not None, x.shape
        out = self.x2d @ weight.T  # (N, out)
        if bias is not None:
            out += bias
        return out.reshape(*x.shape[:-1], weight.shape[0])

    # dx = g W,  dW = g^T x,  db = sum(g) over rows
    def backward(self, grad):
        g2d = grad.reshape(-1, grad.shape[-1])  # (N, out)
        dx = (g2d @ self.weight).reshape(self.in_shape) if self.needs_grad[0] else None
        dw = g2d.T @ self.x2d if self.needs_grad[1] else None
        db = g2d.sum(axis=0) if self.has_bias and self.needs_grad[2] else None
        return dx, dw, db


ONE_HOT_LIMIT = 1 << 20  # vocabulary x positions up to which Embedding's backward is a matmul


class Embedding(Function):
    """Rows of weight (V, C) picked by integer ids (...): output (..., C)."""

    def forward(self, weight, ids):
        check_indices(ids, weight.shape[0], "embedding: token id")
        self.ids, self.weight_shape = ids, weight.shape
        return weight[ids]

    # d/dweight: each picked row adds up the gradients of every position that picked it
    def backward(self, grad):
        xp = xp_of(grad)
        (V, C), ids = self.weight_shape, self.ids.reshape(-1)
        g = grad.reshape(-1, C)  # (N, C)
        if V * ids.shape[0] <= ONE_HOT_LIMIT:
            # NOTE: for a small vocabulary, one-hot (V, N) @ g is one BLAS call: ~5x faster
            # on the CPU than NumPy's scatter-add (np.add.at) for a character vocabulary
            one_hot = xp.zeros((V, ids.shape[0]), dtype=grad.dtype)
            one_hot[ids, xp.arange(ids.shape[0])] = 1
            return one_hot @ g, None
        dw = xp.zeros(self.weight_shape, dtype=grad.dtype)
        scatter_add(dw, ids, g)
        return dw, None


class Dropout(Function):
    """Zero each element with probability p, scale the rest by 1/(1-p) (inverted dropout)."""

    def forward(self, x, p):
        self.mask = (rand(x.shape, device_of(x), x.dtype) >= p) * x.dtype.type(1.0 / (1.0 - p))
        return x * self.mask

    # d/dx (x * mask) = mask
    def backward(self, grad):
        return (grad * self.mask,)


# --- attention: in its own file, fused_attention.py -------------------------------------

from .fused_attention import Attention, PackedAttention, causal_mask  # noqa: E402,F401
