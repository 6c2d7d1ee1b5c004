"""The lean decode step: a GPT's forward pass straight through the fast tier's kernels.

Under no_grad an op records nothing, yet each one still passes through its Tensor, its
Function and the ops tier's dispatch. Decoding one token of the 4-layer model takes ~45
such ops, ~1,600 Python calls, for a few dozen small array operations of real work. So
when a forward pass only reads (no gradient wanted, no dropout, the fast tier selected)
and runs over a KV cache (a decode step, and a prefill too), GPT.forward runs `forward`
below instead: the same kernels (fast.py's linear_rows, layer_norm_rows and gelu_array,
fast_attention.decode_forward, the tier's attention op for a prefill, the paged cache's
attend) on the same arrays in the same order, so the logits are the same to the bit
(tests/test_generate.py checks that against the usual path). A learner can skip this
file: gpt.py and attention.py say what it computes.
NOTE: measured per decoded token, the 4 x 128 model, 64 tokens after a 32-token prompt,
2 threads, alternating runs (2-core AMD EPYC VM): batch 1 2,329 -> 1,028 us, batch 8
3,288 -> 1,972 us. A prefill into generate()'s cache, against the usual path (41 or 15
alternating pairs, same VM): 1 x 32 tokens 3.81 -> 2.99 ms, 8 x 32 11.1 -> 10.0 ms,
1 x 224 13.5 -> 12.8 ms, 8 x 992 396 -> 366 ms (1 x 992: within noise).
"""
from __future__ import annotations

from typing import Any

import tinygrad_lite.functional as F
from tinygrad_lite import Tensor, backend, is_grad_enabled
from tinygrad_lite.fast import gelu_array, layer_norm_rows, linear_rows
from tinygrad_lite.fast_attention import SPLIT_MIN_SIZE, decode_forward

from .paged_batch import causal_attention


def applies(model: Any, cache: Any, targets: Any) -> bool:
    """Can this forward pass take the lean path? Inference (no gradients, no dropout) in the
    fast tier over a KV cache: any step of generate()'s contiguous cache (a prefill or a
    decode) or of the serving engine's paged one. Learned positions only (RoPE takes the
    usual path), and no layer keeping its attention weights for inspection."""
    if targets is not None or cache is None or is_grad_enabled() or F.get_ops_tier() != "fast":
        return False
    if model.training and model.config.dropout > 0:  # dropout would draw its masks
        return False
    return model.wpe is not None and not any(block.attn.keep_weights for block in model.h)


def _linear(x2d, layer: Any, out=None):
    return linear_rows(x2d, layer.weight.data, None if layer.bias is None else layer.bias.data, out)


def _layer_norm(x2d, norm: Any, buffers=None):
    bias = None if norm.bias is None else norm.bias.data
    return layer_norm_rows(x2d, norm.weight.data, bias, norm.eps, buffers)[0]


def _attention(queries, keys, values, lengths=None, out=None):
    """The paged cache's causal attention (g, nh, n, hs) over (g, nh, context, hs): for one
    query each (decoding), fast_attention.decode_forward itself, as FastAttention would run
    it, with `lengths` (g) masking each sequence's keys past its own in the same call;
    otherwise that op (a prefill's tiles, in blocks on the cores). Into `out` when given."""
    if queries.shape[-2] == 1 and queries.size < SPLIT_MIN_SIZE:
        xp = backend.xp_of(queries)
        bias = None if lengths is None else key_bias(lengths, keys.shape[-2], xp, queries.dtype)
        return decode_forward(queries, keys, values, xp.empty_like(queries) if out is None else out, bias)
    y = causal_attention(queries, keys, values, lengths)
    if out is None:
        return y
    out[...] = y
    return out


def key_bias(lengths, context: int, xp, dtype):
    """(g, 1, context): 0 for each sequence's first lengths[i] keys, -inf for the rest."""
    host = backend.numpy
    hidden = host.arange(context) >= host.asarray(lengths)[:, None]
    return xp.asarray(host.where(hidden, -host.inf, 0).astype(dtype)[:, None, :])


def forward(model: Any, idx, cache: Any, start_pos: int, logits_at=None, rows=None) -> Tensor:
    """idx (B, T) token ids -> logits (B, T, V) (or the columns logits_at picks), as
    GPT.forward computes them, writing this step's keys and values into `cache`; `rows`:
    what the last block computes (gpt.last_block_rows; the paged cache's wanted columns)."""
    B, T = idx.shape
    C, n_head = model.config.n_embd, model.config.n_head
    positions = cache.positions if cache.paged else slice(start_pos, start_pos + T)
    x = (model.wte.weight.data[idx] + model.wpe.weight.data[positions]).reshape(B * T, C)  # (B T, C)
    for layer, block in enumerate(model.h):
        attn = block.attn
        qkv = _linear(_layer_norm(x, block.ln_1), attn.c_attn)  # (B T, 3C)
        heads = qkv.reshape(B * T, 3, n_head, C // n_head)  # (rows, 3, nh, hs) views: each row's q, k, v
        wanted = rows if layer == len(model.h) - 1 else None  # (paged: B is 1, so rows are columns)
        if cache.paged:  # the engine's pages: its slab and copies (model/paged_batch.py)
            y = cache.attend(layer, heads[:, 0], heads[:, 1], heads[:, 2], _attention, wanted).reshape(-1, C)
            x = x if wanted is None else x[wanted]  # (N', C): the rows the last block computes
            kv = None
        elif T > 1 or B * C >= SPLIT_MIN_SIZE:  # a prefill (or a big batch's decode): attention as the usual path's
            q, k, v = heads.reshape(B, T, 3, n_head, C // n_head).transpose(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs) views
            cache.write(layer, k, v, start_pos)
            queries = q if wanted is None else q[:, :, wanted]  # (B, nh, T', hs)
            y = _attention(queries, cache.k[layer][:, :, :start_pos + T], cache.v[layer][:, :, :start_pos + T])
            y = y.transpose(0, 2, 1, 3).reshape(-1, C)  # (B T', C)
            x = x if wanted is None else x.reshape(B, T, C)[:, wanted].reshape(-1, C)
            kv = None
        else:  # decoding over the contiguous cache: a row per sequence
            cache.write(layer, heads[:, 1, :, None], heads[:, 2, :, None], start_pos)
            kv = cache.k[layer][:, :, :start_pos + 1], cache.v[layer][:, :, :start_pos + 1]
        if kv is not None:  # one query per row over its keys and values (rows, nh, context, hs)
            y = backend.xp_of(x).empty((B * T, 1, n_head, C // n_head), dtype=x.dtype)  # heads side by side
            decode_forward(heads[:, 0, :, None], *kv, y.transpose(0, 2, 1, 3))
            y = y.reshape(B * T, C)
        x = x + _linear(y, attn.c_proj)  # the residual stream (B T, C)
        mlp = block.mlp
        x = x + _linear(gelu_array(_linear(_layer_norm(x, block.ln_2), mlp.c_fc)), mlp.c_proj)
    if not cache.paged:
        cache.pos = start_pos + T
    x = x.reshape(B, -1, C)
    if logits_at is not None and rows is None:
        x = x[:, logits_at]  # (B, T', C): only the positions whose next token is wanted
    logits = linear_rows(_layer_norm(x.reshape(-1, C), model.ln_f), model.wte.weight.data)  # tied output head
    return Tensor._from_array(logits.reshape(*x.shape[:2], -1))
