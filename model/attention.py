"""Self-attention: how each token gathers information from the tokens before it.

Every token emits three vectors: a query Q ("what am I looking for?"), a key K ("what
do I contain?") and a value V ("what do I pass on?"). Token i scores every token j by
the dot product q_i . k_j, scaled by 1/sqrt(d_k) so the scores' spread does not grow
with the vector size (large scores would make softmax nearly one-hot and its gradient
vanish). A softmax turns a row of scores into weights that sum to 1, and the output is
the weighted average of the values. Multi-head attention runs several such attentions
side by side on slices of the features, then mixes their outputs with W_O (c_proj).
"""
from __future__ import annotations

import math

import tinygrad_lite.functional as F
from tinygrad_lite import Tensor, nn, where
from tinygrad_lite.ops import causal_mask

from .kv_cache import KVCache  # (or the serving engine's PagedBatch: model/paged_batch.py)
from .rope import RotaryEmbedding


def self_attention(Q: Tensor, K: Tensor, V: Tensor, mask=None) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention written out step by step.

    Q (..., Tq, d_k), K (..., Tk, d_k), V (..., Tk, d_v); mask (Tq, Tk) bool, True where
    a query may NOT look. Returns (output (..., Tq, d_v), attention weights (..., Tq, Tk)).
    The model runs `F.scaled_dot_product_attention` (the same math, in the selected ops
    tier), and this when it is asked to keep the weights; tests check both agree.
    """
    d_k = Q.shape[-1]
    scores = Q @ K.transpose(-2, -1) / math.sqrt(d_k)  # (..., Tq, Tk): how well each query matches each key
    if mask is not None:
        scores = where(mask, -math.inf, scores)  # a masked score becomes weight 0 after softmax
    weights = scores.softmax(axis=-1)  # each row sums to 1
    return weights @ V, weights  # (..., Tq, d_v): a weighted average of values


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention. x (B, T, C) -> (B, T, C)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True,
                 rope: RotaryEmbedding | None = None) -> None:
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head, self.n_embd, self.dropout = n_head, n_embd, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # Q, K, V for all heads in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)  # W_O: mixes the heads' outputs
        self.resid_dropout = nn.Dropout(dropout)
        self.rope = rope
        self.keep_weights = False  # set True to keep the last attention weights (inspection)
        self.last_weights: Tensor | None = None

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0,
                start_pos: int = 0, rows=None) -> Tensor:
        """x (B, T, C) -> (B, T, C). With `rows` (the last block of an inference pass that
        wants some positions' logits only: gpt.last_block_rows), every row's keys and values
        are computed but only those rows' queries attend: (B, T', C)."""
        B, T, C = x.shape
        qkv = self.c_attn(x)  # (B, T, 3C): Q, K and V of every head in one matmul
        dropout = self.dropout if self.training else 0.0
        if cache is not None and cache.paged:  # the serving engine's pages: model/paged_batch.py
            heads = qkv.data[0].reshape(T, 3, self.n_head, C // self.n_head)  # (N, 3, nh, hs): views, no op
            q, k, v = heads[:, 0], heads[:, 1], heads[:, 2]  # 3 x (N, nh, hs)
            if self.rope is not None:  # each packed token at its own sequence's position
                q, k = (self.rope(Tensor(t.transpose(1, 0, 2)), positions=cache.positions).data.transpose(1, 0, 2)
                        for t in (q, k))
            y = cache.attend(layer, q, k, v, rows=rows)  # (N', nh, hs), inference only (no graph)
            return self.c_proj(Tensor._from_array(y.reshape(B, -1, C)))
        if self.rope is None and not self.keep_weights and F.has_packed_attention():
            # the fast ops tier does all of the below in one kernel, on views of qkv
            kv = None
            if cache is not None:
                cache.write_packed(layer, qkv, start_pos)
                kv = cache.read(layer, start_pos + T)
            elif rows is not None:  # every row's keys and values, for the rows' queries (inference)
                kv = tuple(self.split_heads(t).data for t in qkv.split(3, axis=2)[1:])
            queries = qkv if rows is None else qkv[:, rows]  # (the kernel reads q from it; k, v from kv)
            return self.resid_dropout(self.c_proj(F.packed_causal_attention(queries, self.n_head, dropout, kv)))
        q, k, v = (self.split_heads(t) for t in qkv.split(3, axis=2))  # 3 x (B, nh, T, hs)
        if self.rope is not None:  # rotate queries and keys by their absolute positions
            q, k = self.rope(q, start_pos), self.rope(k, start_pos)
        if cache is not None:  # decode: store this step's K, V and attend to every cached one
            cache.write(layer, k, v, start_pos)
            k, v = cache.read(layer, start_pos + T)  # (B, nh, start_pos + T, hs)
        if rows is not None:
            q = q[:, :, rows]  # (B, nh, T', hs): the last T' positions' queries
        if self.keep_weights:
            y, self.last_weights = self_attention(q, k, v, causal_mask(q.xp, q.shape[2], k.shape[-2]))
        else:
            y = F.scaled_dot_product_attention(q, k, v, causal=True, dropout_p=dropout)  # (B, nh, T', hs)
        y = y.transpose(1, 2).reshape(B, -1, C)  # (B, T', nh, hs) -> (B, T', C): heads side by side
        return self.resid_dropout(self.c_proj(y))

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, nh, T, hs): each head gets its own slice of the features."""
        B, T, C = x.shape
        return x.reshape(B, T, self.n_head, C // self.n_head).transpose(1, 2)
