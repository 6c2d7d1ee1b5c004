"""Train a GPT on tiny Shakespeare (or any text) with tinygrad_lite.

    python train.py                                   # CPU preset, char-level Shakespeare
    python train.py --preset shakespeare-char --device cuda
    python train.py --data my.txt --tokenizer cl100k_base-compact --max-iters 500
    python train.py --resume                          # continue from out-shakespeare-char/ckpt.npz

The loop, as in every framework: get a batch, forward, loss, backward, clip, step,
zero_grad; every --eval-interval iterations estimate train/val loss and checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import tinygrad_lite  # noqa: F401  (before NumPy: it sets OpenBLAS's thread spin)
import numpy as np

from model.cli import OneLineParser, UserError, report

# --- presets: nanoGPT's configs for tiny Shakespeare, character level --------------------
PRESETS = {
    # nanoGPT's CPU config (its README: about 1.88 val loss after 2000 iterations)
    "shakespeare-char-cpu": dict(
        n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=2000,
        lr=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=2000, beta1=0.9, beta2=0.99,
        weight_decay=0.1, grad_clip=1.0, dropout=0.0, eval_interval=250, eval_iters=20,
        tokenizer="char", pos="learned", grad_accum=1, device="cpu"),
    # nanoGPT's GPU config (about 1.47 val loss); run it with --device cuda
    "shakespeare-char": dict(
        n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, max_iters=5000,
        lr=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=5000, beta1=0.9, beta2=0.99,
        weight_decay=0.1, grad_clip=1.0, dropout=0.2, eval_interval=250, eval_iters=200,
        tokenizer="char", pos="learned", grad_accum=1, device="cuda"),
}
DEFAULT_PRESET = "shakespeare-char-cpu"
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "pos", "bias")


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--data", default=None, help="a UTF-8 text file (default: tiny Shakespeare, downloaded and cached)")
    p.add_argument("--out-dir", default=None, help="checkpoint and logs (default: out-<preset>)")
    p.add_argument("--init-from", default=None, help="start from this out dir's weights (fine-tuning)")
    for name, kind in [("max-iters", int), ("batch-size", int), ("block-size", int), ("n-layer", int),
                       ("n-head", int), ("n-embd", int), ("dropout", float), ("lr", float),
                       ("min-lr", float), ("warmup-iters", int), ("lr-decay-iters", int),
                       ("weight-decay", float), ("beta1", float), ("beta2", float),
                       ("grad-clip", float), ("grad-accum", int), ("eval-interval", int),
                       ("eval-iters", int)]:
        p.add_argument(f"--{name}", type=kind, default=None, help="(preset's value)")
    p.add_argument("--pos", choices=["learned", "rope"], default=None, help="position encoding")
    p.add_argument("--tokenizer", default=None, help="char, cl100k_base, cl100k_base-compact, ...")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out-dir")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the preset's, cpu if no CuPy)")
    p.add_argument("--shards", type=int, default=None,
                   help="split each batch over this many CPU processes (default: one per core when a "
                        "step is big enough to pay for them, else 1)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip a step whose loss or gradient is NaN/Inf instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> dict:
    """Preset values, overridden by every flag the user gave."""
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r}; choose one of: {', '.join(PRESETS)}")
    cfg = dict(PRESETS[args.preset])
    for key, value in vars(args).items():
        if value is not None and key in cfg:
            cfg[key] = value
    cfg.update(seed=args.seed, preset=args.preset, bias=False)
    cfg["out_dir"] = args.out_dir or f"out-{args.preset}"
    if Path(cfg["out_dir"]).exists() and not Path(cfg["out_dir"]).is_dir():
        raise UserError(f"--out-dir {cfg['out_dir']} is a file, not a folder")
    if cfg["device"] == "cuda" and args.device is None:
        from tinygrad_lite import backend
        if not backend.cuda_available:
            cfg["device"] = "cpu"  # the GPU preset still runs, slowly, without CuPy
    if cfg["max_iters"] < 0:
        raise UserError(f"--max-iters must be >= 0, got {cfg['max_iters']}")
    for key in ("batch_size", "block_size", "grad_accum", "eval_interval", "eval_iters",
                "n_layer", "n_head", "n_embd"):
        if cfg[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise UserError(f"--n-embd {cfg['n_embd']} is not divisible by --n-head {cfg['n_head']}")
    if not 0 <= cfg["dropout"] < 1:
        raise UserError(f"--dropout must be in [0, 1), got {cfg['dropout']}")
    if not (cfg["lr"] > 0 and cfg["min_lr"] >= 0):  # written so that NaN fails too
        raise UserError(f"--lr must be > 0 and --min-lr >= 0, got {cfg['lr']} and {cfg['min_lr']}")
    for key in ("beta1", "beta2"):  # beta2 = 1 would divide by 1 - beta2^t = 0 in Adam's bias correction
        if not 0 <= cfg[key] < 1:
            raise UserError(f"--{key} must be in [0, 1), got {cfg[key]}")
    if not cfg["weight_decay"] >= 0:
        raise UserError(f"--weight-decay must be >= 0, got {cfg['weight_decay']}")
    if args.shards is not None and args.shards < 1:
        raise UserError(f"--shards must be >= 1, got {args.shards}")
    if args.shards is not None and args.shards > 1 and cfg["device"] != "cpu":
        raise UserError(f"--shards {args.shards} splits batches over CPU processes; "
                        f"on --device {cfg['device']} use --shards 1")
    return cfg


# --- helpers ------------------------------------------------------------------------------


def check_training_header(meta: dict, path: Path) -> None:
    """A checkpoint to resume or fine-tune from must carry train.py's config and tokenizer."""
    from model.checkpoint import CheckpointError
    config = meta.get("config")
    missing = [k for k in ("config", "tokenizer") if k not in meta]
    missing += [f"config.{k}" for k in ARCH_KEYS + ("tokenizer",) if isinstance(config, dict) and k not in config]
    if missing:
        raise CheckpointError(f"{path} has no {', '.join(missing)} in its header; was it written by train.py?")


