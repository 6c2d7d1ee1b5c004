"""The fused tier: each op as one Function, with its backward derived by hand.

Each op here is several primitive ops done as one (see `primitive.py`, where each is
written from primitives, and the tests that check both give the same values and
gradients). One op saves the memory and time of every intermediate array, and its
backward can use a closed form much simpler than the chain of primitive backwards.
This is what real frameworks do; read each forward beside its backward.

Written as plain math: no buffers, no threads, no layout tricks (those are `fast.py`'s).
Inputs arrive checked by functional.py (shapes, integer ids in range).
"""
from __future__ import annotations

import math

from .backend import column_major, device_of, rand, scatter_add, xp_of
from .fused_attention import FusedAttention
from .tensor import Function

GELU_C = math.sqrt(2.0 / math.pi)  # GPT-2's tanh approximation of GELU

# --- activations -----------------------------------------------------------------------


class FusedGELU(Function):
    """GPT-2's GELU, tanh approximation: 0.5 x (1 + tanh(c (x + 0.044715 x^3)))."""

    def forward(self, x):
        self.x = x
        # NOTE: x * x * x, not x ** 3: NumPy's power() is a slow general pow, ~20x the time
        self.t = xp_of(x).tanh(GELU_C * (x + 0.044715 * x * x * x))
        return 0.5 * x * (1 + self.t)

    # d/dx gelu = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2),  t = tanh(...)
    def backward(self, grad):
        x, t = self.x, self.t
        inner = GELU_C * (1 + 3 * 0.044715 * x * x)  # d/dx of c (x + 0.044715 x^3)
        return (grad * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * inner),)


class FusedSoftmax(Function):
    """exp(x) / sum(exp(x)) along `axis`."""

    def forward(self, x, axis=-1):
        # NOTE: subtracting the row max changes nothing mathematically but keeps exp() <= 1
        e = xp_of(x).exp(x - x.max(axis=axis, keepdims=True))
        self.s, self.axis = e / e.sum(axis=axis, keepdims=True), axis
        return self.s

    # d/dx softmax: s * (g - sum(g * s))
    def backward(self, grad):
        s = self.s
        return (s * (grad - (grad * s).sum(axis=self.axis, keepdims=True)),)


def log_softmax_array(x, axis):
    """x - logsumexp(x) without overflow: (x - m) - log(sum(exp(x - m))), m the row max.

    NOTE: x - (m + log(sum(...))) would round m + log(...) to the spacing of m first
    (about 1e-3 for logits near 1e4 in float32); subtracting m first is exact.
    """
    xp = xp_of(x)
    m = x.max(axis=axis, keepdims=True)
    shifted = x - xp.where(xp.isfinite(m), m, 0)  # a row of all -inf gives no inf - inf here
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


class FusedLogSoftmax(Function):
    """x - logsumexp(x) along `axis`."""

    def forward(self, x, axis=-1):
        # NOTE: log(softmax(x)) would give log(0) = -inf for tiny probabilities; going
        # through logsumexp keeps every value finite where the math is finite.
        self.out, self.axis = log_softmax_array(x, axis), axis
        return self.out

    # d/dx log_softmax: g - softmax * sum(g)
    def backward(self, grad):
        return (grad - xp_of(grad).exp(self.out) * grad.sum(axis=self.axis, keepdims=True),)


# --- losses and normalisation ------------------------------------------------------------


class FusedCrossEntropy(Function):
    """Mean over positions of -log softmax(logits)[target].

    logits (..., V), targets (...) integer class ids; positions whose target equals
    `ignore_index` count for nothing.
    """

    def forward(self, logits, targets, ignore_index=None):
        xp = xp_of(logits)
        flat, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)  # (N, V), (N,)
        valid = xp.ones(t.shape, dtype=bool) if ignore_index is None else t != ignore_index
        self.t, self.valid = xp.where(valid, t, 0), valid  # an ignored row picks class 0, weight 0
        self.count = max(int(valid.sum()), 1)
        self.log_probs, self.shape = log_softmax_array(flat, axis=-1), logits.shape  # (N, V)
        picked = self.log_probs[xp.arange(t.shape[0]), self.t]  # (N,)
        return -(picked * valid).sum() / self.count

    # d/dlogits CE = (softmax - onehot(target)) / count, zero on ignored rows
    def backward(self, grad):
        xp = xp_of(grad)
        d = xp.exp(self.log_probs)  # (N, V) softmax
        d[xp.arange(self.t.shape[0]), self.t] -= 1
        weight = (grad / self.count) * self.valid[:, None].astype(d.dtype)  # (N, 1)
        return (d * weight).reshape(self.shape), None


