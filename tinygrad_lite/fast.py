"""The fast tier: the fused tier's math again, as kernels tuned for the CPU.

A learner can skip this file: it computes exactly what `fused.py` computes (the tests
check it, values and gradients), only with fewer passes over memory. The tricks:
  - in-place steps on preallocated buffers (`out=`): every temporary array costs a pass
    over memory, and a (B, T, 4C) GELU input is the largest array in the model;
  - row blocks on all CPU cores (`cpu.parallel_rows`): NumPy runs a ufunc on one core;
  - cache-sized pieces when one core runs a kernel of several passes;
  - row means as mat-vecs, a one-hot matmul for a small vocabulary's embedding backward;
  - attention with its scores stored keys-first, and packed attention straight from
    c_attn's output (fast_attention.py).
  - for the few rows of a decoded token: linear as (W x^T)^T, layer norm without the thread
    pool, attention over the KV cache without the keys-first layout.
Where the fused op has nothing to gain (log-softmax, cross-entropy, dropout), this tier
runs the fused op itself. Later CUDA kernels belong in this layer too.
"""
from __future__ import annotations

from .backend import column_major, scatter_add, xp_of
from .cpu import CHUNK_ELEMENTS, PARALLEL_MIN_SIZE, parallel_rows, small_matmul
from .fast_attention import FastAttention, FastPackedAttention
from .fused import GELU_C, FusedLinear, cross_entropy, dropout, log_softmax  # noqa: F401  (this tier's too)
from .tensor import Function

# --- GELU ----------------------------------------------------------------------------------


def _gelu_exp(x, e):
    """e = exp(-2u), u = c (x + 0.044715 x^3): in place into e.

    The fused tier's gate 0.5 (1 + tanh u) is sigmoid(2u) = 1 / (1 + e): the same number.
    NOTE: NumPy's float32 exp is about twice as fast as its tanh (1024 x 512: 0.80 against
    1.68 ms on one core, 2-core AMD EPYC VM), and GELU is the model's largest elementwise
    op. -2u is capped at 80 so exp cannot overflow: from there on the gate is < 2e-35,
    and gelu(x) is 0 to float32 anyway.
    """
    xp = xp_of(x)
    xp.multiply(x, x, out=e)
    e *= -2 * 0.044715 * GELU_C
    e -= 2 * GELU_C
    e *= x  # -2u
    xp.minimum(e, 80, out=e)
    xp.exp(e, out=e)


def _gelu_forward(x, out):
    """out = gelu(x) = x / (1 + exp(-2u)): one piece of rows, in place."""
    _gelu_exp(x, out)
    out += 1
    xp_of(x).divide(x, out, out=out)


def _gelu_backward(x, y, grad, d):
    """d = grad * gelu'(x), given the output y = x s of the forward (s = 1 / (1 + e), the
    gate): one piece, in place.

    gelu'(x) = s + x s (1 - s) 2u' with u' = c (1 + 3 * 0.044715 x^2). Since 1 - s = e s,
    gelu'(x) = s (1 + Q e) with Q = 2u' y. (Written with e: 1 - s rounds to 0 where s
    rounds to 1, while Q, ~x^3, is still large.) e is recomputed here, in the piece that
    is in the cache anyway, rather than kept from the forward: it would be one more
    (B, T, 4C) array held until backward, the largest in the model (PyTorch keeps only x).
    """
    xp = xp_of(x)
    e = xp.empty_like(x)
    _gelu_exp(x, e)
    s = e + 1
    xp.reciprocal(s, out=s)
    xp.multiply(x, x, out=d)
    d *= 6 * 0.044715 * GELU_C
    d += 2 * GELU_C  # 2u'
    d *= y  # Q
    d *= e
    d += 1
    d *= s
    d *= grad


def gelu_array(x, out=None):
    """gelu(x) of a contiguous array: FastGELU's forward, also run by the lean decode step
    (model/fast_decode.py); into `out` (contiguous, x's shape) when given."""
    out = xp_of(x).empty_like(x) if out is None else out
    if x.size <= CHUNK_ELEMENTS:  # one piece (a decoded token's few rows): no pool, no pieces
        _gelu_forward(x, out)
    else:
        parallel_rows(_gelu_forward, x.reshape(-1), out.reshape(-1), chunked=True)
    return out


