"""The serving engine's steady decode step, prepared once and then run step after step.

Most steps of a running batch look alike: the same sequences, one new token each, every
one a position further than the step before (PagedBatch.next_step plans such a *steady*
step). A GPU serving engine records such a step once as a CUDA graph and replays it, so
its kernels run back to back with nothing decided in between (vLLM and nano-vllm capture
a graph for each of several batch sizes; a plain generation loop captures none). NumPy
cannot record its calls, but the idea pays here too: a small model's decode step is a
few hundred NumPy calls on small arrays, and what the lean step does around each one
(choosing the kernel, allocating its output, switching BLAS's threads) adds up. So
`PreparedDecode` decides once:
- every array the step computes (the residual stream (S, C), q k v (S, 3C), the MLP's
  (S, 4C), the logits (S, V)) is allocated once, for max_batch_size rows; each kernel
  writes into the first S rows of its own (out=);
- when every product of the step is small (cpu.ONE_THREAD_MACS: the tiny models, the 4 x 128
  one up to 32 sequences, not GPT-2), BLAS goes to one thread once for the whole step, not
  once around each product (cpu.small_matmul), and each product goes straight to BLAS;
- no Tensor, no Module call, no autograd or tier checks per op.
It runs fast_decode.forward's kernels on the same arrays in the same order (that step
runs over the same slab through PagedBatch.attend), so its logits are the lean step's to
the bit (tests/test_serving.py). generate() keeps the lean step: it is the plain loop the
engine is measured against (lab/batching.py's same_work measures the engine with and
without this step).
NOTE: measured in docs/performance.md ("Fourteenth round").
"""
from __future__ import annotations

from typing import Any, Callable

from tinygrad_lite import backend, cpu
from tinygrad_lite.backend import column_major
from tinygrad_lite.fast import gelu_array, linear_rows

from . import fast_decode


class PreparedDecode:
    """A steady decode step of up to `rows` sequences over the engine's slab: token ids (S,)
    -> logits (S, V), in a buffer it keeps (valid until the next call)."""

    def __init__(self, model: Any, rows: int) -> None:
        c = model.config
        weight = model.wte.weight.data
        xp, C = backend.xp_of(weight), c.n_embd

        def buffer(width: int):
            return xp.empty((rows, width), dtype=weight.dtype)
        self.model = model
        self.x, self.normed, self.xhat, self.rstd = buffer(C), buffer(C), buffer(C), buffer(1)
        self.qkv, self.y, self.projected = buffer(3 * C), buffer(C), buffer(C)
        self.hidden, self.activated = buffer(4 * C), buffer(4 * C)
        self.logits = buffer(c.vocab_size)
        # the step's largest product, per sequence: the MLP's or the output head's
        self.macs_per_row = C * max(4 * C, c.vocab_size)
        self.on_host = backend.device_of(weight) == "cpu"

    def __call__(self, ids: list[int], slab: Any, plan: Any) -> Any:
        """ids: the S decoding members' new tokens, slot by slot; plan: their DecodePlan
        (slots 0 .. S-1, their positions, lengths after this step, the longest)."""
        S = plan.count
        if self.on_host and S > 1 and S * self.macs_per_row <= cpu.ONE_THREAD_MACS:  # (small_matmul's rule)
            with cpu.threads(1):  # every product small: BLAS on one thread, switched once
                return self._step(ids, slab, plan, _small_linear)
        return self._step(ids, slab, plan, fast_decode._linear)

    def _step(self, ids: list[int], slab: Any, plan: Any, linear: Callable) -> Any:
        model, S = self.model, plan.count
        C, n_head = model.config.n_embd, model.config.n_head
        x, normed, qkv, y = self.x[:S], self.normed[:S], self.qkv[:S], self.y[:S]
        projected, hidden, activated = self.projected[:S], self.hidden[:S], self.activated[:S]
        norm = (normed, self.xhat[:S], self.rstd[:S])
        wte = model.wte.weight.data
        backend.xp_of(x).take(wte, backend.asarray(ids, backend.device_of(x)), axis=0, out=x)  # (S, C)
        x += model.wpe.weight.data[plan.positions]
        heads = qkv.reshape(S, 3, n_head, C // n_head)  # (S, 3, nh, hs) views: each row's q, k, v
        for layer, block in enumerate(model.h):
            attn, mlp = block.attn, block.mlp
            fast_decode._layer_norm(x, block.ln_1, norm)
            linear(normed, attn.c_attn, qkv)
            keys, values = slab.k[layer], slab.v[layer]  # (the slab's arrays may have grown since)
            keys[plan.slots, :, plan.positions] = heads[:, 1]
            values[plan.slots, :, plan.positions] = heads[:, 2]
            fast_decode._attention(heads[:, 0, :, None], keys[:S, :, :plan.longest], values[:S, :, :plan.longest],
                                   plan.lengths, out=y.reshape(S, n_head, 1, C // n_head))
            linear(y, attn.c_proj, projected)
            x += projected  # the residual stream
            fast_decode._layer_norm(x, block.ln_2, norm)
            linear(normed, mlp.c_fc, hidden)
            gelu_array(hidden, activated)
            linear(activated, mlp.c_proj, projected)
            x += projected
        fast_decode._layer_norm(x, model.ln_f, norm)
        return linear_rows(normed, wte, None, self.logits[:S])  # tied output head (S, V)


def _small_linear(x2d, layer: Any, out) -> None:
    """linear_rows's product when BLAS is on one thread already (cpu.threads(1)): for
    nn.Linear's column-major weight, x W^T straight into `out`, skipping the checks that
    linear_rows and small_matmul make at every call (~3 us a product, 17 products a step)."""
    weight = layer.weight.data
    if not column_major(weight):
        return fast_decode._linear(x2d, layer, out)
    backend.xp_of(x2d).matmul(x2d, weight.T, out=out)  # (NumPy's: a small step is on the host)
    if layer.bias is not None:
        out += layer.bias.data
