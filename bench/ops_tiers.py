"""What fusing buys, and what the kernels buy: train.py's step on each ops tier, side by side.

    python bench/ops_tiers.py                 # --steps 10 --warmup 2 --repeats 5
    python bench/ops_tiers.py --shards 1      # one process (the per-op view)

The model and the step are bench/train_speed.py's (the shakespeare-char-cpu preset:
forward with targets, backward, clip, AdamW, zero_grad, the batch split over the cores
as train.py does). Each repeat runs every tier once, each in a fresh subprocess, in an
order rotated every repeat, so a background load that comes and goes hits all alike.
Prints ms per step (median, min-max) and writes bench/results/ops_tiers.json.
"""
from __future__ import annotations

import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.train_speed import PRESET, batches, peak_rss_mb, tinygrad_setup  # noqa: E402
from tinygrad_lite import ops_tier  # noqa: E402
from tinygrad_lite.functional import TIERS  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "ops_tiers.json"


def worker(tier: str, steps: int, warmup: int, shards: int | None) -> dict:
    """Time `steps` training steps in `tier` after `warmup` untimed ones."""
    with ops_tier(tier):
        _, step = tinygrad_setup(shards=shards)
        data = batches(warmup + steps)
        for x, y in data[:warmup]:
            step(x, y)
        times = []
        for x, y in data[warmup:]:
            start = time.perf_counter()
            loss = step(x, y)
            times.append(time.perf_counter() - start)
    workers = len(step.parallel.workers)
    step.parallel.close()  # joined, so their peak memory is counted
    return {"tier": tier, "ms_per_step": 1000 * statistics.median(times), "last_loss": loss,
            "peak_rss_mb": peak_rss_mb(workers), "shards": 1 + workers}


def run_worker(args: argparse.Namespace, tier: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tier, "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--shards", str(args.shards)] if args.shards else [])
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"worker {tier} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per tier")
    p.add_argument("--shards", type=int, default=None, help="data-parallel shards (default: train.py's choice)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", choices=list(TIERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup, args.shards)))
        return 0
    tiers = list(TIERS)
    runs: dict[str, list[dict]] = {t: [] for t in tiers}
    for r in range(args.repeats):
        for tier in tiers[r % len(tiers):] + tiers[:r % len(tiers)]:  # rotate the order
            result = run_worker(args, tier)
            runs[tier].append(result)
            print(f"repeat {r + 1}/{args.repeats} {tier:>9}: {result['ms_per_step']:7.1f} ms/step", flush=True)
    fast = statistics.median(x["ms_per_step"] for x in runs["fast"])
    rows = []
    print(f"\nshakespeare-char-cpu training step (batch {PRESET['batch_size']} x {PRESET['block_size']}), "
          f"{runs['fast'][0]['shards']} shard(s), {args.steps} steps x {args.repeats} repeats")
    print(f"{'tier':>10} | {'ms/step median (min-max)':>26} | {'x fast':>6} | peak RSS MB")
    for tier in tiers:
        ms = [x["ms_per_step"] for x in runs[tier]]
        row = {"tier": tier, "median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
               "vs_fast": statistics.median(ms) / fast, "peak_rss_mb": max(x["peak_rss_mb"] for x in runs[tier]),
               "last_loss": runs[tier][-1]["last_loss"]}
        rows.append(row)
        cell = f"{row['median_ms']:.1f} ({row['min_ms']:.1f}-{row['max_ms']:.1f})"
        print(f"{tier:>10} | {cell:>26} | {row['vs_fast']:>5.2f}x | {row['peak_rss_mb']:.0f}")
    report = {"what": "ms per training step on each ops tier, shakespeare-char-cpu", "rows": rows,
              "shards": runs["fast"][0]["shards"], "steps": args.steps, "repeats": args.repeats,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "versions": {"python": platform.python_version()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