def load_training_text(cfg: dict) -> str:
    from model.data import load_text, shakespeare_path
    return load_text(cfg["data"] if cfg.get("data") else shakespeare_path())


def estimate_loss(parallel, splits: dict, cfg: dict, iter_num: int) -> dict:
    """Mean loss of parallel.model over eval_iters batches of each split. Its own RNG,
    seeded by the iteration, so evaluating never changes the training batches (exact resume)."""
    from model.data import get_batch
    from tinygrad_lite import no_grad
    model = parallel.model
    model.eval()
    out = {}
    with no_grad():
        for name, data in splits.items():
            rng = np.random.default_rng([cfg["seed"], iter_num, len(name)])
            losses = [parallel.loss(*get_batch(data, cfg["batch_size"], cfg["block_size"], rng))
                      for _ in range(cfg["eval_iters"])]
            out[name] = float(np.mean(losses))
    model.train()
    return out


def measure_matmul_flops(device: str, seconds: float = 0.3) -> float:
    """The machine's float32 matmul throughput (FLOP/s), the ceiling for MFU."""
    from tinygrad_lite import backend
    xp = backend.namespace(device)
    n = 512
    a = backend.randn((n, n), device)
    b = backend.randn((n, n), device)
    (a @ b).sum().item()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        c = a @ b
        runs += 1
    float(c[0, 0])  # wait for the device
    del xp
    return 2 * n ** 3 * runs / (time.perf_counter() - start)


