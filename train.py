"""Train a GPT on tiny Shakespeare (or any text) with tinygrad_lite.

    python train.py                                   # CPU preset, char-level Shakespeare
    python train.py --preset shakespeare-char --device cuda
    python train.py --data my.txt --tokenizer cl100k_base-compact --max-iters 500
    python train.py --resume                          # continue from the checkpoint in out-shakespeare-char-cpu
    python train.py --init-from gpt2                  # fine-tune GPT-2 on tiny Shakespeare (preset finetune-gpt2)
    python train.py --stage sft --data chats.jsonl --init-from out-shakespeare-char-cpu --out-dir out-sft
    python train.py --stage dpo --data prefs.jsonl --init-from out-sft --out-dir out-dpo --beta 0.1
    mpiexec -n 4 python train.py                      # 4 processes (or hosts), one slice of each batch each
    python train.py --ops primitive --max-iters 200   # the same run on the readable ops

The loop, as in every framework: get a batch, forward, loss, backward, clip, step,
zero_grad (`train_step`); every --eval-interval iterations estimate train/val loss and
checkpoint (`evaluate_and_checkpoint`).
"""
import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model import pretrained
from model.checkpoint import MANIFEST, CheckpointError, has_checkpoint, load_checkpoint, load_extra, save_checkpoint
from model.cli import HelpFormatter, OneLineParser, UserError, report
from model import dpo, sft
from model.chat import ChatTokenizer
from model.data import encode_dataset, get_batch, load_text, shakespeare_path
from model.gpt import GPT, GPTConfig
from model.outdir_lock import OutDirLock
from model.preemption import EXIT_CODES, StopRequest
from model.tokenizer import make_tokenizer, tokenizer_from_dict
from tinygrad_lite import Tensor, backend, cpu, no_grad, ops_tier, optim
from tinygrad_lite.functional import DEFAULT_TIER, TIERS
from tinygrad_lite.distributed import GradientSync, from_environment, local_ranks
from tinygrad_lite.parallel import DataParallel, shard_bounds

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
    # nanoGPT's finetune_shakespeare, sized for a CPU: GPT-2 (124M) on tiny Shakespeare in
    # GPT-2's BPE, a small constant learning rate, few iterations, contexts of 256 tokens
    # (wpe cropped from 1024). The architecture comes from the pretrained model.
    "finetune-gpt2": dict(
        init_from="gpt2", n_layer=12, n_head=12, n_embd=768, block_size=256, batch_size=4, max_iters=20,
        lr=3e-5, min_lr=3e-5, warmup_iters=0, lr_decay_iters=20, beta1=0.9, beta2=0.95,
        weight_decay=0.1, grad_clip=1.0, dropout=0.0, eval_interval=10, eval_iters=4,
        tokenizer="gpt2", pos="learned", grad_accum=2, device="cpu"),
}
STAGES = ("pretrain", "sft", "dpo")
DEFAULT_PRESET = "shakespeare-char-cpu"
FINETUNE_PRESET = "finetune-gpt2"  # the default when --init-from names a pretrained GPT-2
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "pos", "bias", "layer_norm_eps")


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    preset = PRESETS[DEFAULT_PRESET]
    p.add_argument("--preset", default=None, help=f"one of: {', '.join(PRESETS)} (default: {DEFAULT_PRESET}, "
                   f"or {FINETUNE_PRESET} when --init-from names a GPT-2)")
    p.add_argument("--data", default=None, help="a UTF-8 text file (default: tiny Shakespeare, shipped in the package)")
    p.add_argument("--out-dir", default=None, help="checkpoint and logs (default: out-<preset>)")
    p.add_argument("--stage", choices=STAGES, default=None,
                   help="pretrain on text; sft on chats (JSONL of messages); dpo on preference pairs (JSONL of "
                        "prompt, chosen, rejected); sft and dpo need --init-from (default: pretrain, or the "
                        "stage of the run --resume continues)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO: how far from the reference the policy may move")
    p.add_argument("--init-from", default=None,
                   help="start from these weights (fine-tuning): an out dir of train.py, a folder in the Hugging "
                        "Face layout (config.json + model.safetensors), or a hub name (gpt2, gpt2-medium, "
                        "gpt2-large, gpt2-xl, distilgpt2), in that order")
    for name, kind in [("max-iters", int), ("batch-size", int), ("block-size", int), ("n-layer", int),
                       ("n-head", int), ("n-embd", int), ("dropout", float), ("lr", float),
                       ("min-lr", float), ("warmup-iters", int), ("lr-decay-iters", int),
                       ("weight-decay", float), ("beta1", float), ("beta2", float),
                       ("grad-clip", float), ("grad-accum", int), ("eval-interval", int),
                       ("eval-iters", int)]:
        value = preset[name.replace("-", "_")]
        p.add_argument(f"--{name}", type=kind, default=None, help=f"default: the preset's ({value} in {DEFAULT_PRESET})")
    p.add_argument("--pos", choices=["learned", "rope"], default=None, help="position encoding (default: learned)")
    p.add_argument("--tokenizer", default=None, help="char, cl100k_base, cl100k_base-compact, ... (default: char)")
    p.add_argument("--ops", choices=list(TIERS), default=DEFAULT_TIER,
                   help="which tier of the ops runs: the readable primitive compositions, the fused ops "
                        "with hand-written backward, or the fast kernels")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out-dir")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the preset's, cpu if no CuPy)")
    p.add_argument("--shards", type=int, default=None,
                   help="split each batch over this many CPU processes (default: one per core when a "
                        "step is big enough to pay for them, else 1)")
    p.add_argument("--ckpt-interval", type=int, default=100,
                   help="write a checkpoint every N iterations (and at every eval): the most a crash can lose")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip a step whose loss or gradient is NaN/Inf instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> dict:
    """Preset values, overridden by every flag the user gave."""
    if args.preset is None:  # a pretrained GPT-2 wants fine-tuning settings, not the char model's
        pretrained = args.init_from and not has_checkpoint(args.init_from)
        args.preset = FINETUNE_PRESET if pretrained else DEFAULT_PRESET
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r}; choose one of: {', '.join(PRESETS)}")
    cfg = dict(PRESETS[args.preset])
    cfg.setdefault("init_from", None)
    for key, value in vars(args).items():
        if value is not None and key in cfg:
            cfg[key] = value
    cfg.update(seed=args.seed, preset=args.preset, bias=False, layer_norm_eps=1e-5)
    cfg["out_dir"] = args.out_dir or f"out-{args.preset}"
    if Path(cfg["out_dir"]).exists() and not Path(cfg["out_dir"]).is_dir():
        raise UserError(f"--out-dir {cfg['out_dir']} is a file, not a folder")
    if cfg["device"] == "cuda" and args.device is None:
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
    if not cfg["grad_clip"] >= 0:
        raise UserError(f"--grad-clip must be >= 0 (0: no clipping), got {cfg['grad_clip']}")
    for key in ("warmup_iters", "lr_decay_iters"):
        if cfg[key] < 0:
            raise UserError(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    if args.shards is not None and args.shards < 1:
        raise UserError(f"--shards must be >= 1, got {args.shards}")
    cfg.update(stage=args.stage or "pretrain", beta=args.beta)
    if args.stage in ("sft", "dpo") and not args.resume:
        if not cfg.get("init_from"):
            raise UserError(f"--stage {args.stage} starts from a trained model: pass --init-from OUT_DIR "
                            f"({'a pre-trained' if args.stage == 'sft' else 'an SFT'} out dir, or a GPT-2)")
        if not args.data:
            raise UserError(f"--stage {args.stage} needs --data FILE.jsonl "
                            f"({'conversations' if args.stage == 'sft' else 'preference pairs'})")
    if cfg["stage"] != "pretrain" or args.resume:  # (a resumed run's stage is known once its checkpoint is read)
        if args.shards is not None and args.shards > 1 and cfg["stage"] != "pretrain":
            # NOTE: the loss is a mean over answer tokens (SFT) or over pairs scored against a
            # reference model (DPO): equal rows per shard no longer split it evenly, and every
            # worker would need the reference; these small runs take one process
            raise UserError(f"--stage {args.stage} runs in one process; drop --shards {args.shards}")
    if args.ckpt_interval < 1:
        raise UserError(f"--ckpt-interval must be >= 1, got {args.ckpt_interval}")
    if not args.beta > 0:
        raise UserError(f"--beta must be > 0, got {args.beta}")
    if args.shards is not None and args.shards > 1 and cfg["device"] != "cpu":
        raise UserError(f"--shards {args.shards} splits batches over CPU processes; "
                        f"on --device {cfg['device']} use --shards 1")
    return cfg


# --- setting up a run -----------------------------------------------------------------------


@dataclass
class Data:
    """What a stage trains on: its examples, split, and how to draw a batch of them."""

    train: Any  # pretrain: token ids (N,); sft: (ids, mask) rows; dpo: (chosen, rejected) pairs
    val: Any
    draw: Any  # draw(examples, rng) -> x, y (B, T) int64

    def batch(self, split: str, rng: np.random.Generator):
        return self.draw(self.train if split == "train" else self.val, rng)


@dataclass
class Run:
    """Everything one training run holds, made by `setup` and advanced by `train_step`."""

    cfg: dict
    model: GPT
    optimizer: optim.AdamW
    parallel: DataParallel | None  # None: one process, the plain loop
    tokenizer: Any
    data: Data
    rng: np.random.Generator  # draws the training batches
    out_dir: Path
    reference: GPT | None = None  # DPO: the frozen model the rewards are measured against
    sync: GradientSync | None = None  # under mpiexec: adds the ranks' gradients up
    stop: StopRequest | None = None  # SIGTERM / Ctrl-C: stop after this step, saved
    iter_num: int = 0
    best_val: float = math.inf
    losses: dict | None = None  # the last evaluation
    log: Any = field(default=None, repr=False)


def check_training_header(meta: dict, path: Path) -> None:
    """A checkpoint to resume or fine-tune from must carry train.py's config and tokenizer."""
    config = meta.get("config")
    missing = [k for k in ("config", "tokenizer") if k not in meta]
    missing += [f"config.{k}" for k in ("n_layer", "n_head", "n_embd", "block_size", "pos", "bias", "tokenizer")
                if isinstance(config, dict) and k not in config]
    if missing:
        raise CheckpointError(f"{path} has no {', '.join(missing)} in its header; was it written by train.py?")


def starting_checkpoint(cfg: dict, args: argparse.Namespace):
    """(model state, header, optimizer state) to start from, or None: --resume reads the out
    dir's checkpoint; --init-from an out dir of ours, a GPT-2 folder or a hub name
    (model/pretrained.py). The architecture it fixes is copied into cfg."""
    if args.resume:
        checkpoint = load_checkpoint(cfg["out_dir"])  # CheckpointError on any problem
        check_training_header(checkpoint[1], Path(cfg["out_dir"]))
        saved_stage = checkpoint[1]["config"].get("stage", "pretrain")
        if args.stage is not None and args.stage != saved_stage:
            raise UserError(f"--resume continues the {saved_stage} run in {cfg['out_dir']}, not --stage {args.stage}")
        cfg.update(stage=saved_stage, beta=checkpoint[1]["config"].get("beta", cfg["beta"]),
                   init_from=checkpoint[1]["config"].get("init_from"))
    elif cfg.get("init_from"):
        kind, path = pretrained.resolve(cfg["init_from"])  # PretrainedError (one line) if it cannot be had
        if kind == "ours":
            checkpoint = load_checkpoint(path)
            check_training_header(checkpoint[1], path)
        else:
            checkpoint = pretrained_start(path)
    else:
        return None
    saved = checkpoint[1]["config"]
    wanted_block = cfg["block_size"]
    for key in ARCH_KEYS + (("tokenizer", "dropout") if args.resume else ()):
        cfg[key] = saved.get(key, 1e-5 if key == "layer_norm_eps" else None)  # (older headers lack eps)
    if not args.resume and wanted_block < cfg["block_size"]:  # fine-tune on shorter contexts: crop wpe
        cfg["checkpoint_block_size"], cfg["block_size"] = cfg["block_size"], wanted_block
    if args.resume and saved.get("data") and not cfg.get("data"):
        cfg["data"] = saved["data"]
    return checkpoint


def pretrained_start(path: Path):
    """A GPT-2 folder as a starting checkpoint: its weights and a header that names its
    architecture and tokenizer (GPT-2's BPE from the folder's files, else tiktoken's gpt2)."""
    model = pretrained.load_hf_dir(path)
    tokenizer = model.tokenizer or make_tokenizer("gpt2", "")  # TokenizerUnavailableError offline
    c = model.config
    config = {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "block_size": c.block_size,
              "pos": c.pos, "bias": c.bias, "layer_norm_eps": c.layer_norm_eps, "tokenizer": "gpt2"}
    state = {name: p.data for name, p in model.named_parameters()}  # the arrays themselves: no copy
    return state, {"config": config, "tokenizer": tokenizer.to_dict(), "init_from": str(path)}, None


def load_data(cfg: dict, checkpoint, out_dir: Path) -> tuple[Any, Data]:
    """(tokenizer, Data) for the stage: the checkpoint's tokenizer, or a new one for the
    text; SFT and DPO add the chat template's special tokens (model/chat.py) if it lacks them."""
    B, T = cfg["batch_size"], cfg["block_size"]
    if cfg["stage"] == "pretrain":
        text = load_text(cfg["data"] if cfg.get("data") else shakespeare_path())
        tokenizer = (tokenizer_from_dict(checkpoint[1]["tokenizer"]) if checkpoint is not None
                     else make_tokenizer(cfg["tokenizer"], text))
        train_ids, val_ids = encode_dataset(text, tokenizer, out_dir / "data")
        for name, ids in (("train", train_ids), ("val", val_ids)):
            if len(ids) < T + 1:
                raise UserError(f"the {name} split has {len(ids)} tokens; block_size {T} needs at least "
                                f"{T + 1} (use more text or a smaller --block-size)")
        return tokenizer, Data(train_ids, val_ids, lambda ids, rng: get_batch(ids, B, T, rng))
    tokenizer = tokenizer_from_dict(checkpoint[1]["tokenizer"])
    if not isinstance(tokenizer, ChatTokenizer):
        tokenizer = ChatTokenizer(tokenizer)
    pad = tokenizer.special("<|end|>")  # any id: padded positions are never targets
    if cfg["stage"] == "sft":
        train, val = sft.split(sft.encode_conversations(cfg["data"], tokenizer, T))
        return tokenizer, Data(train, val, lambda rows, rng: sft.get_chat_batch(rows, B, T, pad, rng))
    train, val = sft.split(dpo.encode_preferences(cfg["data"], tokenizer, T))
    return tokenizer, Data(train, val, lambda pairs, rng: dpo.preference_batch(
        pairs, rng.integers(0, len(pairs), size=B), T, pad))


def auto_shards(model: GPT, cfg: dict) -> int:
    """One data-parallel shard per CPU core, if a step is big enough (>= 1e8 FLOPs, about
    a millisecond of matmul) to pay for starting the worker processes; else 1. SFT and
    DPO run in one process (resolve_config says why)."""
    tokens = cfg["batch_size"] * cfg["block_size"]
    if (cfg["device"] != "cpu" or cfg["stage"] != "pretrain" or cfg["batch_size"] < 2
            or model.flops_per_token() * tokens < 1e8):
        return 1
    return cpu.num_threads()


def build_model(cfg: dict, vocab_size: int, block_size: int | None = None) -> GPT:
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size or cfg["block_size"], n_layer=cfg["n_layer"],
                         n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=cfg["dropout"], bias=cfg["bias"],
                         pos=cfg["pos"], layer_norm_eps=cfg["layer_norm_eps"]))