class FastGELU(Function):
    """FusedGELU as in-place steps in cache-sized pieces, in row blocks on all cores. Keeps
    x and the output (the next Linear keeps that anyway), not exp(-2u) (recomputed)."""

    def forward(self, x):
        xp = xp_of(x)
        self.x = x = xp.ascontiguousarray(x).reshape(x.shape)  # (ascontiguousarray makes 0-d into 1-d)
        self.out = gelu_array(x)
        return self.out

    def backward(self, grad):
        xp = xp_of(grad)
        grad = xp.ascontiguousarray(grad).reshape(grad.shape)
        d = xp.empty_like(self.x)
        parallel_rows(_gelu_backward, self.x.reshape(-1), self.out.reshape(-1), grad.reshape(-1), d.reshape(-1),
                      chunked=True)
        return (d,)


# --- softmax -------------------------------------------------------------------------------


class FastSoftmax(Function):
    """FusedSoftmax with the exp and the division done in place: one array, not three."""

    def forward(self, x, axis=-1):
        xp = xp_of(x)
        s = x - x.max(axis=axis, keepdims=True)
        xp.exp(s, out=s)
        s /= s.sum(axis=axis, keepdims=True)
        self.s, self.axis = s, axis
        return s

    def backward(self, grad):
        s = self.s
        return (s * (grad - (grad * s).sum(axis=self.axis, keepdims=True)),)


# --- layer norm ----------------------------------------------------------------------------


_INVERSE_COUNTS: dict = {}  # (C, dtype) -> the vector of 1/C that _row_means multiplies by


def _row_means(x):
    """(n, C) -> (n, 1) mean of each row.

    NOTE: as a mat-vec with a vector of 1/C: BLAS does it in one pass, where NumPy's
    sum(axis=-1) pays a fixed cost for each short row (~4x slower at C = 128).
    """
    key = (x.shape[-1], x.dtype, type(x))
    ones = _INVERSE_COUNTS.get(key)
    if ones is None:
        ones = _INVERSE_COUNTS[key] = xp_of(x).full(x.shape[-1], 1.0 / x.shape[-1], dtype=x.dtype)
    return (x @ ones)[:, None]


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


def layer_norm_rows(x2d, weight, bias, eps, buffers=None):
    """Layer norm of rows (N, C) -> (out, xhat, rstd (N, 1)): FastLayerNorm's forward, also
    run by the lean decode step (model/fast_decode.py); into `buffers` (out, xhat, rstd)
    when given."""
    if buffers is None:
        xp = xp_of(x2d)
        buffers = xp.empty_like(x2d), xp.empty_like(x2d), xp.empty((x2d.shape[0], 1), dtype=x2d.dtype)
    out, xhat, rstd = buffers
    if x2d.size < PARALLEL_MIN_SIZE:  # one block anyway (a decoded token's few rows): no pool
        _layer_norm_forward(x2d, weight, bias, eps, out, xhat, rstd)
    else:
        parallel_rows(lambda x, o, xh, r: _layer_norm_forward(x, weight, bias, eps, o, xh, r),
                      x2d, out, xhat, rstd, chunked=True)
    return out, xhat, rstd


class FastLayerNorm(Function):
    """FusedLayerNorm on (N, C) rows, in row blocks on all cores, each in cache-sized
    pieces, into preallocated buffers."""

    def forward(self, x, weight, bias, eps=1e-5):
        out, self.xhat, self.rstd = layer_norm_rows(x.reshape(-1, x.shape[-1]), weight, bias, eps)
        self.weight, self.has_bias = weight, bias is not None
        return out.reshape(x.shape)

    def backward(self, grad):
        xp = xp_of(grad)
        g2d = grad.reshape(self.xhat.shape)  # (N, C)
        dx, g_xhat = xp.empty_like(self.xhat), xp.empty_like(self.xhat)
        parallel_rows(lambda g, xh, r, d, gx: _layer_norm_backward(g, xh, r, self.weight, d, gx),
                      g2d, self.xhat, self.rstd, dx, g_xhat, chunked=True)
        dw = g_xhat.sum(axis=0) if self.needs_grad[1] else None
        db = g2d.sum(axis=0) if self.has_bias and self.needs_grad[2] else None
        return dx.reshape(grad.shape), dw, db


