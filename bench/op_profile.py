"""Where one training step's time goes, op by op (tinygrad_lite's per-op timers).

    python bench/op_profile.py [--steps 20] [--ops primitive|fused|fast] [--shape cpu|long|gpu-preset]
    python bench/op_profile.py --repo ../other-checkout   # the same profile of another checkout

The model and batch of bench/train_speed.py's --shape (cpu: the shakespeare-char-cpu
preset, 64 tokens; long: 512 tokens; gpu-preset: 256) and train.py's step (forward,
backward, clip, AdamW, zero_grad) on a fixed random batch, in one process (train.py
splits the batch over the cores; each of its shards runs these same ops on part of the
batch). Prints ms per step for every op's forward and backward pass, and what is left
outside the ops (optimizer, clipping, Python). --repo imports tinygrad_lite and model
from another checkout (a before/after profile from one script; one without tiers runs
its own ops).
"""
from __future__ import annotations

import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ops", default=None, help="the ops tier to profile: primitive, fused or fast (default: fast)")
    p.add_argument("--shape", default="cpu", help="cpu, long or gpu-preset (bench/train_speed.py's shapes)")
    p.add_argument("--repo", default=str(ROOT), help="checkout whose tinygrad_lite, model and train.py to run")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.shapes import SHAPES  # this checkout's shapes, whichever repo runs
    sys.path.insert(0, str(Path(args.repo).resolve()))  # first: its tinygrad_lite, model and train.py
    if args.shape not in SHAPES:
        p.error(f"--shape must be one of {', '.join(SHAPES)}")
    import tinygrad_lite
    try:
        from tinygrad_lite import cpu
        cpu.tune()  # malloc and threads, as train.py does (tinygrad_lite/cpu.py)
    except ImportError:  # a checkout from before tinygrad_lite/cpu.py
        pass
    tier = contextlib.nullcontext()
    if args.ops is not None or hasattr(tinygrad_lite, "ops_tier"):
        tier = tinygrad_lite.ops_tier(args.ops or tinygrad_lite.functional.DEFAULT_TIER)
    with tier:
        return profile(args, SHAPES[args.shape])


def profile(args: argparse.Namespace, shape: dict) -> int:
    from model.gpt import GPT, GPTConfig
    from tinygrad_lite import manual_seed, optim
    from tinygrad_lite.profiler import format_table, profile_ops
    from train import PRESETS
    cfg = {**PRESETS["shakespeare-char-cpu"], **shape}
    manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                          n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=cfg.get("dropout", 0.0)))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 65, (cfg["batch_size"], cfg["block_size"]))
    y = rng.integers(0, 65, (cfg["batch_size"], cfg["block_size"]))
    opt = optim.AdamW(model.optimizer_groups(cfg["weight_decay"]), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]))

    def step():
        _, loss = model(x, y)
        loss.item()
        loss.backward()
        optim.clip_grad_norm(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad()
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    plain = (time.perf_counter() - start) / args.steps
    with profile_ops() as table:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        total = time.perf_counter() - start
    print(format_table(table, total, args.steps))
    print(f"{args.repo}, shape {args.shape} ({cfg['batch_size']} x {cfg['block_size']} tokens, "
          f"{cfg['n_layer']} layers x {cfg['n_embd']}): step without timers: {1000 * plain:.1f} ms; "
          f"with timers: {1000 * total / args.steps:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