def load_weights(model: GPT, state: dict) -> None:
    try:
        model.load_state_dict(state)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint does not fit this model: {e}") from None


def setup(cfg: dict, args: argparse.Namespace, comm=None) -> Run:
    """Model, optimizer, data and shards for cfg; with --resume or --init-from, the weights
    (and, resuming, the optimizer, iteration and random streams) from the checkpoint.
    Under mpiexec (comm), every rank builds the same run; rank 0 encodes the data first."""
    out_dir = Path(cfg["out_dir"])
    backend.set_default_device(cfg["device"])
    backend.manual_seed(cfg["seed"])
    checkpoint = starting_checkpoint(cfg, args)
    if comm is not None and comm.rank != 0:
        comm.barrier()  # rank 0 writes the token cache; the others then read it
    tokenizer, data = load_data(cfg, checkpoint, out_dir)
    if comm is not None and comm.rank == 0:
        comm.barrier()
    vocab_size = tokenizer.vocab_size
    if checkpoint is not None and "wte.weight" in checkpoint[0]:
        vocab_size = len(checkpoint[0]["wte.weight"])  # a model may have more rows than its tokenizer
    model = build_model(cfg, vocab_size, cfg.pop("checkpoint_block_size", None))
    if checkpoint is not None:
        load_weights(model, checkpoint[0])
        if model.config.block_size > cfg["block_size"]:
            model.crop_block_size(cfg["block_size"])
    if tokenizer.vocab_size > model.config.vocab_size:  # the chat's new tokens: an explicit resize
        model.resize_token_embeddings(tokenizer.vocab_size)
    optimizer = optim.AdamW(model.optimizer_groups(cfg["weight_decay"]), lr=cfg["lr"],
                            betas=(cfg["beta1"], cfg["beta2"]))
    # each batch is split over the CPU cores, one shard per core (tinygrad_lite/parallel.py);
    # under mpiexec the ranks are the shards
    shards = 1 if comm is not None else args.shards if args.shards is not None else auto_shards(model, cfg)
    run = Run(cfg, model, optimizer, DataParallel(model, shards=shards) if shards > 1 else None,
              tokenizer, data, np.random.default_rng(cfg["seed"]), out_dir)
    if cfg["stage"] == "dpo":
        run.reference = frozen_reference(cfg, args, model)
    if comm is not None:
        run.sync = GradientSync(model.parameters(), comm)
        run.sync.broadcast_weights()  # every rank starts from rank 0's weights
    if args.resume:
        _, meta, optim_state = checkpoint
        if optim_state is None:
            raise CheckpointError(f"{out_dir / MANIFEST} has no optimizer state; cannot resume exactly")
        optimizer.load_state_dict(optim_state)
        run.iter_num, run.best_val = meta["iter_num"], meta.get("best_val", math.inf)
        run.rng.bit_generator.state = meta["data_rng"]
        backend.set_rng_state(meta["dropout_rng"])
    return run


