"""The same GPT as model/gpt.py, written in PyTorch: the reference for the benchmarks.

Only bench/ uses this file; PyTorch is never a dependency of tinygrad_lite (install it
for the benchmarks with `python -m pip install torch`). Every name, shape and init
matches model/gpt.py, so a tinygrad_lite state_dict loads here one to one:

    from model.gpt import GPT, GPTConfig
    ref = GPT(GPTConfig())
    model = TorchGPT(TorchGPTConfig.from_any(ref.config))
    load_numpy_state_dict(model, ref.state_dict())   # same weights -> same logits and loss

What is here, top to bottom: the config, the KV cache, the model (attention, MLP,
block, GPT), the AdamW with the same parameter groups as train.py, loading a NumPy
state_dict, and a KV-cached decode loop with its speed measurement for
bench/decode_speed.py.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TorchGPTConfig:
    vocab_size: int = 65  # tokens the model can read and write (65 characters of Shakespeare)
    block_size: int = 64  # the longest context, in tokens
    n_layer: int = 4  # transformer blocks stacked
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # width of the residual stream
    dropout: float = 0.0  # 0 for the CPU preset
    bias: bool = False  # biases in Linear and LayerNorm (model/gpt.py's default: False)
    attention: str = "sdpa"  # "sdpa": F.scaled_dot_product_attention; "manual": written out
    last_block_last_row: bool = False  # inference: the last block computes the last position only (model/gpt.py's last_block_rows)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.attention not in ("sdpa", "manual"):
            raise ValueError(f"attention must be 'sdpa' or 'manual', got {self.attention!r}")

    @classmethod
    def from_any(cls, config: Any, **overrides: Any) -> "TorchGPTConfig":
        """From a model.gpt.GPTConfig, a dict, or anything with these attributes.

        Only learned absolute positions are written here: a RoPE config is refused."""
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        if get("pos", "learned") != "learned":
            raise ValueError(f"TorchGPT has learned positions only, got pos={get('pos')!r}")
        values = {f.name: get(f.name) for f in fields(cls) if get(f.name) is not None}
        return cls(**{**values, **overrides})


class TorchKVCache:
    """Preallocated keys and values: n_layer x (B, n_head, max_len, head_size), valid up to `pos`."""

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_size: int,
                 dtype: torch.dtype = torch.float32) -> None:
        shape = (n_layer, batch_size, n_head, max_len, head_size)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        """Forget everything; the buffers are reused, not reallocated."""
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at start_pos; return all so far (B, nh, start_pos + T, hs)."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        if layer == self.k.shape[0] - 1:
            self.pos = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def causal_mask(Tq: int, Tk: int) -> torch.Tensor:
    """(Tq, Tk) bool, True where a query MAY look. The Tq queries are the last Tq of the
    Tk positions (as model/attention.py), so query i sees keys 0 .. Tk - Tq + i."""
    return torch.ones(Tq, Tk, dtype=torch.bool).tril(diagonal=Tk - Tq)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention. x (B, T, C) -> (B, T, C)."""

    def __init__(self, config: TorchGPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout, self.attention = config.n_head, config.dropout, config.attention
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # Q, K, V in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # W_O: mixes the heads
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: TorchKVCache | None = None, layer: int = 0,
                start_pos: int = 0, last_row: bool = False) -> torch.Tensor:
        """With last_row, every position's keys and values but the last position's output only."""
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v, start_pos)  # (B, nh, Tk, hs), Tk = start_pos + T
        if last_row:
            q, T = q[:, :, -1:], 1  # (B, nh, 1, hs): the last position sees every key
        Tk = k.shape[2]
        p = self.dropout if self.training else 0.0
        if self.attention == "manual":
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, Tk)
            att = att.masked_fill(~causal_mask(T, Tk), float("-inf"))
            att = F.dropout(F.softmax(att, dim=-1), p, self.training)
            y = att @ v  # (B, nh, T, hs)
        elif T == Tk:  # training and prefill: the plain causal case
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            # NOTE: is_causal=True aligns the mask top-left when T < Tk, which is wrong with a
            # cache; one new query sees every key, several need the bottom-right mask
            mask = None if T == 1 else causal_mask(T, Tk)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, nh, hs) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Widen 4x, GELU (tanh approximation, as GPT-2), project back. (B, T, C) -> (B, T, C)."""

    def __init__(self, config: TorchGPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = "tanh"  # "none" is nanoGPT's exact nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: TorchGPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: TorchKVCache | None = None, layer: int = 0,
                start_pos: int = 0, last_row: bool = False) -> torch.Tensor:
        attended = self.attn(self.ln_1(x), cache, layer, start_pos, last_row)
        x = (x[:, -1:] if last_row else x) + attended
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    def __init__(self, config: TorchGPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token id -> vector
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position -> vector
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one vector per token, to read and to write
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """GPT-2 init, as model/gpt.py: N(0, 0.02), zero biases, and std 0.02/sqrt(2 n_layer)
        for the c_proj weights that write into the residual stream."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif name.endswith("c_proj.weight"):
                p.normal_(0.0, 0.02 / math.sqrt(2 * self.config.n_layer))
            elif p.dim() == 2:  # the other Linear weights and both embeddings
                p.normal_(0.0, 0.02)
            # LayerNorm weights keep their ones

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: TorchKVCache | None = None,
                start_pos: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> logits (B, T, V) and the mean cross-entropy against targets (B, T)."""
        B, T = idx.shape
        if start_pos + T > self.config.block_size:
            raise ValueError(f"sequence of {start_pos + T} tokens is longer than block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(start_pos, start_pos + T)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C) + (T, C)
        last_row = self.config.last_block_last_row and targets is None and not torch.is_grad_enabled()
        for layer, block in enumerate(self.h):
            x = block(x, cache, layer, start_pos, last_row and layer == len(self.h) - 1)  # (B, T, C)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V); (B, 1, V) with last_block_last_row
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def new_cache(self, batch_size: int, max_len: int | None = None) -> TorchKVCache:
        c = self.config
        return TorchKVCache(c.n_layer, batch_size, c.n_head, max_len or c.block_size, c.n_embd // c.n_head)


def make_adamw(model: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99),
               weight_decay: float = 0.1, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW with train.py's groups: matrices (2-D) decay, biases and norm weights do not."""
    params = list(model.parameters())  # each tied parameter once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **kwargs)


