"""Real weights: GPT-2 in and out in the Hugging Face layout, and names from the hub.

A GPT-2 model on the Hugging Face hub is a folder:

    config.json          n_embd, n_layer, n_head, n_positions, vocab_size, layer_norm_epsilon, ...
    model.safetensors    the weights (float32), pickle-free
    vocab.json, merges.txt   its BPE tokenizer (model/tokenizer.py: GPT2BPETokenizer)

Our GPT uses GPT-2's names already (wte, wpe, h.N.attn.c_attn, ln_f, ...), so loading is
almost a copy. Two differences:
- GPT-2 was written with a "Conv1D" layer that stores each matrix as (in, out) and
  computes x @ W; our Linear stores (out, in) as PyTorch does and computes x @ W^T. So
  the four matrices of every block (c_attn, attn.c_proj, c_fc, mlp.c_proj) are
  transposed on the way in and out. Getting this wrong goes unnoticed for square
  matrices of random values, and shows at once on non-square ones (c_attn is C x 3C).
- The hub's own gpt2 file was saved from `GPT2Model` (keys `h.0.attn.c_attn.weight`);
  `GPT2LMHeadModel.save_pretrained` writes `transformer.h.0...`. Both are read; we write
  the second. `attn.bias` / `attn.masked_bias` are the causal mask, stored as buffers by
  older versions: not weights, skipped. The output head is tied to wte, as in GPT-2.

    model = GPT.from_pretrained("gpt2")          # or a folder in this layout, or an out dir of ours
    model.save_pretrained("my-gpt2")             # transformers.GPT2LMHeadModel.from_pretrained reads it
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from tinygrad_lite import backend

from .checkpoint import CheckpointError, file_sha256, has_checkpoint, load_checkpoint
from .gpt import GPT, GPTConfig
from .tokenizer import GPT2BPETokenizer, tokenizer_from_dict

# the names accepted on the command line, and the hub repositories they live in
HUB_NAMES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
             "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
             "distilgpt2": "distilbert/distilgpt2"}
CONFIG, WEIGHTS, TOKENIZER_FILES = "config.json", "model.safetensors", ("vocab.json", "merges.txt")
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")  # (in, out)
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # the causal mask, not weights
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # GPT-2's GELU: the tanh approximation, as ours


class PretrainedError(ValueError):
    """A pretrained model that cannot be found, read or used here; the message is one line."""


# --- config.json <-> GPTConfig ----------------------------------------------------------------


def config_from_hf(hf: dict[str, Any], where: Path, dropout: float = 0.0) -> GPTConfig:
    """GPTConfig for a GPT-2 config.json; a PretrainedError for what our GPT cannot run."""
    architectures = hf.get("architectures") or []
    if hf.get("model_type") != "gpt2" and not any(a.startswith("GPT2") for a in architectures):
        raise PretrainedError(f"{where}: unknown architecture (model_type {hf.get('model_type')!r}, "
                              f"architectures {architectures}); only GPT-2 models can be loaded")
    missing = [k for k in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size") if k not in hf]
    if missing:
        raise PretrainedError(f"{where}: config.json lacks {', '.join(missing)}")
    unsupported = []
    if hf.get("activation_function", "gelu_new") not in GELU_TANH:
        unsupported.append(f"activation_function {hf['activation_function']!r} (ours is GPT-2's tanh GELU)")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        unsupported.append(f"n_inner {hf['n_inner']} (ours is 4 * n_embd)")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        unsupported.append("a different attention scale")
    if unsupported:
        raise PretrainedError(f"{where}: this GPT-2 variant is not supported: {'; '.join(unsupported)}")
    try:
        return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                         n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout, bias=True,
                         pos="learned", layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    except ValueError as e:
        raise PretrainedError(f"{where}: {e}") from None


def config_to_hf(config: GPTConfig, eos_token_id: int | None = None) -> dict[str, Any]:
    """config.json for GPT2LMHeadModel (transformers) describing our model."""
    if config.pos != "learned":
        raise PretrainedError(f"a model with {config.pos} positions cannot be saved as GPT-2, which "
                              "has learned absolute positions (wpe); only pos='learned' models export")
    eos = config.vocab_size - 1 if eos_token_id is None else eos_token_id
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
            "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_ctx": config.block_size,
            "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
            "layer_norm_epsilon": config.layer_norm_eps, "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout, "attn_pdrop": 0.0, "initializer_range": 0.02,
            "scale_attn_weights": True, "tie_word_embeddings": True, "bos_token_id": eos,
            "eos_token_id": eos, "torch_dtype": "float32"}


# --- weights: hub names <-> ours --------------------------------------------------------------


def our_name(hf_name: str) -> str | None:
    """Our parameter name for a key of a GPT-2 safetensors file; None for what is skipped."""
    name = hf_name.removeprefix("transformer.")
    if name == "lm_head.weight" or name.endswith(MASK_BUFFERS):
        return None  # the head is tied to wte; the mask buffers are not weights
    return name


def load_hf_dir(directory: Path, dropout: float = 0.0) -> GPT:
    """A GPT (model.tokenizer attached when the folder has one) from a GPT-2 folder."""
    from safetensors import safe_open
    directory = Path(directory)
    for required in (CONFIG, WEIGHTS):
        if not (directory / required).is_file():
            raise PretrainedError(f"{directory} has no {required}: a pretrained model folder needs "
                                  f"{CONFIG} and {WEIGHTS} (the Hugging Face layout)")
    try:
        hf = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise PretrainedError(f"{directory / CONFIG} is not valid JSON ({e})") from None
    model = GPT(config_from_hf(hf, directory, dropout))
    tokenizer = None
    if all((directory / f).is_file() for f in TOKENIZER_FILES):
        tokenizer = GPT2BPETokenizer.from_files(*(directory / f for f in TOKENIZER_FILES))
        if tokenizer.vocab_size < model.config.vocab_size:
            raise PretrainedError(f"{directory}: vocab_size {model.config.vocab_size} in {CONFIG} is larger "
                                  f"than its tokenizer's {tokenizer.vocab_size} tokens")
    params = dict(model.named_parameters())
    seen = set()
    try:
        with safe_open(str(directory / WEIGHTS), framework="numpy") as f:
            for key in f.keys():
                name = our_name(key)
                if name is None:
                    continue
                if name not in params:
                    raise PretrainedError(f"{directory / WEIGHTS}: unexpected key {key!r} for a GPT-2 of "
                                          f"{model.config.n_layer} layers")
                value = f.get_tensor(key)  # one tensor at a time: peak memory stays ~ the model
                p, conv1d = params[name], name.endswith(CONV1D)
                expected = tuple(reversed(p.shape)) if conv1d else p.shape  # Conv1D stores (in, out)
                if tuple(value.shape) != expected:
                    raise PretrainedError(f"{directory / WEIGHTS}: {key!r} has shape {tuple(value.shape)}, "
                                          f"expected {expected}")
                if conv1d:
                    value = value.T  # Conv1D (in, out) -> Linear (out, in): a view, column-major as Linear keeps W
                p.data = backend.in_layout_of(backend.asarray(value, p.device, np.float32), p.data)
                seen.add(name)
    except PretrainedError:
        raise
    except Exception as e:  # a damaged file, or a dtype NumPy lacks (bfloat16)
        raise PretrainedError(f"{directory / WEIGHTS} cannot be read ({type(e).__name__}: {e})") from None
    missing = sorted(set(params) - seen)
    if missing:
        raise PretrainedError(f"{directory / WEIGHTS} lacks {len(missing)} weight(s), e.g. {missing[0]!r}")
    model.tokenizer = tokenizer
    return model


def save_hf_dir(model: GPT, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write model (and a GPT-2 BPE tokenizer) as a GPT-2 folder that transformers reads."""
    from safetensors.numpy import save_file
    config = config_to_hf(model.config)  # PretrainedError for RoPE models
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    C = model.config.n_embd
    tensors = {}
    for name, value in state.items():
        tensors["transformer." + name] = np.ascontiguousarray(value.T if name.endswith(CONV1D) else value)
    for i in range(model.config.n_layer):  # GPT-2 has every bias: a model without them exports zeros
        for layer, width in (("ln_1", C), ("ln_2", C), ("attn.c_attn", 3 * C), ("attn.c_proj", C),
                             ("mlp.c_fc", 4 * C), ("mlp.c_proj", C)):
            tensors.setdefault(f"transformer.h.{i}.{layer}.bias", np.zeros(width, np.float32))
    tensors.setdefault("transformer.ln_f.bias", np.zeros(C, np.float32))
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})  # "pt": what transformers expects
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if isinstance(tokenizer, GPT2BPETokenizer):
        (directory / "vocab.json").write_text(json.dumps(tokenizer.vocab, ensure_ascii=False), encoding="utf-8")
        (directory / "merges.txt").write_text(tokenizer.merges, encoding="utf-8")
        config["bos_token_id"] = config["eos_token_id"] = tokenizer.special.get("<|endoftext|>", config["eos_token_id"])
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory


