"""GPT-2 here against Hugging Face transformers: the same weights give the same logits and
the same greedy tokens, both ways; then prefill, decode and a fine-tuning step, timed.

    python bench/hf_parity.py                      # random GPT-2 (124M) weights
    python bench/hf_parity.py --weights DIR        # real weights: a GPT-2 folder (config.json + model.safetensors)

Needs transformers and torch (bench-only dependencies, like bench/train_speed.py's torch).
1. transformers -> ours: a GPT2LMHeadModel (random, or DIR's) is saved with its own
   save_pretrained and loaded with GPT.from_pretrained; ours -> transformers: a random
   GPT of the same shape is saved with our save_pretrained and loaded by
   GPT2LMHeadModel.from_pretrained. Logits on the same token ids are compared (float32:
   they must agree within 1e-4), and 20 greedy tokens token by token.
2. Speed does not depend on the values, so random weights measure it as well as real
   ones: prefill of a 256-token prompt and 32 KV-cached decode steps, batch 1, each
   framework in turn (alternating, median of --repeats); then train.py's fine-tuning step
   of the finetune-gpt2 preset (4 x 256 tokens x 2 micro-batches, AdamW, clip) against
   the same step in PyTorch. Writes bench/results/hf_parity.json.
"""
from __future__ import annotations

import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.generate import generate  # noqa: E402
from model.gpt import GPT, GPTConfig  # noqa: E402
from tinygrad_lite import cpu, manual_seed, no_grad, optim  # noqa: E402
from tinygrad_lite.parallel import DataParallel  # noqa: E402
from train import PRESETS  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "hf_parity.json"
GPT2_124M = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True)


def torch_modules():
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        sys.exit("error: bench/hf_parity.py needs transformers and torch: pip install transformers torch")
    return torch, GPT2Config, GPT2LMHeadModel


def our_logits(model: GPT, ids: np.ndarray) -> np.ndarray:
    with no_grad():
        return model.eval()(ids)[0].numpy()


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    torch = torch_modules()[0]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def parity(hf, ours: GPT, ids: np.ndarray, prompt: list[int]) -> dict:
    torch = torch_modules()[0]
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    diff = float(np.abs(our_logits(ours, ids) - theirs).max())
    greedy_ours = generate(ours, prompt, 20, temperature=0.0)[0]
    greedy_theirs = hf_greedy(hf, prompt, 20)
    return {"max_abs_logit_diff": diff, "within_1e-4": diff <= 1e-4, "greedy_ours": greedy_ours,
            "greedy_transformers": greedy_theirs, "greedy_identical": greedy_ours == greedy_theirs}


# --- speed -----------------------------------------------------------------------------------


def time_ours(model: GPT, prompt: np.ndarray, steps: int) -> tuple[float, float]:
    """(prefill seconds, seconds per decoded token) with our KV cache, greedy."""
    cache = model.new_cache(1)
    with no_grad():
        start = time.perf_counter()
        logits, _ = model(prompt, cache=cache)
        token = int(logits.data[0, -1].argmax())
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(steps):
            logits, _ = model(np.array([[token]]), cache=cache, start_pos=prompt.shape[1] + i)
            token = int(logits.data[0, -1].argmax())
    return prefill, (time.perf_counter() - start) / steps


def time_hf(hf, prompt: np.ndarray, steps: int) -> tuple[float, float]:
    torch = torch_modules()[0]
    with torch.no_grad():
        start = time.perf_counter()
        out = hf(torch.from_numpy(prompt), use_cache=True)
        past, token = out.past_key_values, out.logits[0, -1].argmax()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            out = hf(token.view(1, 1), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax()
    return prefill, (time.perf_counter() - start) / steps


def our_finetune_step(model: GPT, cfg: dict):
    """train.py's step of the finetune-gpt2 preset, as a function of its micro-batches."""
    params = model.parameters()
    optimizer = optim.AdamW(model.optimizer_groups(cfg["weight_decay"]), lr=cfg["lr"],
                            betas=(cfg["beta1"], cfg["beta2"]))
    parallel = DataParallel(model.train())  # the batch split over the cores, as train.py does

    def step(micro_batches):
        for x, y in micro_batches:
            parallel.forward_backward(x, y, scale=1 / len(micro_batches))
        optim.clip_grad_norm(params, cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad()
    step.close = parallel.close
    return step


def torch_finetune_step(hf, cfg: dict):
    torch = torch_modules()[0]
    hf.train()
    decay = [p for n, p in hf.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in hf.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]))

    def step(micro_batches):
        for x, y in micro_batches:
            logits = hf(torch.from_numpy(x)).logits
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), torch.from_numpy(y).view(-1))
            (loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def alternate(steps: dict, batches: list) -> dict:
    """Run each framework's step on every batch, alternating who goes first; the first
    step of each warms up and is left out. Returns seconds per step, per framework."""
    times = {name: [] for name in steps}
    for i, batch in enumerate(batches):
        for name in (list(steps) if i % 2 == 0 else list(steps)[::-1]):
            start = time.perf_counter()
            steps[name](batch)
            times[name].append(time.perf_counter() - start)
    return {name: t[1:] for name, t in times.items()}


def median_ms(values: list[float]) -> dict:
    ms = [1000 * v for v in values]
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms)}


