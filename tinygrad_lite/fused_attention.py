"""Fused attention: softmax(q k^T / sqrt(D) + mask) v as one op, with its backward by hand.

Primitive ops would record a matmul, a scale, a mask, a softmax (five ops), a dropout
and a second matmul, and keep each one's output for the backward. As one op it keeps
only q, k, v and the attention weights P, and the backward is five lines of matrix
algebra.
"""
from __future__ import annotations

import math

from .backend import device_of, rand, xp_of
from .ops import causal_mask
from .tensor import Function


class FusedAttention(Function):
    """softmax(q k^T / sqrt(D) + mask) v for q (B, H, Tq, D), k and v (B, H, Tk, D).

    Output (B, H, Tq, D). With causal=True query i (the last Tq of the Tk positions, as
    with a KV cache) sees only keys at or before its own position.
    """

    def forward(self, q, k, v, causal=True, dropout_p=0.0):
        xp = xp_of(q)
        self.scale = 1.0 / math.sqrt(q.shape[-1])
        scores = (q @ xp.swapaxes(k, -1, -2)) * self.scale  # (B, H, Tq, Tk)
        if causal:  # a masked score becomes weight 0 after the softmax
            scores = xp.where(causal_mask(xp, q.shape[-2], k.shape[-2]), -xp.inf, scores)
        e = xp.exp(scores - scores.max(axis=-1, keepdims=True))
        self.P = e / e.sum(axis=-1, keepdims=True)  # (B, H, Tq, Tk): each row sums to 1
        self.mask = None
        if dropout_p > 0:  # drop attention weights, scale the rest by 1/(1-p)
            keep = rand(self.P.shape, device_of(q), q.dtype) >= dropout_p
            self.mask = keep * q.dtype.type(1.0 / (1.0 - dropout_p))
        self.q, self.k, self.v = q, k, v
        return self.weights() @ v  # (B, H, Tq, D)

    def weights(self):
        """The weights that multiply v: P, or P with dropout applied."""
        return self.P if self.mask is None else self.P * self.mask

    # with S = q k^T * scale, P = softmax(S), W = P * mask, O = W v:
    # dv = W^T dO;  dW = dO v^T;  dP = dW * mask;  dS = P * (dP - sum(dP * P));
    # dq = dS k * scale;  dk = dS^T q * scale
    def backward(self, grad):
        xp = xp_of(grad)
        dv = xp.swapaxes(self.weights(), -1, -2) @ grad  # (B, H, Tk, D)
        dP = grad @ xp.swapaxes(self.v, -1, -2)  # (B, H, Tq, Tk)
        if self.mask is not None:
            dP = dP * self.mask
        dS = self.P * (dP - (dP * self.P).sum(axis=-1, keepdims=True)) * self.scale
        dq = dS @ self.k  # (B, H, Tq, D)
        dk = xp.swapaxes(dS, -1, -2) @ self.q  # (B, H, Tk, D)
        return dq, dk, dv
