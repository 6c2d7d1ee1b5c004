"""The KV cache: why decoding one token at a time need not redo the whole prompt.

While generating, token t's keys and values never change once computed (attention is
causal: earlier tokens never look at later ones). So we keep every layer's K and V in
preallocated buffers and, for each new token, compute only its own q, k, v: the new
token's query attends to all cached keys. Prefill fills the cache for the whole prompt
in one parallel pass; decode then adds one position per step.
"""
from __future__ import annotations

from tinygrad_lite import Tensor, backend


class KVCache:
    """Buffers k, v: n_layer x (B, n_head, max_len, head_size), filled up to `pos`."""

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_size: int,
                 dtype="float32", device: str | None = None) -> None:
        xp = backend.namespace(device or backend.default_device())
        shape = (batch_size, n_head, max_len, head_size)
        self.k = [xp.zeros(shape, dtype=dtype) for _ in range(n_layer)]
        self.v = [xp.zeros(shape, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.pos = 0  # how many positions hold valid keys/values

    def reset(self) -> None:
        """Forget everything (the buffers are reused, not reallocated)."""
        self.pos = 0

    def buffers(self, layer: int, start_pos: int, T: int) -> tuple:
        """(k_buffer, v_buffer, start_pos) for an op that writes T positions at start_pos itself."""
        end = start_pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        if start_pos > self.pos:
            raise ValueError(f"KV cache has {self.pos} positions; cannot write at {start_pos}")
        if layer == len(self.k) - 1:
            self.pos = end
        return self.k[layer], self.v[layer], start_pos

    def update(self, layer: int, k: Tensor, v: Tensor, start_pos: int) -> tuple[Tensor, Tensor]:
        """Write k, v (B, nh, T, hs) at start_pos; return all keys/values so far (B, nh, start_pos+T, hs)."""
        k_buf, v_buf, _ = self.buffers(layer, start_pos, k.shape[2])
        end = start_pos + k.shape[2]
        k_buf[:, :, start_pos:end] = k.data
        v_buf[:, :, start_pos:end] = v.data
        return Tensor(k_buf[:, :, :end]), Tensor(v_buf[:, :, :end])