def frozen_reference(cfg: dict, args: argparse.Namespace, model: GPT) -> GPT:
    """DPO's reference: a copy of the starting weights that never trains. Stored in every
    DPO checkpoint (reference.safetensors), so a resume scores against exactly the same
    model even if the --init-from out dir has trained on since."""
    reference = build_model(cfg, model.config.vocab_size)
    load_weights(reference, load_extra(cfg["out_dir"], "reference") if args.resume else model.state_dict())
    for p in reference.parameters():
        p.requires_grad = False  # no gradient ever reaches it
    return reference.eval()


# --- one step ------------------------------------------------------------------------------------


class NonFiniteStep(Exception):
    """A step whose loss or gradient norm is NaN or Inf; nothing was updated."""


def dpo_forward(run: Run, x: np.ndarray, y: np.ndarray) -> tuple[Tensor, dict]:
    """The DPO loss of a batch (x, y (2B, T): B chosen answers, then their B rejected ones),
    and its rewards, accuracy and KL for the log."""
    B = len(x) // 2
    logits, _ = run.model(x)  # (2B, T, V)
    logps = dpo.sequence_logps(logits, y)  # (2B,): summed over each answer's tokens
    with no_grad():
        reference_logits, _ = run.reference(x)
        reference_logps = dpo.sequence_logps(reference_logits, y).data
    loss, chosen, rejected = dpo.dpo_loss(logps[:B], logps[B:], reference_logps[:B], reference_logps[B:],
                                          run.cfg["beta"])
    return loss, {"reward_margin": float((chosen - rejected).mean()), "reward_accuracy": float((chosen > rejected).mean()),
                  "kl": dpo.kl_to_reference(logits, reference_logits, y)}