# --- linear --------------------------------------------------------------------------------

SMALL_ROWS = 256  # up to this many rows, (W x^T)^T is the faster product for a row-major W (measured below)


def linear_rows(x2d, weight, bias=None, out=None):
    """x2d (N, in) @ W^T + b -> (N, out): FastLinear's forward (the product by W's layout, see
    below), also run by the lean decode step (model/fast_decode.py); into `out` (a
    contiguous (N, out) array) when given."""
    if column_major(weight):  # W^T row-major: (N, in) @ (in, out) as it lies
        out = small_matmul(x2d, weight.T, out)
    elif x2d.shape[0] <= SMALL_ROWS:
        product = small_matmul(weight, x2d.T)  # (out, N)
        if out is None:
            out = xp_of(x2d).ascontiguousarray(product.T)  # (N, out)
        else:
            out[...] = product.T
    else:
        out = x2d @ weight.T if out is None else xp_of(x2d).matmul(x2d, weight.T, out=out)
    if bias is not None:
        out += bias
    return out


class FastLinear(Function):
    """FusedLinear, with the product of few rows (a decoded token) chosen by W's layout.

    NOTE: OpenBLAS repacks a transposed operand on every call. nn.Linear keeps W
    column-major, so W^T is a row-major matrix and x W^T repacks nothing: the fast
    product at every size, a few rows on one BLAS thread (cpu.small_matmul; one row is a
    matrix-vector product, which OpenBLAS splits well). For a row-major W (the tied
    output head's embedding, or an array someone put in a weight), x W^T repacks all of W;
    (W x^T)^T packs the few rows instead. Measured (2 threads, K = 128, N = 384): 8 rows
    41 -> 21 us, 256 rows 179 -> 162 us; from ~768 rows on x W^T is faster again.
    Column-major W, 8 rows: 6-10 us (2-core Xeon VM).
    """

    def forward(self, x, weight, bias=None):
        self.x2d = x.reshape(-1, x.shape[-1])  # (N, in)
        self.weight, self.has_bias, self.in_shape = weight, bias is not None, x.shape
        return linear_rows(self.x2d, weight, bias).reshape(*x.shape[:-1], weight.shape[0])

    backward = FusedLinear.backward  # the same gradients: dx = g W, dW = g^T x, db = sum(g)


# --- embedding -----------------------------------------------------------------------------

ONE_HOT_LIMIT = 1 << 20  # vocabulary x positions up to which the backward is a matmul


class FastEmbedding(Function):
    """FusedEmbedding whose backward, for a small vocabulary, is one matmul."""

    def forward(self, weight, ids):
        self.ids, self.weight_shape = ids, weight.shape
        return weight[ids]

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


# --- the tier's functions (what functional.py calls when this tier is selected) ------------


gelu = FastGELU.apply  # (x): its own apply, as in fused.py
linear = FastLinear.apply  # (x, weight, bias)
embedding = FastEmbedding.apply  # (weight, ids)
def softmax(x, axis=-1): return FastSoftmax.apply(x, axis=axis)
def layer_norm(x, weight, bias=None, eps=1e-5): return FastLayerNorm.apply(x, weight, bias, eps=eps)


def scaled_dot_product_attention(q, k, v, causal=True, dropout_p=0.0):
    return FastAttention.apply(q, k, v, causal=causal, dropout_p=dropout_p)


def packed_causal_attention(qkv, n_head, dropout_p=0.0, kv=None):
    """qkv (B, T, 3C) -> y (B, T, C): the whole multi-head attention in one kernel; kv =
    (keys, values) (B, nh, Tk, hs) from a KV cache that already holds this step's."""
    return FastPackedAttention.apply(qkv, n_head=n_head, dropout_p=dropout_p, kv=kv)