def plot_losses(log_path: Path, png_path: Path) -> bool:
    """Draw train/val loss from the JSONL log, if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = []
    for line in log_path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    evals = [r for r in rows if r.get("kind") == "eval"]
    steps = [r for r in rows if r.get("kind") == "train"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], alpha=0.3, label="train (batch)")
    ax.plot([r["iter"] for r in evals], [r["train"] for r in evals], "o-", label="train (eval)")
    ax.plot([r["iter"] for r in evals], [r["val"] for r in evals], "o-", label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


# --- the training run ----------------------------------------------------------------------


def auto_shards(model, cfg: dict) -> int:
    """One data-parallel shard per CPU core, if a step is big enough (>= 1e8 FLOPs, about
    a millisecond of matmul) to pay for starting the worker processes; else 1."""
    from tinygrad_lite import backend
    tokens = cfg["batch_size"] * cfg["block_size"]
    if cfg["device"] != "cpu" or cfg["batch_size"] < 2 or model.flops_per_token() * tokens < 1e8:
        return 1
    return backend.THREADS


def train(cfg: dict, args: argparse.Namespace) -> dict:
    from tinygrad_lite import backend, optim
    from tinygrad_lite.parallel import DataParallel
    from model.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint
    from model.data import encode_dataset, get_batch
    from model.gpt import GPT, GPTConfig
    from model.tokenizer import make_tokenizer, tokenizer_from_dict

    out_dir = Path(cfg["out_dir"])
    ckpt_path = out_dir / CHECKPOINT_NAME
    backend.set_default_device(cfg["device"])
    backend.manual_seed(cfg["seed"])

    # 1. the checkpoint to start from, if any
    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(ckpt_path)  # CheckpointError on any problem
        check_training_header(checkpoint[1], ckpt_path)
        saved = checkpoint[1]
        for key in ARCH_KEYS + ("tokenizer",):  # the architecture comes from the checkpoint
            cfg[key] = saved["config"][key]
        if saved["config"].get("data") and not cfg.get("data"):
            cfg["data"] = saved["config"]["data"]
    elif args.init_from:
        checkpoint = load_checkpoint(Path(args.init_from) / CHECKPOINT_NAME)
        check_training_header(checkpoint[1], Path(args.init_from) / CHECKPOINT_NAME)
        for key in ARCH_KEYS:
            cfg[key] = checkpoint[1]["config"][key]

    # 2. data and tokenizer
    text = load_training_text(cfg)
    if checkpoint is not None:
        tokenizer = tokenizer_from_dict(checkpoint[1]["tokenizer"])
    else:
        tokenizer = make_tokenizer(cfg["tokenizer"], text)
    train_ids, val_ids = encode_dataset(text, tokenizer, out_dir / "data")
    for name, ids in (("train", train_ids), ("val", val_ids)):
        if len(ids) < cfg["block_size"] + 1:
            raise UserError(f"the {name} split has {len(ids)} tokens; block_size {cfg['block_size']} "
                            f"needs at least {cfg['block_size'] + 1} (use more text or a smaller --block-size)")

    # 3. model and optimizer
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                       n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=cfg["dropout"],
                       bias=cfg["bias"], pos=cfg["pos"])
    model = GPT(config)
    optimizer = optim.AdamW(model.optimizer_groups(cfg["weight_decay"]), lr=cfg["lr"],
                            betas=(cfg["beta1"], cfg["beta2"]))
    # each batch is split over the CPU cores, one shard per core (tinygrad_lite/parallel.py)
    parallel = DataParallel(model, shards=args.shards if args.shards is not None else auto_shards(model, cfg))
    rng = np.random.default_rng(cfg["seed"])  # the training batches
    iter_num, best_val = 0, math.inf
    if checkpoint is not None:
        model_state, meta, optim_state = checkpoint
        try:
            model.load_state_dict(model_state)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint does not fit this model: {e}") from None
        if args.resume:
            if optim_state is None:
                raise CheckpointError(f"{ckpt_path} has no optimizer state; cannot resume exactly")
            optimizer.load_state_dict(optim_state)
            iter_num, best_val = meta["iter_num"], meta.get("best_val", math.inf)
            rng.bit_generator.state = meta["data_rng"]
            backend.set_rng_state(meta["dropout_rng"])

    def checkpoint_now(losses: dict | None) -> None:
        meta = {"config": {**cfg, "vocab_size": tokenizer.vocab_size}, "model_config": config.to_dict(),
                "tokenizer": tokenizer.to_dict(), "iter_num": iter_num, "best_val": best_val,
                "losses": losses, "data_rng": rng.bit_generator.state,
                "dropout_rng": backend.rng_state()}
        save_checkpoint(ckpt_path, model.state_dict(), meta, optimizer.state_dict())

    # 4. the loop
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "log.jsonl"
    log = open(log_path, "a")
    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * cfg["grad_accum"]
    peak_flops = measure_matmul_flops(cfg["device"])
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {config}", file=sys.stderr)
    print(f"data: {len(train_ids):,} train / {len(val_ids):,} val tokens, vocab {tokenizer.vocab_size}; "
          f"{tokens_per_iter} tokens/iter; device {cfg['device']}"
          f"{f' ({parallel.shards} data-parallel shards)' if parallel.shards > 1 else ''}; "
          f"matmul peak {peak_flops / 1e9:.0f} GFLOP/s",
          file=sys.stderr)
    progress = None
    if not args.no_progress and iter_num < cfg["max_iters"]:
        from tqdm import tqdm
        progress = tqdm(total=cfg["max_iters"], initial=iter_num, unit="it", file=sys.stderr,
                        dynamic_ncols=True)
    losses, start, timed_tokens = None, time.perf_counter(), 0
    while True:
        if iter_num % cfg["eval_interval"] == 0 or iter_num >= cfg["max_iters"]:
            losses = estimate_loss(parallel, {"train": train_ids, "val": val_ids}, cfg, iter_num)
            best_val = min(best_val, losses["val"])
            log.write(json.dumps({"kind": "eval", "iter": iter_num, **losses}) + "\n")
            log.flush()
            message = f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            (progress.write if progress else lambda m: print(m, file=sys.stderr))(message)
            checkpoint_now(losses)
        if iter_num >= cfg["max_iters"]:
            break

        lr = optim.cosine_lr(iter_num, cfg["lr"], cfg["min_lr"], cfg["warmup_iters"], cfg["lr_decay_iters"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_start = time.perf_counter()
        loss_sum = 0.0
        for _ in range(cfg["grad_accum"]):
            x, y = get_batch(train_ids, cfg["batch_size"], cfg["block_size"], rng)
            # forward, loss, backward (on every shard); the gradients add up in .grad
            loss_sum += parallel.forward_backward(x, y, scale=1.0 / cfg["grad_accum"]) / cfg["grad_accum"]
        grad_norm = optim.clip_grad_norm(model.parameters(), cfg["grad_clip"]) if cfg["grad_clip"] > 0 else \
            math.sqrt(sum(float((p.grad * p.grad).sum()) for p in model.parameters() if p.grad is not None))
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            optimizer.zero_grad()
            what = f"non-finite {'loss' if not math.isfinite(loss_sum) else 'gradient norm'} at iteration {iter_num}"
            if not args.skip_nonfinite:
                raise UserError(f"{what}; stopped, the last good checkpoint {ckpt_path} is kept "
                                "(lower --lr, or pass --skip-nonfinite)")
            (progress.write if progress else print)(f"{what}: step skipped")
            iter_num += 1
            continue
        optimizer.step()
        optimizer.zero_grad()
        iter_num += 1
        step_time = time.perf_counter() - step_start
        if iter_num > 1:  # the first step warms up caches: leave it out of the speed
            timed_tokens += tokens_per_iter
        else:
            start = time.perf_counter()
        tok_s = tokens_per_iter / step_time
        mfu = model.flops_per_token() * tok_s / peak_flops
        log.write(json.dumps({"kind": "train", "iter": iter_num, "loss": loss_sum, "lr": lr,
                              "grad_norm": grad_norm, "ms": step_time * 1000, "tok_s": tok_s}) + "\n")
        if progress:
            progress.set_postfix_str(f"loss {loss_sum:.3f} | {tok_s:,.0f} tok/s | MFU {100 * mfu:.0f}%")
            progress.update(1)
    if progress:
        progress.close()
    log.close()
    parallel.close()
    elapsed = time.perf_counter() - start
    summary = {"iter_num": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
               "best_val": best_val, "tokens_per_s": timed_tokens / elapsed if timed_tokens else None}
    if summary["tokens_per_s"]:
        mfu = model.flops_per_token() * summary["tokens_per_s"] / peak_flops
        print(f"done: {summary['tokens_per_s']:,.0f} tokens/s, MFU {100 * mfu:.1f}% "
              f"of {peak_flops / 1e9:.0f} GFLOP/s", file=sys.stderr)
        summary["mfu"] = mfu
    print(f"final: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}; checkpoint {ckpt_path}",
          file=sys.stderr)
    if plot_losses(log_path, out_dir / "loss.png"):
        print(f"loss curve: {out_dir / 'loss.png'}", file=sys.stderr)
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
        cfg["data"] = args.data
        train(cfg, args)
        return 0
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; continue with --resume", file=sys.stderr)
        return 130
    except Exception as e:
        return report(e, args.debug)


if __name__ == "__main__":
    sys.exit(main())