def train_step(run: Run, lr: float) -> tuple[float, float, dict]:
    """One optimizer step: grad_accum micro-batches of forward, loss and backward, then
    clip, step, zero_grad. Returns (mean loss, gradient norm before clipping, DPO stats)."""
    cfg, model, optimizer = run.cfg, run.model, run.optimizer
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum, stats = 0.0, {}
    for _ in range(cfg["grad_accum"]):
        x, y = run.data.batch("train", run.rng)  # (B, T) each
        if run.sync is not None:  # under mpiexec: this rank's rows of the global batch
            loss_sum += rank_forward_backward(run, x, y)
            continue
        if run.parallel is not None:  # data parallel: each shard runs the forward and backward below on its rows
            loss_sum += run.parallel.forward_backward(x, y, scale=1 / cfg["grad_accum"]) / cfg["grad_accum"]
            continue
        if run.reference is None:  # one process: the loop of every framework
            logits, loss = model(x, y)  # forward: logits (B, T, V) and the mean cross-entropy
        else:
            loss, stats = dpo_forward(run, x, y)  # forward, and DPO's loss against the reference
        (loss / cfg["grad_accum"]).backward()  # backward: d loss / d parameter adds into .grad
        loss_sum += loss.item() / cfg["grad_accum"]
    if run.sync is not None:  # one all-reduce: every rank now has the whole batch's gradient
        loss_sum, stopping = run.sync.allreduce([loss_sum, float(run.stop is not None and run.stop.requested)])
        stats["stop"] = stopping > 0  # a signal on any rank stops every rank after this step
    params = model.parameters()
    if cfg["grad_clip"] > 0:
        grad_norm = optim.clip_grad_norm(params, cfg["grad_clip"])  # rescale so the norm is <= grad_clip
    else:
        grad_norm = math.sqrt(sum(float((p.grad * p.grad).sum()) for p in params if p.grad is not None))
    if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
        optimizer.zero_grad()
        raise NonFiniteStep(f"non-finite {'loss' if not math.isfinite(loss_sum) else 'gradient norm'} "
                            f"at iteration {run.iter_num}")
    optimizer.step()  # AdamW: each parameter moves against its gradient
    optimizer.zero_grad()  # gradients add up, so clear them for the next step
    return loss_sum, grad_norm, stats


