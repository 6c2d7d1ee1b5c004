"""The serving engine of another commit against this checkout's, side by side in one process.

    python bench/engine_ab.py --against 2a77a65                     # the lab's batch sweep
    python bench/engine_ab.py --against 2a77a65 --workload poisson  # arrivals at 20, 100, 200/s
    python bench/engine_ab.py --against 2a77a65 --workload same     # 8 prompts of one length

This VM's speed drifts by tens of percent from minute to minute, so two engines are only
comparable run against run in one process. The other commit's engine files (serving.py,
the paged KV cache, fast_decode.py) are read with `git show` and loaded beside this
checkout's as `model.ab_*` modules; everything else (the model, the kernels, sampling) is
shared. Each workload runs on both engines, alternating, `--repeats` times; the outputs
must agree. Workloads are lab/batching.py's, on its model (4 x 128, random weights).
"""
from __future__ import annotations

import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repo root, for `python bench/engine_ab.py`
ENGINE_FILES = ("paged_kv_cache", "paged_batch", "fast_decode", "prepared_decode", "serving")  # in import order


def load_engine(commit: str):
    """(the commit's model.serving, its model.fast_decode), loaded as model.ab_* modules."""
    import model
    names = [n for n in ENGINE_FILES if subprocess.run(["git", "cat-file", "-e", f"{commit}:model/{n}.py"],
                                                       cwd=ROOT, capture_output=True).returncode == 0]
    loaded = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            text = subprocess.run(["git", "show", f"{commit}:model/{name}.py"], cwd=ROOT, capture_output=True,
                                  text=True, check=True).stdout
            for other in names:  # its imports of the engine's own files go to the commit's copies too
                text = text.replace(f"from .{other} import", f"from .ab_{other} import")
            path = Path(folder) / f"ab_{name}.py"
            path.write_text(text)
            spec = importlib.util.spec_from_file_location(f"model.ab_{name}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            setattr(model, f"ab_{name}", module)
            loaded[name] = module
    return loaded["serving"], loaded["fast_decode"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", required=True, help="the other commit (anything git show takes)")
    p.add_argument("--workload", choices=["sweep", "poisson", "same"], default="sweep")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32], help="max batch sizes (sweep)")
    p.add_argument("--rates", type=float, nargs="+", default=[20.0, 100.0, 200.0], help="requests/s (poisson)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)

    import numpy as np
    import tinygrad_lite
    from tinygrad_lite import cpu
    import model.gpt as gpt_module
    from lab import batching
    from model.gpt import GPT, GPTConfig
    from model.serving import Engine
    cpu.tune()
    other_serving, other_fast_decode = load_engine(args.against)
    this_fast_decode = gpt_module.fast_decode
    tinygrad_lite.manual_seed(0)
    model = GPT(GPTConfig(**batching.MODEL)).eval()
    rng = np.random.default_rng(0)

    cases = []  # (label, max batch, arrivals (time, prompt), pool share: lab/batching.make_engine)
    if args.workload == "sweep":
        n_new, prompts = 48, batching.random_prompts(rng, 32, (32, 96))
        cases = [(f"max batch {b}", b, [(0.0, p) for p in prompts], 0.25) for b in args.batches]
    elif args.workload == "poisson":
        n_new = 48
        for rate in args.rates:
            gaps = rng.exponential(1.0 / rate, 64)
            arrivals = list(zip(np.cumsum(gaps) - gaps[0], batching.random_prompts(rng, 64, (32, 96))))
            cases.append((f"{rate:g} req/s", 16, arrivals, 0.25))
    else:  # the lab's same work: a pool as big as generate()'s cache
        n_new, prompts = 64, rng.integers(0, batching.MODEL["vocab_size"], (8, 64)).tolist()
        cases = [("8 x 64 prompt", 8, [(0.0, p) for p in prompts], 1.0)]

    def run(which: str, max_batch: int, arrivals: list, share: float) -> tuple[dict, list]:
        """One workload on one engine: (latency summary, outputs)."""
        if which == "other":  # the other commit's engine, on its own lean step
            gpt_module.fast_decode, batching.Engine = other_fast_decode, other_serving.Engine
        try:
            engine = batching.make_engine(model, max_batch, share=share)
            rids, start, end = batching.drive(engine, arrivals, n_new)
            return batching.latency_summary(engine, rids, start, end), [engine.request(r).output for r in rids]
        finally:
            gpt_module.fast_decode, batching.Engine = this_fast_decode, Engine

    print(f"this checkout against {args.against}, {args.workload}, {args.repeats} alternating repeats")
    for label, max_batch, arrivals, share in cases:
        rows = {"other": [], "this": []}
        for r in range(args.repeats + 1):  # (the first pair warms up, untimed)
            outputs = {}
            for which in (("other", "this") if r % 2 else ("this", "other")):
                summary, outputs[which] = run(which, max_batch, arrivals, share)
                if r:
                    rows[which].append(summary)
            if outputs["other"] != outputs["this"]:
                raise SystemExit(f"{label}: the two engines' outputs differ")

        def median(which: str, key: str) -> float:
            return statistics.median(row[key] for row in rows[which])
        print(f"{label:>14}: tokens/s {median('other', 'tokens_per_s'):7.0f} -> {median('this', 'tokens_per_s'):7.0f} "
              f"({median('this', 'tokens_per_s') / median('other', 'tokens_per_s'):.2f}x); TTFT p50 "
              f"{median('other', 'ttft_ms_p50'):6.1f} -> {median('this', 'ttft_ms_p50'):6.1f} ms; TPOT p50 "
              f"{median('other', 'tpot_ms_p50'):5.2f} -> {median('this', 'tpot_ms_p50'):5.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
