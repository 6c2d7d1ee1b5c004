"""Serving many users, measured: batch size against throughput and latency, Poisson
arrivals, and what a shared prefix saves (model/serving.py's Engine).

    python lab/batching.py            # ~1 minute on 2 CPU cores
    python lab/batching.py --quick    # seconds: tiny settings, for the tests

The model is bench/decode_speed.py's: random weights (speed does not depend on them),
4 layers x 128 wide, a context of 1024 tokens, so it holds a 200-token system prompt.
1. Same work, engine against generate(): 8 prompts of one length, generate() as one
   batch and the engine with max_batch_size 8, 61 alternating repeats (the ratio of their
   tokens/s from the medians, and the median of the repeats' own ratios). One engine
   serves all repeats, as a server's does; every repeat brings new prompts, so the
   prefix cache skips nothing. Three engines: as a server runs it (its prefix cache keeps
   every full page for later requests), without a prefix cache (it keeps nothing, as
   generate() does), and with its steady decode steps on the model's lean step, as
   generate()'s are, instead of the prepared step (model/prepared_decode.py): what the
   engine's own bookkeeping costs.
2. The batch-size trade-off: N requests all waiting at time 0, max_batch_size 1 .. 32.
   Throughput (generated tokens / wall time) rises with the batch; so does each
   request's time per output token (TPOT), and the time to first token (TTFT) of the
   requests that queue behind a small batch. Five runs of each, round robin: the run
   with the median throughput is reported (one run alone drifts with the VM's speed).
3. Arrivals: requests arrive as a Poisson process at several rates (requests/s); the
   engine admits them as they come (continuous batching). Latency p50/p99 by rate.
4. Prefix sharing: N requests sharing one 200-token system prompt, each with its own
   question, with and without the prefix cache: prompt tokens computed, wall time, TTFT
   (five alternating runs each: the median run; the speed-up is the median pair's).
Writes lab/results/batching.json and .png.
"""
from __future__ import annotations

import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `python lab/batching.py`
from lab.common import lab_parser, log, require_matplotlib, write_results  # noqa: E402
import tinygrad_lite  # noqa: E402
from tinygrad_lite import cpu  # noqa: E402
from model.generate import generate  # noqa: E402
from model.gpt import GPT, GPTConfig  # noqa: E402
from model import serving  # noqa: E402
from model.serving import Engine  # noqa: E402

MODEL = dict(vocab_size=65, block_size=1024, n_layer=4, n_head=4, n_embd=128)
FULL = dict(same_work_prompt=64, same_work_new=64, same_work_repeats=61, n=32, prompt=(32, 96), new=48,
            batch_sizes=[1, 2, 4, 8, 16, 32], sweep_repeats=5, rates=[5.0, 20.0, 50.0, 100.0, 200.0], arrivals_n=64,
            arrivals_batch=16, prefix_repeats=5, shared_n=16, system=200, question=(10, 30), shared_new=24)
QUICK = dict(same_work_prompt=16, same_work_new=8, same_work_repeats=2, n=6, prompt=(8, 16), new=6,
             batch_sizes=[1, 2, 6], sweep_repeats=1, rates=[20.0, 80.0], arrivals_n=6, arrivals_batch=4,
             prefix_repeats=1, shared_n=4, system=40, question=(4, 8), shared_new=4)
PAGE_SIZE = 16