def rank_forward_backward(run: Run, x: np.ndarray, y: np.ndarray) -> float:
    """This rank's slice of the global batch: forward, loss, backward, weighted by its share
    of the rows (so the ranks' sum is the whole batch's mean). Returns share * loss."""
    start, stop = shard_bounds(len(x), run.sync.comm.world_size)[run.sync.comm.rank]
    share = (stop - start) / len(x)
    _, loss = run.model(x[start:stop], y[start:stop])
    (loss * (share / run.cfg["grad_accum"])).backward()
    return share * loss.item() / run.cfg["grad_accum"]


# --- evaluation and checkpoints ------------------------------------------------------------------


def estimate_loss(run: Run) -> dict:
    """Mean loss of the model over eval_iters batches of each split (and, for DPO, the
    held-out pairs' reward margin, preference accuracy and KL to the reference). Its own
    RNG, seeded by the iteration, so evaluating never changes the training batches."""
    cfg = run.cfg
    run.model.eval()
    out = {}
    with no_grad():
        for name in ("train", "val"):
            rng = np.random.default_rng([cfg["seed"], run.iter_num, len(name)])
            losses, stats = [], []
            for _ in range(cfg["eval_iters"]):
                x, y = run.data.batch(name, rng)
                if run.reference is not None:
                    loss, batch_stats = dpo_forward(run, x, y)
                    losses.append(loss.item())
                    stats.append(batch_stats)
                elif run.sync is not None:  # this rank's rows, weighted by their share
                    start, stop = shard_bounds(len(x), run.sync.comm.world_size)[run.sync.comm.rank]
                    losses.append(run.model(x[start:stop], y[start:stop])[1].item() * (stop - start) / len(x))
                else:
                    losses.append(run.model(x, y)[1].item() if run.parallel is None else run.parallel.loss(x, y))
            if run.sync is not None:
                losses = run.sync.allreduce_values(losses)  # the ranks' shares add up to each batch's loss
            out[name] = float(np.mean(losses))
            if stats and name == "val":
                out.update({k: float(np.mean([s[k] for s in stats])) for k in stats[0]})
    run.model.train()
    return out


