"""Decode speed: the KV cache keeps the cost of one new token nearly flat as the context grows.

    python bench/decode_speed.py [--device cpu] [--decode-tokens 16] [--lengths 64 256 1024]

For each total length L and batch size B: a random prompt of L - n tokens is prefilled,
then n tokens are decoded greedily, once with the cache and once without. With the
cache a step runs one token through the model (its attention reads L cached keys, a
small part of the work); without it, each step re-runs the whole context, so its cost
grows with L. A random-init model is enough: speed does not depend on the weights.
Writes bench/results/decode_speed.json.
"""
from __future__ import annotations

import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TINYGRAD_LITE_THREADS")
if "--threads" in sys.argv[:-1] and os.environ.get("DECODE_SPEED_THREADS") is None:
    # BLAS reads its thread count when NumPy/torch load: set it, then start again
    n = sys.argv[sys.argv.index("--threads") + 1]
    os.environ.update({name: n for name in THREAD_VARS}, DECODE_SPEED_THREADS=n)
    os.execv(sys.executable, [sys.executable, *sys.argv])

import tinygrad_lite  # noqa: E402
from tinygrad_lite import backend, cpu  # noqa: E402
from model.generate import stream  # noqa: E402
from model.gpt import GPT, GPTConfig  # noqa: E402

CONFIG = dict(vocab_size=65, block_size=1024, n_layer=4, n_head=4, n_embd=128)


