"""Supervised fine-tuning (SFT): teach a pre-trained model to answer, on example chats.

Pre-training taught the model to continue text. SFT shows it conversations in the chat
format (model/chat.py) and trains it with the same next-token loss, but counted only on
the tokens the assistant wrote: the model learns to produce answers (and to end them
with <|end|>), not to predict what users say.

The data is JSONL, one conversation per line, in the common shape:

    {"messages": [{"role": "system", "content": "..."},       # optional
                  {"role": "user", "content": "shout: good morrow"},
                  {"role": "assistant", "content": "GOOD MORROW!"}]}

Each conversation becomes one row of block_size + 1 tokens, padded at the end (padded,
not packed: this model has no attention mask, so two conversations packed into one
row would see each other). A conversation longer than that is refused, never cut: a
cut could drop the end of an answer, or all of it. The targets of the prompt and the
padding are IGNORE, which cross_entropy skips: their gradient is exactly zero.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .chat import ChatTokenizer, check_messages, render

IGNORE = -1  # the target id cross_entropy skips (GPT.forward's ignore_index)
VAL_FRACTION = 0.1  # the last 10% of the conversations (at least one) are held out


class ChatDataError(ValueError):
    """A JSONL file of conversations or preferences that cannot be used; one line, naming
    the file and the line."""


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ChatDataError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChatDataError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise ChatDataError(f"{path}:{n}: each line must be a JSON object")
        out.append((n, record))
    if not out:
        raise ChatDataError(f"{path} holds no examples")
    return out


def encode_conversations(path: str | Path, chat: ChatTokenizer, block_size: int) -> list[tuple[list[int], list[int]]]:
    """Every conversation of a JSONL file as (ids, loss mask); ChatDataError names the line
    of the first one that is malformed, has no answer to learn, or does not fit."""
    rows = []
    for n, record in read_jsonl(path):
        where = f"{path}:{n}"
        if "messages" not in record:
            raise ChatDataError(f"{where}: missing 'messages'")
        try:
            messages = check_messages(record["messages"], where)
            ids, mask = render(chat, messages)
        except ValueError as e:  # also characters outside a char tokenizer's vocabulary
            raise ChatDataError(" ".join(str(e).split()) if str(e).startswith(where) else f"{where}: {e}") from None
        if not any(mask):
            raise ChatDataError(f"{where}: the conversation has no assistant message to learn from")
        if len(ids) > block_size + 1:
            raise ChatDataError(f"{where}: the conversation is {len(ids)} tokens, longer than block_size "
                                f"{block_size} + 1: no room for the whole answer (shorten it, or use a "
                                f"model with a longer block_size)")
        rows.append((ids, mask))
    return rows


def split(rows: list) -> tuple[list, list]:
    """(train, val): the last VAL_FRACTION of the examples, at least one, are held out."""
    n_val = max(1, int(round(len(rows) * VAL_FRACTION)))
    if len(rows) < 2:
        raise ChatDataError("need at least 2 examples: one to train on and one held out")
    return rows[:-n_val], rows[-n_val:]


def padded_batch(rows: list, indices, block_size: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """x (B, T) token ids and y (B, T) targets for the conversations at `indices`; y is
    IGNORE wherever the next token is not the assistant's (prompt, padding)."""
    B = len(indices)
    x = np.full((B, block_size), pad_id, dtype=np.int64)
    y = np.full((B, block_size), IGNORE, dtype=np.int64)
    for b, i in enumerate(indices):
        ids, mask = rows[i]
        n = len(ids) - 1  # positions that predict a next token
        x[b, :n] = ids[:-1]
        y[b, :n] = np.where(np.asarray(mask[1:]) == 1, ids[1:], IGNORE)  # learn only the assistant's tokens
    return x, y


def get_chat_batch(rows: list, batch_size: int, block_size: int, pad_id: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """batch_size conversations drawn at random (with replacement), padded: x, y (B, T)."""
    return padded_batch(rows, rng.integers(0, len(rows), size=batch_size), block_size, pad_id)