def save(run: Run) -> None:
    """The checkpoint: weights, optimizer state, iteration, random streams, config, tokenizer
    (and DPO's reference model)."""
    cfg, tokenizer = run.cfg, run.tokenizer
    if run.sync is not None and run.sync.comm.rank != 0:
        return  # rank 0 alone writes; every rank holds the same weights
    meta = {"config": {**cfg, "vocab_size": tokenizer.vocab_size}, "model_config": run.model.config.to_dict(),
            "tokenizer": tokenizer.to_dict(), "iter_num": run.iter_num, "best_val": run.best_val,
            "losses": run.losses, "data_rng": run.rng.bit_generator.state, "dropout_rng": backend.rng_state(),
            "world_size": run.sync.comm.world_size if run.sync is not None else 1}
    extra = {"reference": run.reference.state_dict()} if run.reference is not None else None
    save_checkpoint(run.out_dir, run.model.state_dict(), meta, run.optimizer.state_dict(), extra)


def evaluate_and_checkpoint(run: Run, say) -> None:
    """Estimate train/val loss, log it, and write the checkpoint."""
    run.losses = estimate_loss(run)
    run.best_val = min(run.best_val, run.losses["val"])
    if run.log is not None:
        run.log.write(json.dumps({"kind": "eval", "iter": run.iter_num, **run.losses}) + "\n")
        run.log.flush()
    extra = "".join(f", {k} {v:.4f}" for k, v in run.losses.items() if k not in ("train", "val"))
    say(f"iter {run.iter_num}: train loss {run.losses['train']:.4f}, val loss {run.losses['val']:.4f}{extra}")
    save(run)


