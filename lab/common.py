"""What every lab script shares: paths, the plotting guard, a small in-process
training loop, checkpoint loading, and the trained Shakespeare model they probe.

The labs are experiments, not library code: each script in lab/ trains or loads a
small GPT, measures one idea from the theory of large language models, writes its
numbers to a JSON file and a picture to a PNG, and says in its docstring what a model
this small can and cannot tell us.

The training loop here is train.py's loop with the file handling taken out, built from
the same pieces (GPT, AdamW, the warmup + cosine schedule, gradient clipping,
get_batch), so a lab can train a dozen small models in one process and look at them
without going through checkpoints. The one model several labs share, the "base" model,
is trained by train.py itself:

    model, tokenizer, info = base_model(out_dir)   # trains once (~3 min), then loads

Every script takes --quick (tiny settings, seconds: what tests/test_lab.py runs) and
--out (default lab/results/).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python lab/x.py` puts lab/, not the repo root, on the path
    sys.path.insert(0, str(ROOT))

import train  # noqa: E402  (needs the path above)
from model.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from model.data import encode_dataset, get_batch, load_text, shakespeare_path  # noqa: E402
from model.gpt import GPT, GPTConfig  # noqa: E402
from model.tokenizer import Tokenizer, make_tokenizer, tokenizer_from_dict  # noqa: E402
from tinygrad_lite import backend, no_grad, optim  # noqa: E402
import tinygrad_lite.functional as F  # noqa: E402

DEFAULT_OUT = ROOT / "lab" / "results"
CPU_PRESET = train.PRESETS["shakespeare-char-cpu"]  # the optimizer settings every lab starts from
# train.py's out dir for the default preset: reused as the base model when it is finished
TRAIN_PY_OUT = ROOT / f"out-{train.DEFAULT_PRESET}"


# ------------------------------------------------------------------------ script plumbing


def require_matplotlib():
    """pyplot with the file-only Agg backend, or exit with one line saying how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: the lab scripts draw with matplotlib: pip install matplotlib "
                 "(or pip install -e '.[plot]')")
    return plt


def lab_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every lab takes: --quick, --out, --seed."""
    p = argparse.ArgumentParser(description=doc.strip().split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings that finish in seconds (for tests)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="where the PNG, the JSON and the base model go")
    p.add_argument("--seed", type=int, default=1337)
    return p


def write_results(out: Path, name: str, results: dict, fig) -> tuple[Path, Path]:
    """<out>/<name>.json and <out>/<name>.png; returns both paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    json_path.write_text(json.dumps(results, indent=1, default=_jsonable) + "\n")
    fig.savefig(png_path, dpi=110)
    print(f"wrote {json_path} and {png_path}", file=sys.stderr)
    return json_path, png_path


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- data


def shakespeare_char(cache_dir: Path) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """The char tokenizer of tiny Shakespeare and its (train (N,), val (M,)) ids, encoded once
    into cache_dir, exactly as train.py prepares them."""
    text = load_text(shakespeare_path())
    tokenizer = make_tokenizer("char", text)
    train_ids, val_ids = encode_dataset(text, tokenizer, cache_dir)
    return tokenizer, train_ids, val_ids


# ---------------------------------------------------------------------------- training