# --- moving weights between the two frameworks ------------------------------------------


@torch.no_grad()
def load_numpy_state_dict(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Copy a tinygrad_lite state_dict (name -> NumPy array, the same names) into `model`.

    The tied lm_head.weight is wte.weight, so it is neither expected nor allowed as a key.
    Errors name the missing or unexpected keys, or the first shape that does not fit."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise KeyError(f"load_numpy_state_dict: missing keys {missing}, unexpected keys {unexpected}")
    for name, p in params.items():
        value = np.asarray(state[name])
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"load_numpy_state_dict: {name} has shape {tuple(value.shape)} in the "
                             f"state dict but {tuple(p.shape)} in the model")
        p.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))


def numpy_state_dict(model: nn.Module) -> dict[str, np.ndarray]:
    """The other way: name -> NumPy copy of each parameter (tied weights once)."""
    return {name: p.detach().numpy().copy() for name, p in model.named_parameters()}


# --- decoding with the KV cache -----------------------------------------------------------


@torch.inference_mode()
def generate_greedy(model: TorchGPT, prompt: torch.Tensor, new_tokens: int,
                    cache: TorchKVCache) -> tuple[torch.Tensor, float, float]:
    """prompt (B, T0) -> (tokens (B, new_tokens), prefill seconds, decode seconds).

    Prefill runs the whole prompt in one pass and fills the cache; then each step feeds
    the last token alone (start_pos says where it sits). Greedy (argmax), so that runs
    are deterministic and each costs the same."""
    B, T0 = prompt.shape
    out = torch.empty(B, new_tokens, dtype=torch.long)
    cache.reset()
    start = time.perf_counter()
    logits, _ = model(prompt, cache=cache, start_pos=0)  # (B, T0, V)
    out[:, 0] = logits[:, -1].argmax(dim=-1)
    prefill_end = time.perf_counter()
    for i in range(1, new_tokens):
        logits, _ = model(out[:, i - 1:i], cache=cache, start_pos=T0 + i - 1)  # (B, 1, V)
        out[:, i] = logits[:, -1].argmax(dim=-1)
    return out, prefill_end - start, time.perf_counter() - prefill_end


def torch_decode_timing(config: Any, batch: int, prompt_len: int, new_tokens: int, threads: int,
                        repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """Time KV-cached greedy decoding of `new_tokens` tokens after a `prompt_len` prompt.

    config: a model.gpt.GPTConfig, a dict or a TorchGPTConfig (random GPT-2 init weights).
    The cache holds prompt_len + new_tokens - 1 positions (the last token is never fed
    back), which must fit in block_size. One untimed warm-up run, then `repeats` timed
    runs; the run with the median total time is reported:
    prefill_s, decode_s (the new_tokens - 1 single-token steps), total_s, and
    tokens_per_s = batch * new_tokens / total_s (prefill included, as a user waits for it),
    decode_tokens_per_s = batch * (new_tokens - 1) / decode_s.
    """
    cfg = config if isinstance(config, TorchGPTConfig) else TorchGPTConfig.from_any(config)
    if prompt_len < 1 or new_tokens < 1 or batch < 1:
        raise ValueError("batch, prompt_len and new_tokens must be >= 1")
    if prompt_len + new_tokens - 1 > cfg.block_size:
        raise ValueError(f"prompt_len + new_tokens - 1 = {prompt_len + new_tokens - 1} does not fit "
                         f"block_size {cfg.block_size}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = TorchGPT(cfg).eval()
    prompt = torch.from_numpy(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, prompt_len)))
    cache = model.new_cache(batch, prompt_len + new_tokens - 1)
    generate_greedy(model, prompt, new_tokens, cache)  # warm-up: first-call allocations
    runs = sorted((generate_greedy(model, prompt, new_tokens, cache)[1:] for _ in range(max(1, repeats))),
                  key=sum)
    prefill_s, decode_s = runs[len(runs) // 2]
    total_s = prefill_s + decode_s
    return {"prefill_s": prefill_s, "decode_s": decode_s, "total_s": total_s,
            "tokens_per_s": batch * new_tokens / total_s,
            "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s if new_tokens > 1 else float("nan"),
            "threads": torch.get_num_threads()}


def torch_decode_tokens_per_s(config: Any, batch: int, prompt_len: int, new_tokens: int,
                              threads: int) -> float:
    """Generated tokens per second of PyTorch's KV-cached decode, prefill included
    (batch * new_tokens / wall time). See `torch_decode_timing` for the details."""
    return torch_decode_timing(config, batch, prompt_len, new_tokens, threads)["tokens_per_s"]
