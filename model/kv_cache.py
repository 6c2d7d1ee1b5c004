"""The KV cache: why decoding one token at a time need not redo the whole prompt.

While generating, token t's keys and values never change once computed (attention is
causal: earlier tokens never look at later ones). So we keep every layer's K and V in
preallocated buffers and, for each new token, compute only its own q, k, v: the new
token's query attends to all cached keys. Prefill fills the cache for the whole prompt
in one parallel pass; decode then adds one position per step.

Each layer writes its keys and values (`write`) and reads back all of them so far
(`read`); reading changes nothing. `pos`, how many positions are valid, moves when the
model has run every layer for the new positions (GPT.forward sets it).
"""
from __future__ import annotations

from tinygrad_lite import Tensor, backend


class KVCache:
    """Buffers k, v: n_layer x (B, n_head, max_len, head_size), filled up to `pos`."""

    paged = False  # one contiguous buffer per row (the serving engine's pages: paged_kv_cache.py)

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_size: int,
                 dtype="float32", device: str | None = None) -> None:
        xp = backend.namespace(device or backend.default_device())
        shape = (batch_size, n_head, max_len, head_size)
        # (empty, not zeros: read() returns only positions that were written)
        self.k = [xp.empty(shape, dtype=dtype) for _ in range(n_layer)]
        self.v = [xp.empty(shape, dtype=dtype) for _ in range(n_layer)]
        self.n_head, self.head_size, self.max_len = n_head, head_size, max_len
        self.pos = 0  # how many positions hold valid keys/values

    def reset(self) -> None:
        """Forget everything (the buffers are reused, not reallocated)."""
        self.pos = 0

    def write(self, layer: int, k, v, start_pos: int) -> None:
        """Store k, v (B, nh, T, hs), Tensors or arrays, at positions start_pos .. start_pos+T-1."""
        k, v = (k.data if isinstance(k, Tensor) else k), (v.data if isinstance(v, Tensor) else v)
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        if start_pos > self.pos:
            raise ValueError(f"KV cache has {self.pos} positions; cannot write at {start_pos}")
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v

    def write_packed(self, layer: int, qkv: Tensor, start_pos: int) -> None:
        """Store the keys and values of c_attn's packed output qkv (B, T, 3C)."""
        B, T, C3 = qkv.shape
        heads = qkv.data.reshape(B, T, 3, self.n_head, self.head_size)  # a view
        k, v = heads[:, :, 1].transpose(0, 2, 1, 3), heads[:, :, 2].transpose(0, 2, 1, 3)  # (B, nh, T, hs) views
        self.write(layer, k, v, start_pos)

    def read(self, layer: int, end: int) -> tuple[Tensor, Tensor]:
        """Keys and values of positions 0 .. end-1: 2 x (B, nh, end, hs), views of the buffers."""
        # NOTE: wrapped as they are (no copy, no checks): the buffers are the model's own arrays
        return Tensor._from_array(self.k[layer][:, :, :end]), Tensor._from_array(self.v[layer][:, :, :end])
