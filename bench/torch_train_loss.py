"""The PyTorch reference run for the loss target: nanoGPT's model and CPU config, trained
on exactly the batches train.py would draw, so the two val losses can be compared.

    python bench/torch_train_loss.py [--seed 1337] [--gelu exact|tanh] [--same-init] [--batches nanogpt]

--gelu exact is nanoGPT's nn.GELU(); tanh is GPT-2's approximation, which tinygrad_lite
uses. --same-init starts from tinygrad_lite's initial weights for that seed (otherwise
PyTorch draws its own). --batches nanogpt draws every batch as nanoGPT's train.py does
instead: torch.randint from the one global torch generator (seeded before the model is
made), train batches fetched one step ahead, eval batches from the same stream. Prints
the eval losses every 250 iterations and a JSON line.
"""
from __future__ import annotations

import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.torch_gpt import TorchGPT, TorchGPTConfig, load_numpy_state_dict, make_adamw  # noqa: E402
from model.data import encode_dataset, get_batch, load_text, shakespeare_path  # noqa: E402
from model.tokenizer import make_tokenizer  # noqa: E402
from tinygrad_lite.optim import cosine_lr  # noqa: E402
from train import PRESETS  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--gelu", choices=["exact", "tanh"], default="exact")
    p.add_argument("--same-init", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", choices=["ours", "nanogpt"], default="ours",
                   help="train.py's batches (numpy, seeded) or nanoGPT's (torch's global generator)")
    args = p.parse_args()
    cfg = PRESETS["shakespeare-char-cpu"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    text = load_text(shakespeare_path())
    tok = make_tokenizer("char", text)
    train_ids, val_ids = encode_dataset(text, tok, ROOT / "out-bench-torch" / "data")
    model = TorchGPT(TorchGPTConfig(vocab_size=tok.vocab_size, block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                                    n_head=cfg["n_head"], n_embd=cfg["n_embd"]))
    if args.gelu == "exact":
        for block in model.h:
            block.mlp.approximate = "none"
    if args.same_init:
        from model.gpt import GPT, GPTConfig
        from tinygrad_lite import manual_seed
        manual_seed(args.seed)
        ours = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                             n_head=cfg["n_head"], n_embd=cfg["n_embd"]))
        load_numpy_state_dict(model, ours.state_dict())
    opt = make_adamw(model, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), weight_decay=cfg["weight_decay"])
    rng = np.random.default_rng(args.seed)  # train.py's batch generator

    def nanogpt_batch(data):  # nanoGPT's get_batch: offsets from torch's global generator
        ix = torch.randint(len(data) - cfg["block_size"], (cfg["batch_size"],))
        x = torch.stack([torch.from_numpy(data[i:i + cfg["block_size"]].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + cfg["block_size"]].astype(np.int64)) for i in ix])
        return x, y

    def evaluate(it: int) -> dict:
        model.eval()
        out = {}
        with torch.no_grad():
            for name, data in (("train", train_ids), ("val", val_ids)):
                erng = np.random.default_rng([args.seed, it, len(name)])  # train.py's eval RNG
                batch = ((lambda: nanogpt_batch(data)) if args.batches == "nanogpt" else
                         (lambda: tuple(map(torch.from_numpy, get_batch(data, cfg["batch_size"], cfg["block_size"], erng)))))
                losses = [model(*batch())[1].item() for _ in range(cfg["eval_iters"])]
                out[name] = float(np.mean(losses))
        model.train()
        return out

    ahead = nanogpt_batch(train_ids) if args.batches == "nanogpt" else None  # nanoGPT fetches one step ahead

    start = time.perf_counter()
    for it in range(cfg["max_iters"] + 1):
        if it % cfg["eval_interval"] == 0 or it == cfg["max_iters"]:
            losses = evaluate(it)
            print(f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
        if it == cfg["max_iters"]:
            break
        for group in opt.param_groups:
            group["lr"] = cosine_lr(it, cfg["lr"], cfg["min_lr"], cfg["warmup_iters"], cfg["lr_decay_iters"])
        if args.batches == "nanogpt":
            x, y = ahead
            _, loss = model(x, y)
            ahead = nanogpt_batch(train_ids)  # as nanoGPT: drawn after the forward
        else:
            x, y = map(torch.from_numpy, get_batch(train_ids, cfg["batch_size"], cfg["block_size"], rng))
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(json.dumps({"framework": "pytorch", "seed": args.seed, "gelu": args.gelu, "same_init": args.same_init,
                      "batches": args.batches,
                      "val_loss": round(losses["val"], 4), "train_loss": round(losses["train"], 4),
                      "wall_s": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
