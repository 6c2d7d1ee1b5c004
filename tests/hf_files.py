"""Small files in the real Hugging Face GPT-2 formats, written by the tests (nothing is
downloaded): vocab.json + merges.txt (GPT-2's byte-level BPE), config.json and
model.safetensors (the hub's `gpt2` layout, scaled down).

The byte alphabet is written out here again, independently of model/tokenizer.py, so
the tests check the tokenizer against a second implementation (and against tiktoken's
own loader of these files).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes are themselves,
    the other 68 (space, controls, ...) become chr(256), chr(257), ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ s", "e r", "o u", "Ġ k", "Ġk in", "Ġkin g",
          "Ġ q", "Ġq u", "e e", "Ġqu ee", "Ġquee n"]  # each merge makes one new token


def write_gpt2_tokenizer(directory: Path, merges: list[str] = MERGES) -> int:
    """vocab.json and merges.txt of a tiny GPT-2 BPE; returns its vocabulary size."""
    alphabet = bytes_to_unicode()
    printable_first = sorted(alphabet, key=lambda b: (alphabet[b] != chr(b), b))  # GPT-2's id order
    vocab = {alphabet[b]: i for i, b in enumerate(printable_first)}
    for line in merges:
        first, second = line.split()
        vocab[first + second] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return len(vocab)


def gpt2_config(vocab_size: int, n_positions: int = 32, n_embd: int = 12, n_layer: int = 2, n_head: int = 3,
                **overrides) -> dict:
    """config.json as the hub's gpt2 has it (same fields), scaled down."""
    return {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
            "bos_token_id": vocab_size - 1, "embd_pdrop": 0.1, "eos_token_id": vocab_size - 1,
            "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": n_positions,
            "n_embd": n_embd, "n_head": n_head, "n_layer": n_layer, "n_positions": n_positions,
            "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
            "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
            "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
            "vocab_size": vocab_size, **overrides}


def gpt2_weights(config: dict, seed: int = 0, prefix: str = "", with_mask_buffers: bool = True) -> dict:
    """Random weights under the hub's key names and Conv1D (in, out) shapes; non-square
    matrices and non-zero biases everywhere, so a missed transpose shows in the logits."""
    rng = np.random.default_rng(seed)
    C, V, P, L = config["n_embd"], config["vocab_size"], config["n_positions"], config["n_layer"]

    def w(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)
    out = {f"{prefix}wte.weight": w(V, C), f"{prefix}wpe.weight": w(P, C, scale=0.05),
           f"{prefix}ln_f.weight": 1 + w(C, scale=0.1), f"{prefix}ln_f.bias": w(C, scale=0.1)}
    for i in range(L):
        h = f"{prefix}h.{i}."
        out.update({
            h + "ln_1.weight": 1 + w(C, scale=0.1), h + "ln_1.bias": w(C, scale=0.1),
            h + "attn.c_attn.weight": w(C, 3 * C), h + "attn.c_attn.bias": w(3 * C, scale=0.1),
            h + "attn.c_proj.weight": w(C, C), h + "attn.c_proj.bias": w(C, scale=0.1),
            h + "ln_2.weight": 1 + w(C, scale=0.1), h + "ln_2.bias": w(C, scale=0.1),
            h + "mlp.c_fc.weight": w(C, 4 * C), h + "mlp.c_fc.bias": w(4 * C, scale=0.1),
            h + "mlp.c_proj.weight": w(4 * C, C), h + "mlp.c_proj.bias": w(C, scale=0.1)})
        if with_mask_buffers:  # what older transformers versions saved beside the weights
            out[h + "attn.bias"] = np.tril(np.ones((P, P), np.float32))[None, None]
            out[h + "attn.masked_bias"] = np.array(-1e4, np.float32)
    return out


def write_gpt2_dir(directory: Path, seed: int = 0, prefix: str = "", tokenizer: bool = True, **config) -> Path:
    """A tiny GPT-2 in the hub's layout: config.json, model.safetensors (+ vocab.json, merges.txt)."""
    from safetensors.numpy import save_file
    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = write_gpt2_tokenizer(directory) if tokenizer else config.pop("vocab_size", 40)
    cfg = gpt2_config(vocab_size, **config)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(gpt2_weights(cfg, seed, prefix), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