def measure(model: GPT, total: int, batch: int, n_decode: int, use_cache: bool, runs: int = 3) -> dict:
    """Time the prefill (to the first new token) and the n_decode - 1 steps after it: one
    untimed warm-up, then `runs` timed runs, of which the one with the median total time is
    kept (as bench/torch_gpt.py's torch_decode_timing does for PyTorch)."""
    rng = np.random.default_rng(total)
    prompt_len = total - n_decode
    prompt = rng.integers(0, model.config.vocab_size, size=(batch, prompt_len)).tolist()
    timings = []
    for _ in range(1 + runs):
        start = time.perf_counter()
        steps = stream(model, prompt, n_decode, temperature=0, use_cache=use_cache)
        next(steps)  # the prefill; greedy ids come back to the host, so the device has finished
        first = time.perf_counter()
        for _ in steps:
            pass
        timings.append((first - start, time.perf_counter() - first))
    prefill_s, decode_s = sorted(timings[1:], key=sum)[runs // 2]
    step_s = decode_s / (n_decode - 1)
    return {"prefill_tok_s": batch * prompt_len / prefill_s, "ms_per_step": 1000 * step_s,
            "decode_tok_s": batch / step_s}


def median_run(runs: list[dict]) -> dict:
    """The median ms_per_step and prefill_tok_s over the runs, each with its min and max."""
    steps = sorted(r["ms_per_step"] for r in runs)
    prefills = sorted(r["prefill_tok_s"] for r in runs)
    ms = steps[len(steps) // 2]
    batch = runs[0]["decode_tok_s"] * runs[0]["ms_per_step"] / 1000  # tokens per step
    return {"prefill_tok_s": prefills[len(prefills) // 2], "prefill_tok_s_min": prefills[0],
            "prefill_tok_s_max": prefills[-1], "ms_per_step": ms, "decode_tok_s": 1000 * batch / ms,
            "ms_per_step_min": steps[0], "ms_per_step_max": steps[-1], "runs": len(runs)}


# --- PyTorch comparison -------------------------------------------------------------------------


def torch_decode_speed(config: dict, total: int, batch: int, n_decode: int, last_row: bool = False) -> dict | None:
    """The same cached measurement with bench/torch_gpt.py's PyTorch GPT (same config, a
    preallocated KV cache, greedy, torch.no_grad()), or None when torch is not installed
    (it is an optional bench dependency: pip install torch). last_row: its prefill's last
    block computes the last position only, as ours does (model/gpt.py, last_block_rows)."""
    try:
        from bench.torch_gpt import torch_decode_timing
    except ImportError:
        return None
    import os
    threads = int(os.environ.get("DECODE_SPEED_THREADS") or os.cpu_count() or 1)
    t = torch_decode_timing({**config, "last_block_last_row": last_row}, batch, total - n_decode, n_decode,
                            threads=threads)
    return {"prefill_tok_s": batch * (total - n_decode) / t["prefill_s"],
            "ms_per_step": 1000 * t["decode_s"] / (n_decode - 1), "decode_tok_s": t["decode_tokens_per_s"]}


# ---------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu, cuda or strict (default: TINYGRAD_LITE_DEVICE or cpu)")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024], help="total tokens")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--decode-tokens", type=int, default=16, help="tokens decoded per measurement")
    p.add_argument("--threads", type=int, default=None, help="BLAS/OpenMP threads of both frameworks (default: all)")
    p.add_argument("--repeats", type=int, default=5,
                   help="cached runs of each framework, alternating; the median is reported (min-max kept)")
    p.add_argument("--settle", type=float, default=0.2,
                   help="seconds of rest after each framework's runs (default 0.2): PyTorch's OpenMP "
                        "threads spin on the cores for a while after its last op, and the other "
                        "framework's run must not start against them")
    p.add_argument("--torch-last-row", action="store_true",
                   help="PyTorch's prefill, too, computes its last block for the last position only, "
                        "as ours does (model/gpt.py, last_block_rows): kernels compared like for like. "
                        "Default: as nanoGPT, every position")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode_speed.json"))
    args = p.parse_args()
    cpu.tune()  # malloc and threads, as train.py and sample.py do (tinygrad_lite/cpu.py)
    if args.device:
        backend.set_default_device(args.device)
    if max(args.lengths) > CONFIG["block_size"] or min(args.lengths) <= args.decode_tokens:
        p.error(f"lengths must be in ({args.decode_tokens}, {CONFIG['block_size']}]")
    tinygrad_lite.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG)).eval()
    measure(model, 32, 1, 4, True, runs=1)  # warm up: first calls allocate and load kernels

    rows = []
    header = (f"{'total':>6} {'batch':>5} | {'prefill tok/s':>13} | {'cached ms/step':>14} {'tok/s':>8} | "
              f"{'uncached ms/step':>16} {'tok/s':>8} | {'cache speedup':>13}")
    print(f"device {backend.default_device()}, {model.num_parameters() / 1e6:.2f}M parameters, {CONFIG}, "
          f"{args.decode_tokens} decoded tokens per run")
    print(header)
    print("-" * len(header))
    for total in args.lengths:
        for batch in args.batches:
            # the cached runs of both frameworks alternate (order flipped each repeat), so a
            # background load that comes and goes hits both alike; the median run is reported
            ours_runs, torch_runs = [], []
            for r in range(args.repeats):
                for who in (("ours", "torch") if r % 2 == 0 else ("torch", "ours")):
                    if who == "ours":
                        ours_runs.append(measure(model, total, batch, args.decode_tokens, use_cache=True))
                    else:
                        torch_runs.append(torch_decode_speed(CONFIG, total, batch, args.decode_tokens, args.torch_last_row))
                    time.sleep(args.settle)  # NOTE: see --settle
            cached = median_run(ours_runs)
            uncached = measure(model, total, batch, args.decode_tokens, use_cache=False, runs=1)
            row = {"total_tokens": total, "batch": batch, "cached": cached, "uncached": uncached,
                   "speedup": uncached["ms_per_step"] / cached["ms_per_step"],
                   "torch": median_run(torch_runs) if None not in torch_runs else None}
            rows.append(row)
            print(f"{total:>6} {batch:>5} | {cached['prefill_tok_s']:>13,.0f} | {cached['ms_per_step']:>5.2f} "
                  f"({cached['ms_per_step_min']:.2f}-{cached['ms_per_step_max']:.2f}) "
                  f"{cached['decode_tok_s']:>8,.0f} | {uncached['ms_per_step']:>16.2f} {uncached['decode_tok_s']:>8,.0f} | "
                  f"{row['speedup']:>12.1f}x", flush=True)
            if row["torch"] is not None:
                t = row["torch"]
                row["cached_vs_torch"] = t["ms_per_step"] / cached["ms_per_step"]
                row["prefill_vs_torch"] = cached["prefill_tok_s"] / t["prefill_tok_s"]
                print(f"{'':>6} {'torch':>5} | {t['prefill_tok_s']:>13,.0f} | {t['ms_per_step']:>5.2f} "
                      f"({t['ms_per_step_min']:.2f}-{t['ms_per_step_max']:.2f}) "
                      f"{t['decode_tok_s']:>8,.0f} | tinygrad_lite / PyTorch: cached decode "
                      f"{row['cached_vs_torch']:.2f}, prefill {row['prefill_vs_torch']:.2f}", flush=True)

    result = {"config": CONFIG, "device": backend.default_device(), "decode_tokens": args.decode_tokens,
              "threads": os.environ.get("DECODE_SPEED_THREADS", "all"), "torch_last_row": args.torch_last_row,
              "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