def make_engine(model: GPT, max_batch_size: int, prefix_caching: bool = True, share: float = 0.25,
                prepared_decode: bool = True) -> Engine:
    """An engine whose pool holds `share` of max_batch_size full contexts (generate() holds them all)."""
    pages = int(max_batch_size * -(-model.config.block_size // PAGE_SIZE) * share)
    unprepared = {} if prepared_decode else {"prepared_decode": False}  # (older engines: bench/engine_ab.py)
    return Engine(model, max_batch_size, PAGE_SIZE, max(pages, 64), prefix_caching=prefix_caching, **unprepared)


def latency_summary(engine: Engine, rids: list[int], start: float, end: float) -> dict:
    """Throughput and TTFT / TPOT percentiles (ms) of finished requests (model/serving.py)."""
    return {**serving.latency_summary([engine.request(rid) for rid in rids], end - start), "wall_s": end - start,
            "preemptions": engine.preemptions}


def in_turn(items, repeat: int) -> list:
    """The items rotated by `repeat`: over the repeats each runs first, second, ... in turn
    (the VM's speed drifts, so no one keeps the same place)."""
    items = list(items)
    shift = repeat % len(items)
    return items[shift:] + items[:shift]


def random_prompts(rng, n: int, lengths: tuple[int, int]) -> list[list[int]]:
    return [rng.integers(0, MODEL["vocab_size"], int(rng.integers(*lengths))).tolist() for _ in range(n)]


# --- 1. the same work: engine vs generate() ------------------------------------------------


def same_work(model: GPT, s: dict, rng) -> dict:
    n_new, tokens = s["same_work_new"], 8 * s["same_work_new"]
    # one engine serves every repeat, as a server's does; each repeat brings new prompts
    # (the prefix cache must not skip their prefill), and generate() sizes its own cache.
    # Two engines: the server's default keeps every full page for later requests (prefix
    # caching), and one without a prefix cache keeps nothing, as generate() does. A third runs
    # its steady decode steps on the model's lean step, as generate() does, not on the
    # prepared one (model/prepared_decode.py): what the engine's bookkeeping costs
    engines = {"engine": make_engine(model, 8, share=1.0),  # the memory of generate()'s cache: no preemption
               "engine_no_prefix_cache": make_engine(model, 8, prefix_caching=False, share=1.0),
               "engine_lean_step": make_engine(model, 8, share=1.0, prepared_decode=False)}

    def run(who: str, prompts: list[list[int]]) -> list[list[int]]:
        if who == "generate":
            return generate(model, prompts, n_new, temperature=0)
        engine = engines[who]
        rids = [engine.submit(p, n_new, temperature=0) for p in prompts]
        results = engine.run()
        engine.requests.clear()  # (a server forgets finished requests too: serve.py)
        return [results[rid] for rid in rids]

    def new_prompts() -> list[list[int]]:
        return rng.integers(0, MODEL["vocab_size"], (8, s["same_work_prompt"])).tolist()

    names = ("generate", "engine", "engine_no_prefix_cache", "engine_lean_step")
    for who in names:  # warm-up, untimed
        run(who, new_prompts())
    times = {who: [] for who in names}
    same = True
    for r in range(s["same_work_repeats"]):
        prompts, outputs = new_prompts(), {}
        for who in in_turn(names, r):  # each goes first, second, ... in turn
            start = time.perf_counter()
            outputs[who] = run(who, prompts)
            times[who].append(time.perf_counter() - start)
        same = same and all(outputs[who] == outputs["generate"] for who in names)
    med = {who: statistics.median(t) for who, t in times.items()}
    out = {"prompt_tokens": s["same_work_prompt"], "new_tokens": n_new, "batch": 8, "repeats": s["same_work_repeats"],
           "same_tokens": same, "prefix_hits": engines["engine"].prefix_hits}
    for who in names:
        out[f"{who}_tokens_per_s"], out[f"{who}_s"] = tokens / med[who], times[who]
    for who in names[1:]:
        out[f"{who}_vs_generate"] = med["generate"] / med[who]
        # (each repeat's own ratio: the VM's speed drifts between repeats, less within one)
        out[f"{who}_vs_generate_pairs"] = statistics.median(g / e for g, e in zip(times["generate"], times[who]))
    log(f"same work (8 x {s['same_work_prompt']} prompt, {n_new} new): generate {out['generate_tokens_per_s']:.0f} "
        f"tok/s, engine {out['engine_tokens_per_s']:.0f} (ratio {out['engine_vs_generate']:.3f}, pairs "
        f"{out['engine_vs_generate_pairs']:.3f}), without a prefix cache "
        f"{out['engine_no_prefix_cache_tokens_per_s']:.0f} "
        f"(ratio {out['engine_no_prefix_cache_vs_generate']:.3f}, pairs "
        f"{out['engine_no_prefix_cache_vs_generate_pairs']:.3f}), on the lean step "
        f"{out['engine_lean_step_tokens_per_s']:.0f} (ratio {out['engine_lean_step_vs_generate']:.3f}, pairs "
        f"{out['engine_lean_step_vs_generate_pairs']:.3f}), same tokens: {out['same_tokens']}")
    return out


# --- 2. the batch-size trade-off ----------------------------------------------------------------


def median_run(runs: list[dict], key: str) -> dict:
    """The run whose `key` is the median of the runs' (a whole run: its figures belong together)."""
    return sorted(runs, key=lambda run: run[key])[len(runs) // 2]


def batch_sweep(model: GPT, s: dict, rng) -> list[dict]:
    prompts = random_prompts(rng, s["n"], s["prompt"])
    runs = {batch: [] for batch in s["batch_sizes"]}
    for r in range(s["sweep_repeats"]):  # round robin, each repeat in another order: the VM's drift spreads
        for batch in in_turn(s["batch_sizes"], r):
            engine = make_engine(model, batch)
            start = time.perf_counter()
            rids = [engine.submit(p, s["new"], temperature=0) for p in prompts]
            engine.run()
            runs[batch].append(latency_summary(engine, rids, start, time.perf_counter()))
    rows = []
    for batch in s["batch_sizes"]:
        row = {"max_batch_size": batch, **median_run(runs[batch], "tokens_per_s"),
               "tokens_per_s_runs": [run["tokens_per_s"] for run in runs[batch]]}
        rows.append(row)
        log(f"batch {batch:>2}: {row['tokens_per_s']:7.0f} tok/s, TTFT p50 {row['ttft_ms_p50']:7.0f} ms "
            f"p99 {row['ttft_ms_p99']:7.0f}, TPOT p50 {row['tpot_ms_p50']:6.1f} ms p99 {row['tpot_ms_p99']:6.1f} "
            f"(the median of {len(runs[batch])} runs: {min(row['tokens_per_s_runs']):.0f}-"
            f"{max(row['tokens_per_s_runs']):.0f} tok/s)")
    return rows


# --- 3. Poisson arrivals -------------------------------------------------------------------------


def drive(engine: Engine, arrivals: list[tuple[float, list[int]]], n_new: int) -> tuple[list[int], float, float]:
    """Submit each prompt when its arrival time has come, stepping the engine meanwhile."""
    rids, pending = [], list(arrivals)
    start = time.perf_counter()
    while pending or engine.has_work():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            rids.append(engine.submit(pending.pop(0)[1], n_new, temperature=0))
        if engine.has_work():
            engine.step()
        elif pending:
            time.sleep(max(0.0, pending[0][0] - (time.perf_counter() - start)))
    return rids, start, time.perf_counter()


def poisson_arrivals(model: GPT, s: dict, rng) -> list[dict]:
    rows = []
    for rate in s["rates"]:
        gaps = rng.exponential(1.0 / rate, s["arrivals_n"])
        arrivals = list(zip(np.cumsum(gaps) - gaps[0], random_prompts(rng, s["arrivals_n"], s["prompt"])))
        engine = make_engine(model, s["arrivals_batch"])
        rids, start, end = drive(engine, arrivals, s["new"])
        row = {"rate_per_s": rate, "max_batch_size": s["arrivals_batch"], **latency_summary(engine, rids, start, end)}
        rows.append(row)
        log(f"{rate:5.1f} req/s: {row['tokens_per_s']:7.0f} tok/s, TTFT p50 {row['ttft_ms_p50']:7.0f} ms "
            f"p99 {row['ttft_ms_p99']:7.0f}, TPOT p50 {row['tpot_ms_p50']:6.1f} ms p99 {row['tpot_ms_p99']:6.1f}")
    return rows


# --- 4. prefix sharing ---------------------------------------------------------------------------------


def prefix_sharing(model: GPT, s: dict, rng) -> dict:
    system = rng.integers(0, MODEL["vocab_size"], s["system"]).tolist()
    prompts = [system + q for q in random_prompts(rng, s["shared_n"], s["question"])]
    out = {"requests": s["shared_n"], "system_tokens": s["system"],
           "prompt_tokens": sum(len(p) for p in prompts)}
    results, runs = {}, {False: [], True: []}
    for repeat in range(s["prefix_repeats"]):  # alternating, each going first in turn
        for caching in in_turn((False, True), repeat):
            engine = make_engine(model, 8, prefix_caching=caching)
            start = time.perf_counter()
            rids = [engine.submit(p, s["shared_new"], temperature=0) for p in prompts]
            results[caching] = engine.run()
            row = latency_summary(engine, rids, start, time.perf_counter())
            row.update(computed_tokens=engine.computed_tokens, prefix_hit_tokens=engine.prefix_hit_tokens,
                       prefill_tokens=engine.computed_tokens - sum(len(engine.request(r).output) - 1 for r in rids))
            runs[caching].append(row)
    for caching in (False, True):
        row = median_run(runs[caching], "wall_s")
        out["with_prefix_cache" if caching else "without_prefix_cache"] = row
        log(f"prefix cache {'on ' if caching else 'off'}: {row['prefill_tokens']} prompt tokens computed "
            f"(of {out['prompt_tokens']}), {row['wall_s']:.2f} s, TTFT p50 {row['ttft_ms_p50']:.0f} ms "
            f"(the median of {len(runs[caching])} runs)")
    on, off = out["with_prefix_cache"], out["without_prefix_cache"]
    out["prefill_saved_share"] = 1 - on["prefill_tokens"] / off["prefill_tokens"]
    out["speedup"] = statistics.median(a["wall_s"] / b["wall_s"] for a, b in zip(runs[False], runs[True]))
    out["same_tokens"] = list(results[True].values()) == list(results[False].values())
    return out


# --- the plot ----------------------------------------------------------------------------------------


def plot(results: dict):
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    sweep = results["batch_sweep"]
    b = [r["max_batch_size"] for r in sweep]
    ax = axes[0]
    ax.plot(b, [r["tokens_per_s"] for r in sweep], "o-", color="C0")
    runs = [r["tokens_per_s_runs"] for r in sweep]  # the band: the runs' range
    ax.fill_between(b, [min(t) for t in runs], [max(t) for t in runs], color="C0", alpha=0.15, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("max batch size")
    ax.set_ylabel("throughput (generated tokens/s; band: the runs' range)", color="C0")
    twin = ax.twinx()
    twin.plot(b, [r["tpot_ms_p50"] for r in sweep], "s--", color="C1", label="TPOT p50")
    twin.plot(b, [r["ttft_ms_p50"] / 10 for r in sweep], "^:", color="C2", label="TTFT p50 / 10")
    twin.set_ylabel("latency (ms)")
    twin.legend(loc="center left", fontsize=8)
    ax.set_title(f"{results['settings']['n']} requests at once")
    ax = axes[1]
    arrivals = results["arrivals"]
    rates = [r["rate_per_s"] for r in arrivals]
    for key, style, label in (("ttft_ms_p50", "o-", "TTFT p50"), ("ttft_ms_p99", "o--", "TTFT p99"),
                              ("tpot_ms_p50", "s-", "TPOT p50"), ("tpot_ms_p99", "s--", "TPOT p99")):
        ax.plot(rates, [r[key] for r in arrivals], style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arrival rate (requests/s, Poisson)")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8)
    ax.set_title(f"continuous batching, max batch {results['settings']['arrivals_batch']}")
    ax = axes[2]
    p = results["prefix_sharing"]
    labels = ["without", "with"]
    rows = [p["without_prefix_cache"], p["with_prefix_cache"]]
    ax.bar([0, 1], [r["prefill_tokens"] for r in rows], color=["C3", "C0"])
    ax.set_xticks([0, 1], [f"{label} prefix cache\n{r['wall_s']:.2f} s" for label, r in zip(labels, rows)])
    ax.set_ylabel("prompt tokens computed")
    ax.set_title(f"{p['requests']} requests sharing a {p['system_tokens']}-token system prompt")
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    args = lab_parser(__doc__).parse_args(argv)
    cpu.tune()
    settings = QUICK if args.quick else FULL
    rng = np.random.default_rng(args.seed)
    tinygrad_lite.manual_seed(args.seed)
    model = GPT(GPTConfig(**MODEL)).eval()
    start = time.perf_counter()
    results = {"model": MODEL, "page_size": PAGE_SIZE, "settings": settings, "quick": args.quick}
    results["same_work"] = same_work(model, settings, rng)
    results["batch_sweep"] = batch_sweep(model, settings, rng)
    results["arrivals"] = poisson_arrivals(model, settings, rng)
    results["prefix_sharing"] = prefix_sharing(model, settings, rng)
    sweep = results["batch_sweep"]
    best = max(sweep, key=lambda r: r["tokens_per_s"])
    results["summary"] = {
        "tokens_per_s_at_batch_1": sweep[0]["tokens_per_s"], "best_batch": best["max_batch_size"],
        "best_tokens_per_s": best["tokens_per_s"], "throughput_gain": best["tokens_per_s"] / sweep[0]["tokens_per_s"],
        "tpot_ms_p50_at_batch_1": sweep[0]["tpot_ms_p50"], "tpot_ms_p50_at_best": best["tpot_ms_p50"],
        "prefill_saved_share": results["prefix_sharing"]["prefill_saved_share"],
        **{key: results["same_work"][key] for key in ("engine_vs_generate", "engine_vs_generate_pairs",
                                                       "engine_no_prefix_cache_vs_generate",
                                                       "engine_no_prefix_cache_vs_generate_pairs",
                                                       "engine_lean_step_vs_generate",
                                                       "engine_lean_step_vs_generate_pairs")}}
    results["wall_s"] = time.perf_counter() - start
    write_results(Path(args.out), "batching", results, plot(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
