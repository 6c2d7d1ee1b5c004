"""Post-training, measured: base -> SFT -> DPO on a chat task, and what each stage changed.

    python lab/post_training.py            # ~10 minutes on 2 CPU cores
    python lab/post_training.py --quick    # seconds: tiny settings, for the tests

The three stages of the article, each run with train.py exactly as a user would:
1. the base model: pre-trained on tiny Shakespeare, char level (lab/common.py's base_model:
   train.py's CPU preset, reused when it already ran);
2. SFT (`--stage sft`): conversations of model/shout_task.py, "shout: good morrow" ->
   "GOOD MORROW!" or "GOOD MORROW." (at random), loss on the answers only;
3. DPO (`--stage dpo`): pairs on the same task, "!" chosen over ".", beta 0.1, the SFT
   model as the frozen reference; once at a gentle learning rate (1.5e-6, 500 steps), and
   once ten times harder (1e-5, 300 steps), to show what over-optimizing costs.
Then every model answers the same held-out prompts (word pairs no training example
had). Counted: task accuracy (greedy answer == the words in capitals), stop rate (it
wrote <|end|>), the share of sampled answers (temperature 1) that end in "!", and the
KL from the SFT model on the answers' positions. Writes lab/results/post_training.json
(the before/after table) and .png (the SFT loss, and DPO's reward margin and
preference accuracy over its steps).
"""
from __future__ import annotations

import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `python lab/post_training.py`
from lab.common import base_model, lab_parser, log, require_matplotlib, write_results  # noqa: E402
from tinygrad_lite import cpu, no_grad  # noqa: E402
import train  # noqa: E402
from model import dpo, shout_task  # noqa: E402
from model.chat import END, ChatTokenizer, render  # noqa: E402
from model.generate import generate  # noqa: E402
from model.pretrained import load_out_dir  # noqa: E402
from model.sft import padded_batch  # noqa: E402

FULL = dict(n_sft=3000, n_pairs=1000, sft_iters=1500, dpo_iters=500, dpo_lr=1.5e-6, hard_iters=300, hard_lr=1e-5,
            prompts=100, samples=2)
QUICK = dict(n_sft=40, n_pairs=20, sft_iters=6, dpo_iters=4, dpo_lr=1.5e-6, hard_iters=2, hard_lr=1e-5,
             prompts=6, samples=1)
MAX_ANSWER = 24  # tokens: the longest shout is 17 characters and <|end|>


def run_stage(stage: str, data: Path, init_from: Path, out_dir: Path, iters: int, extra: list[str]) -> dict:
    """train.py --stage ... from scratch into out_dir; returns its log rows."""
    shutil.rmtree(out_dir, ignore_errors=True)
    argv = ["--stage", stage, "--data", str(data), "--init-from", str(init_from), "--out-dir", str(out_dir),
            "--max-iters", str(iters), "--no-progress", *extra]
    log(f"python train.py {' '.join(argv)}")
    start = time.perf_counter()
    if train.main(argv) != 0:
        sys.exit(f"error: the {stage} run failed")
    rows = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return {"seconds": time.perf_counter() - start, "rows": rows}


def chat_model(out_dir: str | Path):
    """(model, chat tokenizer) of an out dir; a base model gets the chat tokens it lacks
    (the same explicit resize SFT starts with), so every model answers the same prompts."""
    model = load_out_dir(Path(out_dir))
    chat = model.tokenizer if isinstance(model.tokenizer, ChatTokenizer) else ChatTokenizer(model.tokenizer)
    if chat.vocab_size > model.config.vocab_size:
        model.resize_token_embeddings(chat.vocab_size)
    return model.eval(), chat


def answers(model, chat: ChatTokenizer, prompts: list[str], temperature: float, seed: int) -> list[tuple[str, bool]]:
    """(answer text, stopped with <|end|>?) for each prompt."""
    rows = [render(chat, [{"role": "user", "content": p}], add_generation_prompt=True)[0] for p in prompts]
    out = generate(model, rows, MAX_ANSWER, temperature=temperature, seed=seed)
    end = chat.special(END)
    return [(chat.decode(ids[:ids.index(end)] if end in ids else ids), end in ids) for ids in out]


def kl_from(model, reference, chat: ChatTokenizer, prompts: list[tuple[str, list[str]]]) -> float:
    """Mean KL(model || reference) of the next-token distributions over the answer positions
    of the held-out prompts (answered correctly, half "!", half ".")."""
    rows = []
    for i, (prompt, words) in enumerate(prompts):
        answer = shout_task.shout(words, shout_task.PREFERRED if i % 2 else shout_task.OTHER)
        rows.append(render(chat, [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]))
    x, y = padded_batch(rows, range(len(rows)), model.config.block_size, chat.special(END))
    with no_grad():
        return dpo.kl_to_reference(model(x)[0], reference(x)[0], y)


