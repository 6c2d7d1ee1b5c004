"""Training speed of tinygrad_lite beside PyTorch on the CPU: the same GPT, the same step.

    python bench/train_speed.py                   # --steps 20 --warmup 3 --repeats 5 --threads 2
    python bench/train_speed.py --check           # same weights in both: first losses must agree
    python bench/train_speed.py --profile         # cProfile of 10 tinygrad_lite steps

The config is train.py's shakespeare-char-cpu preset (vocab 65). One step is train.py's:
forward with targets, loss.item(), backward, clip the gradient norm to 1.0, AdamW step,
zero_grad. The batches are random windows of a seeded random token stream, the same
in both frameworks.

Every repeat runs in a fresh subprocess (so each framework's peak RSS is its own), and
the frameworks alternate, starting order flipped each repeat (A B, B A, A B, ...), so a
background load that comes and goes hits both alike. Both run under the same
environment with OMP/OpenBLAS/MKL threads = --threads. MFU is measured against the
float32 matmul throughput of NumPy (1024 x 1024) on this machine, in this run.
Results: a table on stdout and bench/results/train_speed.json.
"""
from __future__ import annotations

import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import argparse
import importlib.util
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere: `model`, `tinygrad_lite`, `bench` importable

from train import PRESETS  # noqa: E402  (the preset is the single source)
from bench.shapes import SHAPES  # noqa: E402

PRESET = dict(PRESETS["shakespeare-char-cpu"])  # the model and batch of --shape cpu; the others: bench/shapes.py


def use_shape(name: str) -> None:
    """Make PRESET the --shape's model and batch (workers are told the shape by the parent)."""
    PRESET.clear()
    PRESET.update(PRESETS["shakespeare-char-cpu"], **SHAPES[name])


VOCAB_SIZE = 65  # the char tokenizer's vocabulary on tiny Shakespeare
SEED = 1337
STREAM_TOKENS = 100_000  # the random token stream the batches are cut from
RESULTS = ROOT / "bench" / "results" / "train_speed.json"
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TINYGRAD_LITE_THREADS")
RECORDED_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") + THREAD_VARS
FRAMEWORKS = ("tinygrad_lite", "pytorch")


def model_config() -> dict:
    keys = ("n_layer", "n_head", "n_embd", "block_size", "dropout")
    return {"vocab_size": VOCAB_SIZE, "bias": False, **{k: PRESET[k] for k in keys}}


