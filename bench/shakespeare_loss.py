"""Measure what `train.py --preset shakespeare-char-cpu` reaches: val loss and wall time.

    python bench/shakespeare_loss.py [--preset shakespeare-char-cpu] [--out-dir out-bench-loss]

Runs the full preset (2000 iterations on the CPU) in a subprocess, then reads the
final losses from the checkpoint's log. nanoGPT's PyTorch model with the same config
reaches about 1.88-1.90 val loss; the target here is <= 1.90.
"""
from __future__ import annotations

import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="shakespeare-char-cpu")
    p.add_argument("--out-dir", default="out-bench-loss")
    p.add_argument("--target", type=float, default=1.90)
    p.add_argument("extra", nargs="*", help="more train.py flags, after --")
    args = p.parse_args()
    out_dir = ROOT / args.out_dir
    if out_dir.exists():  # a fresh run: no checkpoint or log of an earlier one
        shutil.rmtree(out_dir)
    cmd = [sys.executable, str(ROOT / "train.py"), "--preset", args.preset, "--out-dir", str(out_dir),
           "--no-progress", *args.extra]
    print("running:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    steps = [r for r in rows if r["kind"] == "train"]
    last = evals[-1]
    median_ms = sorted(r["ms"] for r in steps)[len(steps) // 2]
    result = {"preset": args.preset, "iters": last["iter"], "train_loss": round(last["train"], 4),
              "val_loss": round(last["val"], 4), "wall_s": round(wall, 1),
              "median_step_ms": round(median_ms, 1), "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
              "target_val_loss": args.target, "met": last["val"] <= args.target}
    print(json.dumps(result, indent=2))
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / f"loss_{args.preset}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
