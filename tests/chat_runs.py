"""Tiny runs for the post-training tests: a base model pre-trained (a few steps) on text
holding every character of the shout task, and the task's JSONL files."""
from __future__ import annotations

from pathlib import Path

import train
from model import shout_task

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "48", "--batch-size", "4",
        "--eval-iters", "1", "--eval-interval", "4", "--no-progress", "--warmup-iters", "1", "--lr-decay-iters", "8",
        "--shards", "1"]


def make_base(folder: Path) -> dict[str, Path]:
    """{'base': out dir, 'chats': conversations.jsonl, 'prefs': preferences.jsonl, 'text': the base's text}."""
    folder.mkdir(parents=True, exist_ok=True)
    chats = shout_task.write_jsonl(folder / "chats.jsonl", shout_task.sft_conversations(30))
    prefs = shout_task.write_jsonl(folder / "prefs.jsonl", shout_task.preference_pairs(20))
    words = " ".join(shout_task.WORDS)
    text = folder / "text.txt"
    text.write_text((f"shout: {words}\n{words.upper()}! {words.upper()}.\n") * 30, encoding="utf-8")
    base = folder / "base"
    assert train.main(["--data", str(text), "--out-dir", str(base), "--max-iters", "4", *TINY]) == 0
    return {"base": base, "chats": chats, "prefs": prefs, "text": text}