def batches(n: int, seed: int = SEED) -> list[tuple[np.ndarray, np.ndarray]]:
    """n batches (x, y), each (B, T) int64, y = x shifted by one: train.py's get_batch on a
    seeded random token stream (so no dataset is needed and both frameworks see the same)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, VOCAB_SIZE, size=STREAM_TOKENS)
    B, T = PRESET["batch_size"], PRESET["block_size"]
    out = []
    for _ in range(n):
        starts = rng.integers(0, len(data) - T, size=B)
        window = data[starts[:, None] + np.arange(T + 1)]  # (B, T + 1)
        out.append((window[:, :-1].copy(), window[:, 1:].copy()))
    return out


# --- the two training steps ------------------------------------------------------------------


def tinygrad_setup(seed: int = SEED, shards: int | None = None):
    """(model, step function) for tinygrad_lite; step(x, y) -> loss, as train.py's loop
    (shards: the batch split over that many processes; default one per core)."""
    from model.gpt import GPT, GPTConfig
    from tinygrad_lite import backend, cpu, optim
    from tinygrad_lite.parallel import DataParallel
    cpu.tune()  # malloc and threads, as train.py does (tinygrad_lite/cpu.py)
    backend.set_default_device("cpu")
    backend.manual_seed(seed)
    model = GPT(GPTConfig(**model_config()))
    optimizer = optim.AdamW(model.optimizer_groups(PRESET["weight_decay"]), lr=PRESET["lr"],
                            betas=(PRESET["beta1"], PRESET["beta2"]))
    params = model.parameters()
    parallel = DataParallel(model, shards=shards)  # the batch split over the cores, as train.py does

    def step(x: np.ndarray, y: np.ndarray) -> float:
        value = parallel.forward_backward(x, y)
        optim.clip_grad_norm(params, PRESET["grad_clip"])
        optimizer.step()
        optimizer.zero_grad()
        return value

    step.parallel = parallel  # its worker processes' memory counts too
    return model, step


def torch_setup(threads: int, seed: int = SEED, attention: str = "sdpa"):
    """(model, step function) for PyTorch, the same step and optimizer settings."""
    import torch
    from bench.torch_gpt import TorchGPT, TorchGPTConfig, make_adamw
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = TorchGPT(TorchGPTConfig(**model_config(), attention=attention))
    optimizer = make_adamw(model, lr=PRESET["lr"], betas=(PRESET["beta1"], PRESET["beta2"]),
                           weight_decay=PRESET["weight_decay"])
    params = list(model.parameters())

    def step(x: np.ndarray, y: np.ndarray) -> float:
        _, loss = model(torch.from_numpy(x), torch.from_numpy(y))
        loss.backward()
        value = loss.item()
        torch.nn.utils.clip_grad_norm_(params, PRESET["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value

    return model, step


# --- the workers: each runs in its own fresh process ------------------------------------------


def peak_rss_mb(workers: int = 0) -> float:
    """This process's peak resident memory, plus `workers` times the largest peak among its
    finished child processes (tinygrad_lite's data-parallel workers: they all run the same
    code on equal shards). Linux reports KiB, macOS bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss += workers * resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return rss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def worker_train(framework: str, steps: int, warmup: int, threads: int, attention: str) -> dict:
    """Warm up, then time `steps` steps one by one. Prints nothing but the result."""
    _, step = tinygrad_setup() if framework == "tinygrad_lite" else torch_setup(threads, attention=attention)
    data = batches(warmup + steps)
    for x, y in data[:warmup]:
        step(x, y)
    times, losses = [], []
    for x, y in data[warmup:]:
        start = time.perf_counter()
        losses.append(step(x, y))
        times.append(time.perf_counter() - start)
    workers = 0
    parallel = getattr(step, "parallel", None)  # tinygrad_lite's data parallelism
    if parallel is not None:
        workers = len(parallel.workers)
        parallel.close()  # joined, so their peak memory is counted
    return {"framework": framework, "ms_per_step": 1000 * sum(times) / steps,
            "step_ms": [round(1000 * t, 3) for t in times], "last_loss": losses[-1],
            "peak_rss_mb": peak_rss_mb(workers)}


def worker_matmul(threads: int, seconds: float = 1.0, n: int = 1024) -> dict:
    """Best float32 (n x n) @ (n x n) GFLOP/s of NumPy over ~`seconds` (and of PyTorch,
    for reference only, when installed). The best, not the mean: the ceiling for MFU."""
    def best(matmul, a, b) -> float:
        matmul(a, b)
        rates, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            matmul(a, b)
            rates.append(2 * n ** 3 / (time.perf_counter() - start) / 1e9)
        return max(rates)

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    out = {"numpy_gflops": best(np.matmul, a, b)}
    if importlib.util.find_spec("torch") is not None:
        import torch
        torch.set_num_threads(threads)
        out["torch_gflops"] = best(torch.matmul, torch.from_numpy(a), torch.from_numpy(b))
    return out


def worker_profile(warmup: int, steps: int = 10, top: int = 25) -> None:
    """cProfile `steps` tinygrad_lite steps (after warm-up); print the top functions by tottime."""
    import cProfile
    import pstats
    _, step = tinygrad_setup()
    data = batches(warmup + steps)
    for x, y in data[:warmup]:
        step(x, y)
    profiler = cProfile.Profile()
    profiler.enable()
    for x, y in data[warmup:]:
        step(x, y)
    profiler.disable()
    print(f"cProfile: {steps} tinygrad_lite training steps (shakespeare-char-cpu, after {warmup} warm-up), "
          f"top {top} by tottime")
    pstats.Stats(profiler, stream=sys.stdout).strip_dirs().sort_stats("tottime").print_stats(top)


def run_worker(args: argparse.Namespace, *extra: str) -> dict:
    """Run this file as a fresh subprocess in --worker mode; return its JSON result."""
    env = {**os.environ, **{name: str(args.threads) for name in THREAD_VARS}}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(args.threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--torch-attention",
           args.torch_attention, "--shape", args.shape, *extra]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"worker {' '.join(extra)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the comparison ----------------------------------------------------------------------------