# --- names on the hub ------------------------------------------------------------------------


def _git_blob_sha1(path: Path) -> str:
    """The hash git (and so the hub) gives a small file: sha1 of 'blob <size>\\0' + content."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def download(name: str) -> Path:
    """The local folder of hub model `name` (gpt2, distilgpt2, ... or 'org/repo'), fetched on
    first use into the Hugging Face cache, each file's hash checked against the hub's."""
    how = (f"download it where there is a network and pass its folder ({CONFIG} + {WEIGHTS}) "
           "to --init-from instead")
    try:
        import huggingface_hub
    except ImportError:
        raise PretrainedError(f"{name!r} is not a folder, and loading it from the Hugging Face hub needs "
                              f"huggingface_hub: pip install 'tinygrad_lite[hf]'; or {how}") from None
    repo = HUB_NAMES.get(name, name)
    try:
        info = huggingface_hub.HfApi().model_info(repo, files_metadata=True)
        files = {s.rfilename: s for s in info.siblings or []}
        if WEIGHTS not in files or CONFIG not in files:
            raise PretrainedError(f"hub model {repo!r} has no {WEIGHTS} (only PyTorch .bin weights?); {how}")
        paths = {}
        for filename in (CONFIG, WEIGHTS, *TOKENIZER_FILES):
            if filename in files:
                paths[filename] = Path(huggingface_hub.hf_hub_download(repo, filename, revision=info.sha))
    except PretrainedError:
        raise
    except Exception as e:  # offline, a name the hub does not know, a timeout, ...
        reason = " ".join(str(e).split())[:200]
        raise PretrainedError(f"cannot get {name!r} from the Hugging Face hub ({type(e).__name__}: {reason}); "
                              f"{how}") from None
    for filename, path in paths.items():  # the hub's own hashes: sha256 for large (LFS) files, git's sha1 else
        sibling = files[filename]
        lfs = getattr(sibling, "lfs", None)
        expected, got = (lfs.sha256, file_sha256(path)) if lfs else (sibling.blob_id, _git_blob_sha1(path))
        if expected and got != expected:
            raise PretrainedError(f"{path} does not match the hub's hash for {repo}/{filename} "
                                  f"({got} != {expected}); delete it and try again")
    return paths[CONFIG].parent


# --- one entry point --------------------------------------------------------------------------


def resolve(name_or_dir: str | Path) -> tuple[str, Path]:
    """Where --init-from X points, in this order: an out dir of ours ("ours"), a folder in
    the Hugging Face layout ("hf"), else a hub name, downloaded ("hf")."""
    path = Path(name_or_dir)
    if path.exists():
        if has_checkpoint(path):
            return "ours", path
        if path.is_dir() and ((path / CONFIG).exists() or (path / WEIGHTS).exists()):
            return "hf", path
        raise PretrainedError(f"{path} is neither an out dir of train.py (no checkpoint.json) nor a "
                              f"pretrained model folder (no {CONFIG})")
    if str(name_or_dir).startswith((".", "/", "~")) or str(name_or_dir).endswith("/"):
        raise PretrainedError(f"{name_or_dir} does not exist")
    return "hf", download(str(name_or_dir))


def from_pretrained(name_or_dir: str | Path, dropout: float = 0.0) -> GPT:
    """A GPT with the weights of an out dir of ours, a GPT-2 folder, or a hub name; its
    tokenizer is attached as model.tokenizer (None if a GPT-2 folder has none)."""
    kind, path = resolve(name_or_dir)
    if kind == "hf":
        return load_hf_dir(path, dropout)
    return load_out_dir(path, dropout)


def load_out_dir(out_dir: Path, dropout: float = 0.0) -> GPT:
    """A GPT, tokenizer attached, from the current checkpoint of train.py's out dir."""
    state, meta, _ = load_checkpoint(out_dir)  # CheckpointError on any problem
    if "model_config" not in meta or "tokenizer" not in meta:
        raise CheckpointError(f"{out_dir} has no model_config/tokenizer in its header; was it written by train.py?")
    try:
        config = GPTConfig(**{**meta["model_config"], "dropout": dropout})
        model = GPT(config)
        model.load_state_dict(state)
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{out_dir}: the checkpoint does not fit its own config: {e}") from None
    model.tokenizer = tokenizer_from_dict(meta["tokenizer"])
    if model.tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{out_dir}: tokenizer has {model.tokenizer.vocab_size} tokens, "
                              f"the model {config.vocab_size}")
    return model