class FusedLayerNorm(Function):
    """(x - mean) / sqrt(var + eps) * weight + bias, over the last axis. x (..., C)."""

    def forward(self, x, weight, bias, eps=1e-5):
        xc = x - x.mean(axis=-1, keepdims=True)  # centred
        self.rstd = 1 / xp_of(x).sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
        self.xhat = xc * self.rstd  # mean 0, variance 1
        self.weight, self.has_bias = weight, bias is not None
        out = self.xhat * weight
        return out + bias if bias is not None else out

    # dxhat = g w;  dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat));
    # dw = sum(g xhat), db = sum(g) over every axis but the last
    def backward(self, grad):
        dxhat = grad * self.weight
        dx = self.rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                          - self.xhat * (dxhat * self.xhat).mean(axis=-1, keepdims=True))
        rows = tuple(range(grad.ndim - 1))
        dw = (grad * self.xhat).sum(axis=rows) if self.needs_grad[1] else None
        db = grad.sum(axis=rows) if self.has_bias and self.needs_grad[2] else None
        return dx, dw, db


# --- layers ------------------------------------------------------------------------------


class FusedLinear(Function):
    """x @ weight^T + bias, with x (..., in), weight (out, in) as in PyTorch, bias (out,)."""

    def forward(self, x, weight, bias=None):
        self.x2d = x.reshape(-1, x.shape[-1])  # (N, in): every position is a row
        self.weight, self.has_bias, self.in_shape = weight, bias is not None, x.shape
        out = self.x2d @ weight.T  # (N, out)
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], weight.shape[0])

    # dx = g W,  dW = g^T x,  db = sum(g) over rows
    def backward(self, grad):
        g2d = grad.reshape(-1, grad.shape[-1])  # (N, out)
        dx = (g2d @ self.weight).reshape(self.in_shape) if self.needs_grad[0] else None
        dw = None
        if self.needs_grad[1]:  # (in the weight's layout: the optimizer combines them elementwise)
            dw = (self.x2d.T @ g2d).T if column_major(self.weight) else g2d.T @ self.x2d
        db = g2d.sum(axis=0) if self.has_bias and self.needs_grad[2] else None
        return dx, dw, db


class FusedEmbedding(Function):
    """Rows of weight (V, C) picked by integer ids (...): output (..., C)."""

    def forward(self, weight, ids):
        self.ids, self.weight_shape = ids, weight.shape
        return weight[ids]

    # d/dweight: each picked row adds up the gradients of every position that picked it
    def backward(self, grad):
        dw = xp_of(grad).zeros(self.weight_shape, dtype=grad.dtype)
        scatter_add(dw, self.ids.reshape(-1), grad.reshape(-1, self.weight_shape[1]))
        return dw, None


class FusedDropout(Function):
    """Zero each element with probability p, scale the rest by 1/(1-p) (inverted dropout)."""

    def forward(self, x, p):
        self.mask = (rand(x.shape, device_of(x), x.dtype) >= p) * x.dtype.type(1.0 / (1.0 - p))
        return x * self.mask

    # d/dx (x * mask) = mask
    def backward(self, grad):
        return (grad * self.mask,)


# --- the tier's functions (what functional.py calls when this tier is selected) ----------


# NOTE: an op whose arguments are all inputs is its own apply (one Python call less per op,
# which a decoded token, ~50 small ops, notices); the others pass their options by name
gelu = FusedGELU.apply  # (x)
linear = FusedLinear.apply  # (x, weight, bias)
embedding = FusedEmbedding.apply  # (weight, ids)
def softmax(x, axis=-1): return FusedSoftmax.apply(x, axis=axis)
def log_softmax(x, axis=-1): return FusedLogSoftmax.apply(x, axis=axis)
def cross_entropy(logits, targets, ignore_index=None): return FusedCrossEntropy.apply(logits, targets, ignore_index=ignore_index)
def layer_norm(x, weight, bias=None, eps=1e-5): return FusedLayerNorm.apply(x, weight, bias, eps=eps)
def dropout(x, p): return FusedDropout.apply(x, p=p)


def scaled_dot_product_attention(q, k, v, causal=True, dropout_p=0.0):
    return FusedAttention.apply(q, k, v, causal=causal, dropout_p=dropout_p)
