"""Where one training step's time goes, op by op (tinygrad_lite's per-op timers).

    python bench/op_profile.py [--steps 20] [--ops primitive|fused|fast]

The shakespeare-char-cpu model and train.py's step (forward, backward, clip, AdamW,
zero_grad) on a fixed random batch, in one process (train.py splits the batch over the
cores; each of its shards runs these same ops on part of the batch). Prints ms per step for every op's forward and
backward pass, and what is left outside the ops (optimizer, clipping, Python).
"""
from __future__ import annotations

import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.gpt import GPT, GPTConfig  # noqa: E402
from tinygrad_lite import cpu, manual_seed, ops_tier, optim  # noqa: E402
from tinygrad_lite.functional import DEFAULT_TIER, TIERS  # noqa: E402
from tinygrad_lite.profiler import format_table, profile_ops  # noqa: E402
from train import PRESETS  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ops", choices=list(TIERS), default=DEFAULT_TIER, help="the ops tier to profile")
    args = p.parse_args()
    cpu.tune()  # malloc and threads, as train.py does (tinygrad_lite/cpu.py)
    with ops_tier(args.ops):
        return profile(args)


def profile(args: argparse.Namespace) -> int:
    cfg = PRESETS["shakespeare-char-cpu"]
    manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                          n_head=cfg["n_head"], n_embd=cfg["n_embd"]))
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
    print(f"step without timers: {1000 * plain:.1f} ms; with timers: {1000 * total / args.steps:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
