"""A GPT: token embedding -> positions -> N transformer blocks -> layer norm -> logits.

Names follow GPT-2 (and nanoGPT) so that checkpoints and papers map one to one:
wte (token embedding), wpe (position embedding), h (blocks), ln_f, lm_head.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import tinygrad_lite.functional as F
from tinygrad_lite import Tensor, backend, is_grad_enabled, nn

from . import fast_decode
from .attention import CausalSelfAttention
from .kv_cache import KVCache
from .rope import RotaryEmbedding

IGNORE = -1  # the target id the loss skips (nanoGPT's, too)


@dataclass
class GPTConfig:
    vocab_size: int = 65  # tokens the model can read and write (65 characters of Shakespeare)
    block_size: int = 64  # the longest context the model sees, in tokens
    n_layer: int = 4  # transformer blocks stacked
    n_head: int = 4  # attention heads per block (n_embd must divide evenly)
    n_embd: int = 128  # width of every token's vector (the residual stream)
    dropout: float = 0.0  # 0 for small data / CPU runs; 0.2 for the GPU Shakespeare preset
    bias: bool = False  # biases in Linear and LayerNorm (GPT-2: True; nanoGPT's default: False)
    pos: str = "learned"  # "learned" absolute positions (GPT-2) or "rope" (Llama)
    layer_norm_eps: float = 1e-5  # added to the variance in every layer norm (GPT-2's, too)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.pos not in ("learned", "rope"):
            raise ValueError(f"pos must be 'learned' or 'rope', got {self.pos!r}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"RoPE needs an even head size; n_embd/n_head = {self.n_embd // self.n_head}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")

    def to_dict(self) -> dict:
        return asdict(self)


def last_block_rows(logits_at, T: int, paged: bool):
    """The rows the last block computes when only logits_at's logits are wanted (None: all).

    Every block needs every row of the block below it (its keys and values), but nothing
    reads the last block's output except the logits. So when a forward pass only wants
    some positions' logits (generation: the last one), the last block computes its keys
    and values for every row (the cache keeps them) and the rest (attention's queries,
    c_proj, the MLP) for those rows only: a prefill of T tokens saves almost a block's
    work (llama.cpp, too, drops the rows no output reads in its last layer). Inference
    only (with gradients every row takes the usual path); for a contiguous batch, the
    rows must be the last ones (a slice ending at T), which causal attention then aligns
    at the end of the keys.
    """
    if logits_at is None or is_grad_enabled():
        return None
    if paged:  # the serving engine's wanted columns (each sequence's last token): the cache sorts them out
        return logits_at if backend.is_array(logits_at) else None
    if isinstance(logits_at, slice):
        start, stop, step = logits_at.indices(T)
        if step == 1 and stop == T and 0 < start < T:
            return slice(start, T)
    return None


class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU, project back. (B, T, C) -> (B, T, C)."""

    def __init__(self, config: GPTConfig) -> None:
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.c_fc(x).gelu()))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

    The residual adds let each block make a small edit to the token's vector and give
    gradients a straight path back to the early layers.
    """

    def __init__(self, config: GPTConfig, rope: RotaryEmbedding | None) -> None:
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.dropout, config.bias, rope)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0, start_pos: int = 0,
                rows=None) -> Tensor:
        """x (B, T, C) -> (B, T, C); with `rows` (an index or slice of the T columns), only
        those rows come out (B, T', C): the attention still reads every row's keys and values."""
        attended = self.attn(self.ln_1(x), cache, layer, start_pos, rows)
        x = (x if rows is None else x[:, rows]) + attended
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        self.config = config
        device = backend.default_device()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token id -> vector
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        rope = (RotaryEmbedding(config.n_embd // config.n_head, config.block_size, device=device)
                if config.pos == "rope" else None)
        self.drop = nn.Dropout(config.dropout)
        self.h = [Block(config, rope) for _ in range(config.n_layer)]
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias, eps=config.layer_norm_eps)
        # the output head reuses wte (weight tying): reading and writing a token share one
        # vector, which saves V x C parameters and trains the embedding from both sides
        self._init_weights()
        self.tokenizer = None  # set by from_pretrained: the tokenizer the weights were trained with

    @classmethod
    def from_pretrained(cls, name_or_dir, dropout: float = 0.0) -> "GPT":
        """Load GPT-2 ("gpt2", "gpt2-medium", ..., "distilgpt2", downloaded on first use), a
        folder in the Hugging Face layout (config.json + model.safetensors), or an out dir
        of train.py. The tokenizer comes along as model.tokenizer. See model/pretrained.py."""
        from .pretrained import from_pretrained  # NOTE: imported here: pretrained.py builds on this file
        return from_pretrained(name_or_dir, dropout)

    def save_pretrained(self, directory, tokenizer=None):
        """Write config.json + model.safetensors (+ the GPT-2 tokenizer's files) in the layout
        that transformers' GPT2LMHeadModel.from_pretrained reads."""
        from .pretrained import save_hf_dir  # NOTE: imported here: pretrained.py builds on this file
        return save_hf_dir(self, directory, tokenizer)

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases; the projections that write into the
        residual stream get std 0.02/sqrt(2 n_layer), so the sum of 2 n_layer such writes
        keeps the stream's variance from growing with depth."""
        device = backend.default_device()
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.data = p.xp.zeros_like(p.data)
            elif name.startswith("h.") and name.endswith(".weight") and ".ln_" not in name:
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else 0.02
                p.data = backend.in_layout_of(backend.randn(p.shape, device, std=std), p.data)  # (Linear's layout)
            elif name in ("wte.weight", "wpe.weight"):
                p.data = backend.randn(p.shape, device, std=0.02)

    def forward(self, idx, targets=None, cache: KVCache | None = None,
                start_pos: int = 0, logits_at=None) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, vocab_size), and the mean cross-entropy
        against targets (B, T) when given; a target of IGNORE (-1) counts for nothing (the
        prompt and padding of fine-tuning chats). With a KV cache, idx holds the tokens at
        positions start_pos .. start_pos+T-1 and the cache supplies the earlier ones. With
        the serving engine's PagedBatch as the cache (model/paged_batch.py), idx (1, N)
        packs several sequences' tokens side by side and each sits at its own position,
        cache.positions (N,). logits_at (an index or slice of the T columns) limits the
        logits to those columns: generation needs the last position's only."""
        idx = idx.data if isinstance(idx, Tensor) else idx
        B, T = idx.shape
        paged = cache is not None and cache.paged
        end = cache.end if paged else start_pos + T
        if end > self.config.block_size:
            raise ValueError(f"sequence of {end} tokens is longer than block_size {self.config.block_size}")
        rows = last_block_rows(logits_at, T, paged)  # what the last block computes (None: every row)
        if fast_decode.applies(self, cache, targets):  # inference in the fast tier: the same kernels, no op machinery
            return fast_decode.forward(self, idx, cache, start_pos, logits_at, rows), None
        x = F.embedding(self.wte.weight, idx)  # (B, T, C)
        if self.wpe is not None:
            positions = (cache.positions if paged else
                         backend.namespace(self.wte.weight.device).arange(start_pos, start_pos + T))
            x = x + F.embedding(self.wpe.weight, positions)  # (T, C) broadcast over B
        x = self.drop(x)
        for layer, block in enumerate(self.h):
            last = layer == len(self.h) - 1
            x = block(x, cache, layer, start_pos, rows if last else None)  # (B, T, C); the last block: (B, T', C)
        if cache is not None and not paged:
            cache.pos = start_pos + T  # every layer has stored its keys and values for these
        if logits_at is not None and rows is None:
            x = x[:, logits_at]  # (B, T', C): only the positions whose next token is wanted
        x = self.ln_f(x)
        logits = F.linear(x, self.wte.weight)  # (B, T, V): tied output head
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE) if targets is not None else None
        return logits, loss

    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow wte (and so the tied head) to vocab_size rows, for new tokens (a chat
        template's). The old rows are kept bitwise; each new row starts as the mean of the
        old ones: a new token then begins with an average logit, neither impossible nor
        dominant, so fine-tuning starts near the base model's loss and the row learns fast
        (small random rows would work too, but would make the new tokens near-impossible
        at first, from logits near 0 against the trained tokens' ones)."""
        old = self.wte.weight.data
        if vocab_size < old.shape[0]:
            raise ValueError(f"resize_token_embeddings only grows: {old.shape[0]} -> {vocab_size}")
        xp = self.wte.weight.xp
        new_rows = xp.broadcast_to(old.mean(axis=0, keepdims=True), (vocab_size - old.shape[0], old.shape[1]))
        self.wte.weight.data = xp.concatenate([old, new_rows.astype(old.dtype)], axis=0)
        self.wte.weight.grad = None
        self.config.vocab_size = vocab_size

    def crop_block_size(self, block_size: int) -> None:
        """Shorten the context to block_size (< the current one): keep wpe's first rows. For
        fine-tuning GPT-2 (1024 positions) on shorter sequences, as nanoGPT does."""
        if not 1 <= block_size <= self.config.block_size:
            raise ValueError(f"can only crop block_size {self.config.block_size} to 1..{self.config.block_size}, "
                             f"not {block_size}")
        self.config.block_size = block_size
        if self.wpe is not None:
            self.wpe.weight.data = self.wpe.weight.data[:block_size].copy()

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, max_len or c.block_size, c.n_embd // c.n_head,
                       dtype=self.wte.weight.dtype, device=self.wte.weight.device)

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Matrices (2-D: linear weights, embeddings) decay; biases and norm weights do not."""
        params = self.parameters()
        return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention
        (PaLM appendix B's estimate, as nanoGPT uses for MFU)."""
        c = self.config
        n = self.num_parameters() - (self.wpe.weight.size if self.wpe is not None else 0)
        return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size