def load_peak_rss_mb(folder: str) -> dict:
    """Peak resident memory of a fresh process that only runs GPT.from_pretrained(folder)."""
    import subprocess
    code = ("import resource, sys; sys.path.insert(0, sys.argv[2]); from model.gpt import GPT; "
            "m = GPT.from_pretrained(sys.argv[1]); "
            "print(m.num_parameters(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", code, folder, str(ROOT)], capture_output=True, text=True, check=True)
    params, peak_kb = map(int, done.stdout.split())
    return {"params": params, "weights_mb": params * 4 / 2**20, "peak_rss_mb": peak_kb / 1024}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=None, help="a GPT-2 folder; default: random 124M weights")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each speed measurement")
    p.add_argument("--finetune-steps", type=int, default=3, help="timed fine-tuning steps per framework")
    p.add_argument("--threads", type=int, default=2, help="torch threads (ours: the data-parallel shards)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    cpu.tune()
    torch, GPT2Config, GPT2LMHeadModel = torch_modules()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50257, (2, 64))
    prompt = rng.integers(0, 50257, 16).tolist()
    report = {"weights": args.weights or "random GPT-2 124M (config: GPT-2 small)",
              "machine": f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cpus",
              "versions": {"numpy": np.__version__, "torch": torch.__version__,
                           "transformers": __import__("transformers").__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        # 1a. transformers -> ours
        hf = (GPT2LMHeadModel.from_pretrained(args.weights) if args.weights else
              GPT2LMHeadModel(GPT2Config(n_positions=1024, n_embd=768, n_layer=12, n_head=12))).eval()
        hf.save_pretrained(f"{tmp}/from-hf")
        report["load"] = load_peak_rss_mb(f"{tmp}/from-hf")
        print(f"GPT.from_pretrained of {report['load']['params'] / 1e6:.0f}M parameters "
              f"({report['load']['weights_mb']:.0f} MB of float32): peak RSS {report['load']['peak_rss_mb']:.0f} MB")
        ours = GPT.from_pretrained(f"{tmp}/from-hf")
        report["transformers_to_ours"] = parity(hf, ours, ids, prompt)
        print("transformers -> ours:", {k: v for k, v in report["transformers_to_ours"].items() if "greedy_" not in k})
        # 1b. ours -> transformers
        manual_seed(1)
        mine = GPT(GPTConfig(**GPT2_124M))
        mine.save_pretrained(f"{tmp}/from-ours")
        theirs = GPT2LMHeadModel.from_pretrained(f"{tmp}/from-ours").eval()
        report["ours_to_transformers"] = parity(theirs, mine, ids, prompt)
        print("ours -> transformers:", {k: v for k, v in report["ours_to_transformers"].items() if "greedy_" not in k})
        del mine, theirs
    # 2. prefill and decode, alternating
    long_prompt = rng.integers(0, 50257, (1, 256))
    runs = {"ours": [], "transformers": []}
    for r in range(args.repeats):
        for who in (("ours", "transformers") if r % 2 == 0 else ("transformers", "ours")):
            runs[who].append(time_ours(ours, long_prompt, 32) if who == "ours" else time_hf(hf, long_prompt, 32))
    speed = {}
    for who, measured in runs.items():
        speed[who] = {"prefill_tok_s": 256 / statistics.median(m[0] for m in measured),
                      "decode_tok_s": 1 / statistics.median(m[1] for m in measured)}
    speed["ratio_prefill"] = speed["ours"]["prefill_tok_s"] / speed["transformers"]["prefill_tok_s"]
    speed["ratio_decode"] = speed["ours"]["decode_tok_s"] / speed["transformers"]["decode_tok_s"]
    report["inference_batch1_prompt256_decode32"] = speed
    print(f"prefill 256 tokens: ours {speed['ours']['prefill_tok_s']:,.0f} tok/s, transformers "
          f"{speed['transformers']['prefill_tok_s']:,.0f} ({speed['ratio_prefill']:.2f}x); decode: ours "
          f"{speed['ours']['decode_tok_s']:.1f} tok/s, transformers {speed['transformers']['decode_tok_s']:.1f} "
          f"({speed['ratio_decode']:.2f}x)")
    # 3. one fine-tuning step of the finetune-gpt2 preset, each framework in turn
    cfg = PRESETS["finetune-gpt2"]
    B, T, accum = cfg["batch_size"], cfg["block_size"], cfg["grad_accum"]
    batches = [[(rng.integers(0, 50257, (B, T)), rng.integers(0, 50257, (B, T))) for _ in range(accum)]
               for _ in range(args.finetune_steps + 1)]
    ours.crop_block_size(T)
    steps = {"ours": our_finetune_step(ours, cfg), "torch": torch_finetune_step(hf, cfg)}
    try:
        times = alternate(steps, batches)
    finally:
        steps["ours"].close()
    ours_ms, theirs_ms = times["ours"], times["torch"]
    report["finetune_step"] = {"tokens_per_step": B * T * accum, "ours_ms": median_ms(ours_ms),
                               "torch_ms": median_ms(theirs_ms),
                               "ratio_tokens_per_s": statistics.median(theirs_ms) / statistics.median(ours_ms)}
    f = report["finetune_step"]
    print(f"finetune-gpt2 step ({B} x {T} x {accum} tokens): ours {f['ours_ms']['median']:.0f} ms "
          f"({f['ours_ms']['min']:.0f}-{f['ours_ms']['max']:.0f}), PyTorch {f['torch_ms']['median']:.0f} ms "
          f"({f['torch_ms']['min']:.0f}-{f['torch_ms']['max']:.0f}): {f['ratio_tokens_per_s']:.2f}x its tokens/s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