def summarize(runs: list[dict], tokens_per_step: int, flops_per_token: float, peak_flops: float) -> dict:
    ms = [r["ms_per_step"] for r in runs]
    median = statistics.median(ms)
    tok_s = tokens_per_step / (median / 1000)
    return {"ms_per_step": {"min": min(ms), "median": median, "max": max(ms)},
            "repeats_ms": [round(m, 2) for m in ms], "tokens_per_s": tok_s,
            "mfu": flops_per_token * tok_s / peak_flops,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "last_loss": runs[-1]["last_loss"]}


def compare(args: argparse.Namespace) -> dict:
    from model.gpt import GPT, GPTConfig
    frameworks = [f for f in FRAMEWORKS if f == "tinygrad_lite" or importlib.util.find_spec("torch")]
    if len(frameworks) == 1:
        print("PyTorch is not installed: timing tinygrad_lite only (pip install torch to compare)")
    load_start = os.getloadavg()
    matmul = [run_worker(args, "--worker", "matmul")]
    runs: dict[str, list[dict]] = {f: [] for f in frameworks}
    for r in range(args.repeats):
        for framework in (frameworks if r % 2 == 0 else frameworks[::-1]):  # A B, B A, ...
            result = run_worker(args, "--worker", framework)
            runs[framework].append(result)
            print(f"repeat {r + 1}/{args.repeats} {framework:>13}: {result['ms_per_step']:7.1f} ms/step, "
                  f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    matmul.append(run_worker(args, "--worker", "matmul"))

    peak_flops = max(m["numpy_gflops"] for m in matmul) * 1e9
    flops_per_token = GPT(GPTConfig(**model_config())).flops_per_token()
    tokens_per_step = PRESET["batch_size"] * PRESET["block_size"]
    summary = {f: summarize(runs[f], tokens_per_step, flops_per_token, peak_flops) for f in frameworks}
    ratio = (summary["tinygrad_lite"]["tokens_per_s"] / summary["pytorch"]["tokens_per_s"]
             if "pytorch" in summary else None)
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    if "pytorch" in summary:
        import torch
        versions["torch"] = torch.__version__
    return {
        "what": f"ms per training step (forward+backward+clip+AdamW), shape {args.shape}",
        "config": {**model_config(), "batch_size": PRESET["batch_size"], "tokens_per_step": tokens_per_step,
                   "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                   "threads": args.threads, "torch_attention": args.torch_attention, "shape": args.shape},
        "results": summary,
        "ratio_tokens_per_s_tinygrad_lite_over_pytorch": ratio,
        "matmul_gflops_numpy_f32_1024": [round(m["numpy_gflops"], 1) for m in matmul],
        "matmul_gflops_torch_f32_1024": [round(m["torch_gflops"], 1) for m in matmul if "torch_gflops" in m],
        "peak_flops_for_mfu": peak_flops, "flops_per_token": flops_per_token,
        "env": {name: os.environ.get(name) for name in RECORDED_VARS},
        "worker_threads_env": {name: str(args.threads) for name in THREAD_VARS},
        "load_average_1_5_15": {"start": load_start, "end": os.getloadavg()},
        "machine": {"platform": platform.platform(), "processor": cpu_name(), "cpus": os.cpu_count()},
        "versions": versions,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(report: dict) -> None:
    res = report["results"]
    cols = list(res)
    rows = [("ms/step  min", lambda r: f"{r['ms_per_step']['min']:.1f}"),
            ("ms/step  median", lambda r: f"{r['ms_per_step']['median']:.1f}"),
            ("ms/step  max", lambda r: f"{r['ms_per_step']['max']:.1f}"),
            ("tokens/s (median)", lambda r: f"{r['tokens_per_s']:,.0f}"),
            ("MFU", lambda r: f"{100 * r['mfu']:.1f}%"),
            ("peak RSS (MB)", lambda r: f"{r['peak_rss_mb']:.0f}")]
    c = report["config"]
    print(f"\n--shape {c['shape']} GPT ({c['n_layer']} layers, {c['n_embd']} wide, batch {c['batch_size']} "
          f"x {c['block_size']} tokens), {c['steps']} steps x {c['repeats']} repeats, {c['threads']} threads")
    print(f"{'':20}" + "".join(f"{name:>16}" for name in cols))
    for label, cell in rows:
        print(f"{label:20}" + "".join(f"{cell(res[name]):>16}" for name in cols))
    if report["ratio_tokens_per_s_tinygrad_lite_over_pytorch"] is not None:
        print(f"tinygrad_lite / PyTorch tokens/s: {report['ratio_tokens_per_s_tinygrad_lite_over_pytorch']:.2f}")
    print(f"MFU against NumPy float32 1024^3 matmul: {report['peak_flops_for_mfu'] / 1e9:.0f} GFLOP/s "
          f"(best of {report['matmul_gflops_numpy_f32_1024']}; PyTorch's: "
          f"{report['matmul_gflops_torch_f32_1024'] or 'n/a'}); {report['flops_per_token']:,.0f} FLOPs/token")
    load = report["load_average_1_5_15"]
    print(f"env: {report['env']}; load average at start {load['start'][0]:.2f}, end {load['end'][0]:.2f}")


# --- --check: the two models are the same function ----------------------------------------------


def check(threads: int, tol: float = 1e-4) -> dict:
    """Same weights and batches in both frameworks (PyTorch with each attention); the
    first-step losses must agree within `tol`. The second step's loss, after one
    clipped AdamW update, and the weights after two steps are compared too."""
    from bench.torch_gpt import numpy_state_dict, load_numpy_state_dict
    tg_model, tg_step = tinygrad_setup()
    weights = tg_model.state_dict()
    data = batches(2)
    losses, weight_diff = {}, {}
    for attention in ("sdpa", "manual"):
        th_model, th_step = torch_setup(threads, attention=attention)
        load_numpy_state_dict(th_model, weights)
        losses[f"pytorch ({attention})"] = [th_step(x, y) for x, y in data]
        weight_diff[attention] = numpy_state_dict(th_model)
    losses["tinygrad_lite"] = [tg_step(x, y) for x, y in data]  # each: the loss before its update
    ours = tg_model.state_dict()
    out = {"losses_step_1_2": losses,
           "max_abs_weight_diff_after_2_steps": {
               a: max(float(np.abs(ours[k] - theirs[k]).max()) for k in ours) for a, theirs in weight_diff.items()}}
    for step in (0, 1):
        out[f"max_abs_loss_diff_step_{step + 1}"] = max(abs(losses["tinygrad_lite"][step] - v[step])
                                                        for v in losses.values())
    if out["max_abs_loss_diff_step_1"] > tol:
        raise AssertionError(f"first-step losses differ by {out['max_abs_loss_diff_step_1']:.2e} > {tol}: {losses}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, in each repeat")
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per framework")
    p.add_argument("--threads", type=int, default=2, help="BLAS / OpenMP / torch threads, for both")
    p.add_argument("--torch-attention", choices=["sdpa", "manual"], default="sdpa")
    p.add_argument("--shape", choices=list(SHAPES), default="cpu",
                   help="cpu: the CPU preset; long: 4 x 256, 8 heads, batch 4 x 512; gpu-preset: the "
                        "shakespeare-char preset's model (6 x 384, block 256), batch 8, on the CPU")
    p.add_argument("--check", action="store_true", help="same weights in both: compare the losses")
    p.add_argument("--profile", action="store_true", help="cProfile 10 tinygrad_lite steps")
    p.add_argument("--out", default=None, help="where the JSON goes (default: bench/results/train_speed[_SHAPE].json)")
    p.add_argument("--worker", choices=[*FRAMEWORKS, "matmul", "profile"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    use_shape(args.shape)
    if min(args.steps, args.repeats, args.threads) < 1 or args.warmup < 0:
        p.error("--steps, --repeats and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker in FRAMEWORKS:
        print(json.dumps(worker_train(args.worker, args.steps, args.warmup, args.threads, args.torch_attention)))
    elif args.worker == "matmul":
        print(json.dumps(worker_matmul(args.threads)))
    elif args.worker == "profile":
        worker_profile(args.warmup)
    elif args.profile:  # in a fresh process too, with the same thread settings
        env = {**os.environ, **{name: str(args.threads) for name in THREAD_VARS}}
        return subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "profile",
                               "--warmup", str(args.warmup)], env=env, cwd=ROOT).returncode
    elif args.check:
        if importlib.util.find_spec("torch") is None:
            print("error: --check needs PyTorch (python -m pip install torch)", file=sys.stderr)
            return 2
        result = check(args.threads)
        print(json.dumps(result, indent=2))
        print(f"check passed: first-step losses agree to {result['max_abs_loss_diff_step_1']:.1e} (<= 1e-4)")
    else:
        report = compare(args)
        print_table(report)
        out = Path(args.out or (RESULTS if args.shape == "cpu" else RESULTS.with_name(f"train_speed_{args.shape}.json")))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
