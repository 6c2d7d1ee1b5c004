"""Rotary positional embedding (RoPE, Su et al. 2021; used by Llama).

Attention alone cannot tell where a token is: it compares every query with every key
the same way regardless of order. GPT-2 adds a learned vector per position to the
token embedding. RoPE instead *rotates* each query and key: the pair of features
(x[i], x[i + D/2]) at position p turns by the angle p * theta_i, with a different
frequency theta_i = base^(-2i/D) per pair. A rotation by p*theta for the query and
m*theta for the key leaves their dot product depending only on p - m: attention
scores see relative distance, not absolute position.
"""
from __future__ import annotations

from tinygrad_lite import Tensor, backend, concatenate


class RotaryEmbedding:
    """Precomputed cos/sin tables for positions 0 .. max_positions-1, head size D (even)."""

    def __init__(self, head_size: int, max_positions: int, base: float = 10000.0,
                 device: str | None = None) -> None:
        if head_size % 2:
            raise ValueError(f"RoPE needs an even head size, got {head_size}")
        xp = backend.namespace(device or backend.default_device())
        half = head_size // 2
        inv_freq = 1.0 / (base ** (xp.arange(half, dtype="float64") / half))  # (D/2,)
        angles = xp.arange(max_positions, dtype="float64")[:, None] * inv_freq[None, :]  # (P, D/2)
        self.cos = xp.cos(angles).astype("float32")
        self.sin = xp.sin(angles).astype("float32")
        self.max_positions = max_positions

    def __call__(self, x: Tensor, start_pos: int = 0, positions=None) -> Tensor:
        """Rotate x (B, H, T, D) as if its tokens sat at positions start_pos .. start_pos+T-1,
        or at `positions` (T,) (the serving engine packs several sequences into one row)."""
        T, D = x.shape[-2], x.shape[-1]
        end = start_pos + T if positions is None else int(positions.max()) + 1
        if end > self.max_positions:
            raise ValueError(f"RoPE table covers {self.max_positions} positions, asked for {end}")
        rows = slice(start_pos, start_pos + T) if positions is None else positions
        cos = Tensor(self.cos[rows].astype(x.dtype))  # (T, D/2)
        sin = Tensor(self.sin[rows].astype(x.dtype))
        x1, x2 = x[..., :D // 2], x[..., D // 2:]  # the two halves of each pair: (B, H, T, D/2)
        # a 2-D rotation of (x1, x2) by the angle: (x1 cos - x2 sin, x1 sin + x2 cos)
        return concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