def evaluate(model, chat: ChatTokenizer, sft_model, prompts: list, samples: int) -> dict:
    texts = [p for p, _ in prompts]
    greedy = answers(model, chat, texts, 0.0, 0)
    scored = [shout_task.score(a, stopped, words) for (a, stopped), (_, words) in zip(greedy, prompts)]
    sampled = [shout_task.score(a, stopped, words)
               for s in range(samples)
               for (a, stopped), (_, words) in zip(answers(model, chat, texts, 1.0, 100 + s), prompts)]
    return {"task_accuracy": float(np.mean([s["correct"] for s in scored])),
            "stop_rate": float(np.mean([s["stopped"] for s in scored])),
            "preferred_rate": float(np.mean([s["preferred"] for s in sampled])),
            "kl_to_sft": kl_from(model, sft_model, chat, prompts),
            "examples": [{"prompt": p, "answer": a, "stopped": st} for (p, _), (a, st) in list(zip(prompts, greedy))[:5]]}


def plot(sft_log: list, dpo_log: list):
    plt = require_matplotlib()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r for r in sft_log if r["kind"] == "train"]
    evals = [r for r in sft_log if r["kind"] == "eval"]
    left.plot([r["iter"] for r in steps], [r["loss"] for r in steps], alpha=0.4, label="train (batch)")
    left.plot([r["iter"] for r in evals], [r["val"] for r in evals], "o-", label="val (held-out chats)")
    left.set(title="SFT: loss on the answer tokens", xlabel="iteration", ylabel="cross-entropy")
    left.legend()
    steps = [r for r in dpo_log if r["kind"] == "train"]
    right.plot([r["iter"] for r in steps], [r["reward_margin"] for r in steps], alpha=0.6, label="reward margin")
    right.set(title="DPO", xlabel="iteration", ylabel="chosen - rejected reward")
    twin = right.twinx()
    twin.plot([r["iter"] for r in steps], [r["reward_accuracy"] for r in steps], color="tab:green", alpha=0.6,
              label="preference accuracy")
    twin.set(ylabel="share of pairs with chosen > rejected", ylim=(0, 1.05))
    right.legend(loc="upper left")
    twin.legend(loc="lower right")
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    args = lab_parser(__doc__).parse_args(argv)
    cpu.tune()  # malloc and threads, as train.py does (tinygrad_lite/cpu.py)
    settings = QUICK if args.quick else FULL
    out = Path(args.out) / ("post-training-quick" if args.quick else "post-training")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _, _, base = base_model(Path(args.out), quick=args.quick)
    conversations = shout_task.write_jsonl(out / "conversations.jsonl",
                                           shout_task.sft_conversations(settings["n_sft"], args.seed))
    pairs = shout_task.write_jsonl(out / "preferences.jsonl", shout_task.preference_pairs(settings["n_pairs"], args.seed))
    common = ["--eval-iters", "4", "--seed", str(args.seed), "--shards", "1"]
    sft_run = run_stage("sft", conversations, Path(base["dir"]), out / "sft", settings["sft_iters"],
                        [*common, "--lr", "1e-3", "--min-lr", "1e-4", "--warmup-iters", "50",
                         "--lr-decay-iters", str(settings["sft_iters"]), "--eval-interval", "250"])
    dpo_runs = {}
    for name, iters, lr in (("dpo", settings["dpo_iters"], settings["dpo_lr"]),
                            ("dpo-hard", settings["hard_iters"], settings["hard_lr"])):
        dpo_runs[name] = run_stage("dpo", pairs, out / "sft", out / name, iters,
                                   [*common, "--beta", "0.1", "--lr", str(lr), "--min-lr", str(lr), "--warmup-iters",
                                    "0", "--eval-interval", "50", "--batch-size", "8"])
    dpo_run = dpo_runs["dpo"]
    prompts = shout_task.held_out_prompts(settings["prompts"], args.seed)
    sft_model, _ = chat_model(out / "sft")
    table = {}
    for name, where in (("base", base["dir"]), ("sft", out / "sft"), ("dpo", out / "dpo"),
                        ("dpo-hard", out / "dpo-hard")):
        model, chat = chat_model(where)
        table[name] = evaluate(model, chat, sft_model, prompts, settings["samples"])
        log(f"{name:>4}: " + ", ".join(f"{k} {v:.3f}" for k, v in table[name].items() if k != "examples"))
    results = {"table": {k: {m: v for m, v in row.items() if m != "examples"} for k, row in table.items()},
               "examples": {k: row["examples"] for k, row in table.items()},
               "settings": settings, "base": base, "held_out_prompts": len(prompts),
               "sft_seconds": sft_run["seconds"], "dpo_seconds": dpo_run["seconds"],
               "dpo_hard_seconds": dpo_runs["dpo-hard"]["seconds"],
               "wall_s": time.perf_counter() - start, "quick": args.quick,
               "dpo_final_eval": [r for r in dpo_run["rows"] if r["kind"] == "eval"][-1]}
    write_results(Path(args.out), "post_training", results, plot(sft_run["rows"], dpo_run["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