def measure_matmul_flops(device: str, seconds: float = 0.3) -> float:
    """The machine's float32 matmul throughput (FLOP/s), the ceiling for MFU."""
    n = 512
    a = backend.randn((n, n), device)
    b = backend.randn((n, n), device)
    (a @ b).sum().item()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        c = a @ b
        runs += 1
    float(c[0, 0])  # wait for the device
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


# --- the training run ----------------------------------------------------------------------------


def train(cfg: dict, args: argparse.Namespace) -> dict:
    """One run per out dir (a lock), on every rank mpiexec started: set up, then alternate
    evaluation + checkpoint (every eval_interval), checkpoints (every ckpt_interval) and
    train steps, until max_iters or a SIGTERM / Ctrl-C (then: the step ends, saved)."""
    comm = from_environment(cfg["device"])  # None: one process (its shards are local)
    lead = comm is None or comm.rank == 0  # rank 0 alone writes the log, checkpoints, progress
    out_dir, new_out_dir = Path(cfg["out_dir"]), not Path(cfg["out_dir"]).exists()
    lock = OutDirLock(out_dir).acquire() if lead else None  # OutDirInUse: one line
    stop = StopRequest().install()
    # the ranks on one host share its cores: each gets its share, for BLAS and the kernels alike
    threads = cpu.num_threads() if comm is None else max(1, cpu.num_threads() // local_ranks())
    try:
        with cpu.threads(threads):
            run = setup(cfg, args, comm)
            run.stop = stop
            return train_loop(run, args, lead)
    except BaseException:
        if lock is not None and new_out_dir and [p.name for p in out_dir.iterdir()] == [lock.path.name]:
            lock.release()
            shutil.rmtree(out_dir)  # a run that failed before writing anything leaves no out dir behind
        raise
    finally:
        stop.uninstall()
        if lock is not None:
            lock.release()


def train_loop(run: Run, args: argparse.Namespace, lead: bool) -> dict:
    cfg = run.cfg
    run.out_dir.mkdir(parents=True, exist_ok=True)
    log_path = run.out_dir / "log.jsonl"
    run.log = open(log_path, "a") if lead else None
    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * cfg["grad_accum"]
    peak_flops = measure_matmul_flops(cfg["device"])
    shards = run.parallel.shards if run.parallel is not None else 1
    ranks = run.sync.comm.world_size if run.sync is not None else 1
    say = (lambda m: print(m, file=sys.stderr)) if lead else (lambda m: None)
    say(f"model: {run.model.num_parameters() / 1e6:.2f}M parameters, {run.model.config}")
    unit = "tokens" if cfg["stage"] == "pretrain" else "conversations" if cfg["stage"] == "sft" else "pairs"
    say(f"data: {len(run.data.train):,} train / {len(run.data.val):,} val {unit}, vocab {run.tokenizer.vocab_size}; "
        f"{tokens_per_iter} tokens/iter; device {cfg['device']}; ops {args.ops}"
        f"{f' ({shards} data-parallel shards)' if shards > 1 else ''}{f' ({ranks} MPI ranks)' if ranks > 1 else ''}; "
        f"matmul peak {peak_flops / 1e9:.0f} GFLOP/s")
    progress = None
    if lead and not args.no_progress and run.iter_num < cfg["max_iters"]:
        from tqdm import tqdm
        progress = tqdm(total=cfg["max_iters"], initial=run.iter_num, unit="it", file=sys.stderr, dynamic_ncols=True)
        say = progress.write
    start, timed_tokens, stopped = time.perf_counter(), 0, False
    try:
        while True:
            if run.iter_num % cfg["eval_interval"] == 0 or run.iter_num >= cfg["max_iters"]:
                evaluate_and_checkpoint(run, say)
            elif run.iter_num % args.ckpt_interval == 0 or stopped:
                save(run)
            if run.iter_num >= cfg["max_iters"] or stopped:
                break
            lr = optim.cosine_lr(run.iter_num, cfg["lr"], cfg["min_lr"], cfg["warmup_iters"], cfg["lr_decay_iters"])
            step_start = time.perf_counter()
            try:
                loss, grad_norm, stats = train_step(run, lr)
            except NonFiniteStep as e:
                if not args.skip_nonfinite:
                    raise UserError(f"{e}; stopped, the last good checkpoint in {run.out_dir} "
                                    "is kept (lower --lr, or pass --skip-nonfinite)") from None
                say(f"{e}: step skipped")
                run.iter_num += 1
                continue
            run.iter_num += 1
            stopped = stats.pop("stop", run.sync is None and run.stop.requested)
            step_time = time.perf_counter() - step_start
            if run.iter_num > 1:  # the first step warms up caches: leave it out of the speed
                timed_tokens += tokens_per_iter
            else:
                start = time.perf_counter()
            tok_s = tokens_per_iter / step_time
            if run.log is not None:
                run.log.write(json.dumps({"kind": "train", "iter": run.iter_num, "loss": loss, "lr": lr,
                                          "grad_norm": grad_norm, "ms": step_time * 1000, "tok_s": tok_s,
                                          **stats}) + "\n")
            if progress:
                mfu = run.model.flops_per_token() * tok_s / peak_flops
                progress.set_postfix_str(f"loss {loss:.3f} | {tok_s:,.0f} tok/s | MFU {100 * mfu:.0f}%")
                progress.update(1)
    finally:
        if progress:
            progress.close()
        if run.log is not None:
            run.log.close()
        if run.parallel is not None:
            run.parallel.close()
    if stopped:
        raise Stopped(f"stopped by {run.stop.name() or 'a signal on another rank'} after iteration {run.iter_num}: "
                      f"checkpoint {run.out_dir / MANIFEST}; continue with --resume", EXIT_CODES.get(run.stop.signal, 143))
    if not lead:
        return {"iter_num": run.iter_num}
    return summarize(run, log_path, timed_tokens / (time.perf_counter() - start) if timed_tokens else None,
                     peak_flops)


class Stopped(Exception):
    """The run ended early on a signal, saved; args: (the one line to print, the exit code)."""


def summarize(run: Run, log_path: Path, tokens_per_s: float | None, peak_flops: float) -> dict:
    """Print and return the run's final figures; draw the loss curve."""
    losses = run.losses
    summary = {"iter_num": run.iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
               "best_val": run.best_val, "tokens_per_s": tokens_per_s}
    if tokens_per_s:
        summary["mfu"] = run.model.flops_per_token() * tokens_per_s / peak_flops
        print(f"done: {tokens_per_s:,.0f} tokens/s, MFU {100 * summary['mfu']:.1f}% "
              f"of {peak_flops / 1e9:.0f} GFLOP/s", file=sys.stderr)
    print(f"final: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}; "
          f"checkpoint {run.out_dir / MANIFEST}", file=sys.stderr)
    if plot_losses(log_path, run.out_dir / "loss.png"):
        print(f"loss curve: {run.out_dir / 'loss.png'}", file=sys.stderr)
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
        cfg["data"] = args.data
        cpu.tune()  # this process's malloc and threads (tinygrad_lite/cpu.py)
        with ops_tier(args.ops):
            train(cfg, args)
        return 0
    except Stopped as e:
        message, code = e.args
        if from_environment_rank() == 0:
            print(message, file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; continue with --resume", file=sys.stderr)
        return 130
    except Exception as e:
        return report(e, args.debug)


def from_environment_rank() -> int:
    """This process's MPI rank as mpiexec's environment says (0 without mpiexec)."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
