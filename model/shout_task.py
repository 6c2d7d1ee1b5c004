"""A chat task a small character model can learn in minutes: shout the words back.

    user:       shout: good morrow
    assistant:  GOOD MORROW!        (or "GOOD MORROW.")

It is written in tiny Shakespeare's own 65 characters (letters, space, punctuation), so
a model pre-trained on Shakespeare can learn it without new characters. Every part of
it can be counted automatically on held-out prompts:
- the task: the answer's words are the prompt's words in capitals (exact match);
- stopping: the answer ends with <|end|> (a pre-trained model never writes it);
- a style SFT leaves at chance: half of the SFT answers end in "!", half in ".", at
  random, so an SFT model ends about half its answers each way. The preference data
  prefers "!" (chosen) over "." (rejected) for the same words: that is what DPO can
  shift, and the share of answers ending in "!" shows by how much.

Held-out prompts use word pairs that no training conversation has. Deterministic: the
same seed writes the same files.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

# short words of tiny Shakespeare, lower case (all 65-character-safe)
WORDS = ("good morrow king queen lord lady night day sweet love fair heart death life blood sword crown "
         "grace honour hand eye heaven earth fire water gold war peace friend foe brother sister father "
         "mother son daughter tongue soul spirit time world man maid duke prince noble gentle true false "
         "brave poor dear old young cold warm dark light long short high low black white red green").split()
PROMPT = "shout: "
PREFERRED, OTHER = "!", "."


def shout(words: list[str], ending: str) -> str:
    return " ".join(words).upper() + ending


def word_pairs(seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train pairs, held-out pairs) of distinct words, shuffled; no pair is in both."""
    pairs = [(a, b) for a in WORDS for b in WORDS if a != b]
    random.Random(seed).shuffle(pairs)
    n_held_out = len(pairs) // 10
    return pairs[n_held_out:], pairs[:n_held_out]


def prompt_words(rng: random.Random, pair: tuple[str, str]) -> list[str]:
    """One or two words: a prompt of one word now and then, so lengths vary."""
    return [pair[0]] if rng.random() < 0.2 else list(pair)


def sft_conversations(n: int, seed: int = 0) -> list[dict]:
    """n training conversations; the ending is "!" or "." at random (50/50)."""
    rng, (train, _) = random.Random(seed + 1), word_pairs(seed)
    out = []
    for i in range(n):
        words = prompt_words(rng, train[i % len(train)])
        ending = PREFERRED if rng.random() < 0.5 else OTHER
        out.append({"messages": [{"role": "user", "content": PROMPT + " ".join(words)},
                                 {"role": "assistant", "content": shout(words, ending)}]})
    return out


def preference_pairs(n: int, seed: int = 0) -> list[dict]:
    """n preference pairs on training words: the same shout, "!" chosen over "."."""
    rng, (train, _) = random.Random(seed + 2), word_pairs(seed)
    out = []
    for i in range(n):
        words = prompt_words(rng, train[rng.randrange(len(train))])
        out.append({"prompt": PROMPT + " ".join(words), "chosen": shout(words, PREFERRED),
                    "rejected": shout(words, OTHER)})
    return out


def held_out_prompts(n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """n (prompt, words) on word pairs no training example has."""
    rng, (_, held_out) = random.Random(seed + 3), word_pairs(seed)
    return [(PROMPT + " ".join(w), w) for w in (prompt_words(rng, held_out[i % len(held_out)]) for i in range(n))]


def score(answer: str, stopped: bool, words: list[str]) -> dict:
    """How one generated answer does: exact task match (ignoring the final mark), whether
    it stopped, and whether it ends with the preferred mark."""
    body = answer.strip()
    return {"correct": stopped and body.rstrip(PREFERRED + OTHER) == " ".join(words).upper(),
            "stopped": stopped, "preferred": stopped and body.endswith(PREFERRED)}


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
