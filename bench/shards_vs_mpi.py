"""Two cores, two ways: train.py's local data-parallel shards against mpiexec -n 2.

    python bench/shards_vs_mpi.py            # 5 alternating runs of each, 200 iterations
The default preset (shakespeare-char-cpu), the same global batch of 12 x 64 in both:
`python train.py` splits it over one worker process per core itself (shared memory,
tinygrad_lite/parallel.py); `mpiexec -n 2 python train.py` runs two ranks that add their
gradients with one MPI all-reduce a step (tinygrad_lite/distributed.py). Each run's
median step time comes from its log.jsonl (the first 20 steps, warm-up, left out);
the two commands alternate, order flipped each repeat. Writes bench/results/shards_vs_mpi.json.
"""
from __future__ import annotations

import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "shards_vs_mpi.json"


def run(kind: str, iters: int) -> float:
    out = Path(tempfile.mkdtemp(prefix=f"shards-vs-mpi-{kind}-"))
    cmd = [sys.executable, str(ROOT / "train.py"), "--out-dir", str(out), "--max-iters", str(iters),
           "--eval-interval", str(iters), "--eval-iters", "2", "--no-progress"]
    if kind == "mpi":
        mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or "mpiexec"
        cmd = [mpiexec, "-n", "2", *cmd]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    shutil.rmtree(out)
    return statistics.median(r["ms"] for r in rows if r["kind"] == "train" and r["iter"] > 20)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=200)
    args = p.parse_args(argv)
    times = {"shards": [], "mpi": []}
    for r in range(args.repeats):
        for kind in (("shards", "mpi") if r % 2 == 0 else ("mpi", "shards")):
            times[kind].append(run(kind, args.iters))
            print(f"repeat {r + 1}/{args.repeats} {kind:>6}: {times[kind][-1]:.1f} ms/step", flush=True)
    summary = {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "runs_ms": v}
               for k, v in times.items()}
    summary["mpi_over_shards"] = summary["mpi"]["median_ms"] / summary["shards"]["median_ms"]
    print(f"python train.py (2 local shards): {summary['shards']['median_ms']:.1f} ms/step "
          f"({summary['shards']['min_ms']:.1f}-{summary['shards']['max_ms']:.1f}); mpiexec -n 2: "
          f"{summary['mpi']['median_ms']:.1f} ms/step ({summary['mpi']['min_ms']:.1f}-{summary['mpi']['max_ms']:.1f}); "
          f"MPI / shards = {summary['mpi_over_shards']:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"iters": args.iters, "repeats": args.repeats, **summary}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