@dataclass
class TrainSpec:
    """One small training run. Defaults: train.py's CPU preset (AdamW 0.9/0.99, weight decay
    0.1 on matrices, clip 1.0, lr 1e-3 with a cosine decay to a tenth of it over the run)."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    batch_size: int = 12
    iters: int = 1000
    lr: float = CPU_PRESET["lr"]
    warmup_iters: int = CPU_PRESET["warmup_iters"]
    weight_decay: float = CPU_PRESET["weight_decay"]
    grad_clip: float = CPU_PRESET["grad_clip"]
    pos: str = "learned"
    seed: int = 1337

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=0.0, bias=False, pos=self.pos)


def train_gpt(spec: TrainSpec, vocab_size: int, next_batch: Callable[[np.random.Generator], tuple],
              ignore_index: int | None = None, every: int = 0,
              on_eval: Callable[[int, GPT], None] | None = None) -> tuple[GPT, dict]:
    """Train a fresh GPT for spec.iters steps; returns (model in eval mode, summary).

    next_batch(rng) -> (x (B, T), y (B, T)) int64 ids. Targets equal to ignore_index count
    for nothing in the loss (a task that only grades some positions). on_eval(it, model)
    runs every `every` steps and after the last one, under no_grad with the model in eval mode.
    """
    backend.manual_seed(spec.seed)
    model = GPT(spec.model_config(vocab_size))
    optimizer = optim.AdamW(model.optimizer_groups(spec.weight_decay), lr=spec.lr,
                            betas=(CPU_PRESET["beta1"], CPU_PRESET["beta2"]))
    rng = np.random.default_rng(spec.seed)
    warmup = min(spec.warmup_iters, spec.iters // 10)
    losses, start = [], time.perf_counter()
    for it in range(spec.iters + 1):
        if on_eval is not None and (it == spec.iters or (every and it % every == 0)):
            model.eval()
            with no_grad():
                on_eval(it, model)
            model.train()
        if it == spec.iters:
            break
        lr = optim.cosine_lr(it, spec.lr, spec.lr / 10, warmup, spec.iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = next_batch(rng)
        if ignore_index is None:
            _, loss = model(x, y)  # (B, T) -> mean cross-entropy over every position
        else:
            logits, _ = model(x)  # (B, T, V)
            loss = F.cross_entropy(logits, y, ignore_index=ignore_index)
        loss.backward()
        optim.clip_grad_norm(model.parameters(), spec.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    seconds = time.perf_counter() - start
    summary = {"iters": spec.iters, "seconds": seconds, "final_train_loss": float(np.mean(losses[-20:]))
               if losses else math.nan, "params": model.num_parameters()}
    return model, summary


def lm_batches(ids: np.ndarray, batch_size: int, block_size: int) -> Callable[[np.random.Generator], tuple]:
    """next_batch for next-token prediction on a token array (train.py's get_batch)."""
    return lambda rng: get_batch(ids, batch_size, block_size, rng)


def eval_loss(model: GPT, ids: np.ndarray, block_size: int, n_batches: int = 40, batch_size: int = 16,
              seed: int = 0) -> float:
    """Mean next-token cross-entropy (nats) on n_batches fixed random windows of `ids`.
    The same seed gives the same windows, so every model is scored on the same text."""
    rng = np.random.default_rng(seed)
    model.eval()
    with no_grad():
        return float(np.mean([model(*get_batch(ids, batch_size, block_size, rng))[1].item()
                              for _ in range(n_batches)]))


# --------------------------------------------------------------------- checkpoints


def load_model(path: str | Path) -> tuple[GPT, Tokenizer, dict]:
    """(model in eval mode, tokenizer, checkpoint header) from an out dir or ckpt.npz."""
    state, meta, _ = load_checkpoint(path)  # CheckpointError on any problem
    if "model_config" not in meta or "tokenizer" not in meta:
        raise CheckpointError(f"{path} has no model_config/tokenizer: not written by train.py")
    model = GPT(GPTConfig(**meta["model_config"]))
    model.load_state_dict(state)
    return model.eval(), tokenizer_from_dict(meta["tokenizer"]), meta


# train.py flags of the base model: its CPU preset (4 layers x 128, block 64, 2000 iterations,
# ~0.8M parameters, val loss ~1.5-1.9), and a throwaway 1-layer model for --quick
BASE_FLAGS = ["--eval-interval", "500", "--eval-iters", "20"]
QUICK_BASE_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "64",
                    "--batch-size", "8", "--max-iters", "40", "--warmup-iters", "4",
                    "--lr-decay-iters", "40", "--lr", "3e-3", "--eval-interval", "40", "--eval-iters", "2"]


def _finished_char_model(out_dir: Path) -> bool:
    """Is out_dir train.py's finished default run on tiny Shakespeare, char level?"""
    try:
        _, meta, _ = load_checkpoint(out_dir)
    except CheckpointError:
        return False
    cfg = meta.get("config", {})
    return (cfg.get("tokenizer") == "char" and not cfg.get("data")
            and meta.get("iter_num", 0) >= cfg.get("max_iters", math.inf))


def base_model(out: Path, quick: bool = False) -> tuple[GPT, Tokenizer, dict]:
    """The char-level tiny Shakespeare model the labs probe: (model, tokenizer, info).

    Looked for in <out>/base (quick: <out>/base-quick), then, except with quick, in
    train.py's own out-shakespeare-char-cpu/ when that run finished; otherwise train.py
    trains it into <out>/base (once: later calls load it).
    """
    out_dir = Path(out) / ("base-quick" if quick else "base")
    if not _finished_char_model(out_dir):
        if not quick and _finished_char_model(TRAIN_PY_OUT):
            out_dir = TRAIN_PY_OUT
        else:
            log(f"training the base model into {out_dir} with train.py (once)")
            flags = QUICK_BASE_FLAGS if quick else BASE_FLAGS
            code = train.main(["--out-dir", str(out_dir), "--no-progress", *flags])
            if code != 0:
                sys.exit(f"error: training the base model failed (train.py exit code {code})")
    model, tokenizer, meta = load_model(out_dir)
    info = {"dir": str(out_dir), "params": model.num_parameters(), "iters": meta["iter_num"],
            "val_loss": (meta.get("losses") or {}).get("val"), "config": meta["model_config"]}
    log(f"base model: {out_dir} ({info['params'] / 1e6:.2f}M parameters, {info['iters']} iterations, "
        f"val loss {info['val_loss']:.3f})")
    return model, tokenizer, info
