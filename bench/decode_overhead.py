"""Per-token Python overhead of cached decoding: ops, Python calls and time per token.

    python bench/decode_overhead.py [--tokens 200] [--repo PATH] [--out FILE]

A decoded token runs each layer's few small ops on (B, 1, C) arrays, where the fixed cost
of a Python call and a NumPy dispatch outweighs the arithmetic. This script decodes
greedily with the KV cache under no_grad (as generate() does) and reports, per token:
  - ops: calls of a differentiable op's forward (a `Function` subclass);
  - Functions built: new `Function` instances (0 on the lean inference path);
  - Python calls: every function call the profiler sees (Python and C), the overhead;
  - ms/token at batch 1 on a tiny model (overhead-bound) and on the bench model.
--repo runs another checkout's tinygrad_lite and model (a before/after comparison from
one script). Writes bench/results/decode_overhead.json unless --out says otherwise.
"""
from __future__ import annotations

import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import argparse
import cProfile
import json
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODELS = {"tiny": dict(vocab_size=65, block_size=256, n_layer=2, n_head=2, n_embd=16),
          "bench": dict(vocab_size=65, block_size=1024, n_layer=4, n_head=4, n_embd=128)}


def decode_tokens(model, prompt_len: int, tokens: int):
    """Greedy cached decoding of `tokens` tokens after a random prompt; per-token seconds."""
    import numpy as np
    from model.generate import stream
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, prompt_len)).tolist()
    steps = stream(model, prompt, tokens + 1, temperature=0)
    next(steps)  # the prefill
    times, last = [], time.perf_counter()
    for _ in steps:
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


def count_per_token(model, prompt_len: int, tokens: int) -> dict:
    """Ops, Functions built and profiler-seen calls per decoded token."""
    from tinygrad_lite import Function
    op_code = {(c.forward.__code__.co_filename, c.forward.__code__.co_firstlineno)
               for c in Function.registry.values() if "forward" in vars(c)}

    def counted(decoded: int) -> tuple[int, int, int]:
        """(Python calls, op forwards, Functions built) of a prefill plus `decoded` tokens."""
        built, original_init = [], Function.__init__
        Function.__init__ = lambda self: built.append(1)
        profiler = cProfile.Profile()
        try:
            profiler.enable()
            decode_tokens(model, prompt_len, decoded)
            profiler.disable()
        finally:
            Function.__init__ = original_init
        stats = pstats.Stats(profiler).stats
        ops = sum(entry[1] for (filename, line, _), entry in stats.items() if (filename, line) in op_code)
        return sum(entry[1] for entry in stats.values()), ops, len(built)

    decode_tokens(model, prompt_len, 1)  # warm up: first calls allocate and build what they keep
    # stream() decodes `decoded + 1` tokens after its prefill: the difference of two runs is
    # `tokens` decoded tokens, without the prefill
    (calls, ops, built), (calls0, ops0, built0) = counted(tokens), counted(0)
    return {"ops_per_token": (ops - ops0) / tokens, "python_calls_per_token": (calls - calls0) / tokens,
            "functions_built_per_token": (built - built0) / tokens}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=200, help="decoded tokens per measurement")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (the context the cache holds)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per model; the median is reported")
    p.add_argument("--repo", default=str(ROOT), help="checkout whose tinygrad_lite and model to run")
    p.add_argument("--out", default=None, help="results file (default: bench/results/decode_overhead.json)")
    args = p.parse_args()
    sys.path.insert(0, str(Path(args.repo).resolve()))
    import tinygrad_lite
    from tinygrad_lite import no_grad
    from model.gpt import GPT, GPTConfig
    try:
        from tinygrad_lite import cpu
        cpu.tune()
    except ImportError:  # an older checkout
        pass
    result = {"repo": str(Path(args.repo).resolve()), "tokens": args.tokens, "prompt": args.prompt,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "models": {}}
    for name, config in MODELS.items():
        tinygrad_lite.manual_seed(0)
        model = GPT(GPTConfig(**config)).eval()
        with no_grad():
            counts = count_per_token(model, args.prompt, min(args.tokens, 50))
            runs = [1000 * statistics.median(decode_tokens(model, args.prompt, args.tokens))
                    for _ in range(args.repeats)]
        row = {**counts, "ms_per_token": statistics.median(runs), "ms_min": min(runs), "ms_max": max(runs)}
        result["models"][name] = {"config": config, **row}
        print(f"{name:>5}: {row['ops_per_token']:.0f} ops, {row['functions_built_per_token']:.0f} Functions built, "
              f"{row['python_calls_per_token']:.0f} Python calls per token; {row['ms_per_token']:.3f} ms/token "
              f"(min-max {row['ms_min']:.3f}-{row['ms_max']:.3f}, {args.repeats} runs)", flush=True)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / "decode_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
