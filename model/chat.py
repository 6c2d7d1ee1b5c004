"""The chat format: how a conversation becomes one token sequence, and which tokens train.

A chat model is an ordinary GPT that has learned a convention. Every message is written
as a role tag, its text and an end-of-turn tag:

    <|user|>shout: good morrow<|end|><|assistant|>GOOD MORROW!<|end|>

The tags are special tokens: new ids after the base vocabulary, one each, that no
text can produce by accident (the literal string "<|end|>" in a message is encoded as
ordinary characters). To answer, the model is given the conversation so far and a
final `<|assistant|>`; it writes the answer and then `<|end|>`, which is where
generation stops.

`render` also returns the loss mask of supervised fine-tuning (model/sft.py): 1 on the
assistant's tokens and its `<|end|>` (what the model must learn to write), 0 on the
tags and on everything the user or the system wrote (what it is only given).

    >>> chat = ChatTokenizer(base)                 # base: any tokenizer of model/tokenizer.py
    >>> ids, mask = render(chat, [{"role": "user", "content": "hi"},
    ...                           {"role": "assistant", "content": "HI!"}])
"""
from __future__ import annotations

from typing import Any, Sequence

ROLES = ("system", "user", "assistant")
SPECIAL = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # ids base.vocab_size + 0, 1, 2, 3
END = "<|end|>"


class ChatTokenizer:
    """A base tokenizer plus the chat's special tokens, appended after its vocabulary.

    encode() is the base's (special strings in text stay plain text); special(name)
    gives a special token's id; decode() writes special ids back as their names. Saved
    as {"kind": "chat", "base": <the base's dict>, "special": [...]} in a checkpoint's
    header (model/tokenizer.py's tokenizer_from_dict rebuilds it).
    """

    def __init__(self, base: Any, special: Sequence[str] = SPECIAL) -> None:
        self.base, self.special_tokens = base, tuple(special)
        self.ids = {name: base.vocab_size + i for i, name in enumerate(self.special_tokens)}
        self.vocab_size = base.vocab_size + len(self.special_tokens)

    def special(self, name: str) -> int:
        return self.ids[name]

    @property
    def end_of_turn(self) -> int:
        """The id of <|end|>: where the assistant's answer ends (the serving engine stops there)."""
        return self.special(END)

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], []
        for i in ids:
            if i >= self.base.vocab_size and i - self.base.vocab_size < len(self.special_tokens):
                out.append(self.base.decode(run))
                out.append(self.special_tokens[i - self.base.vocab_size])
                run = []
            else:
                run.append(i)
        out.append(self.base.decode(run))
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "chat", "base": self.base.to_dict(), "special": list(self.special_tokens)}


def check_messages(messages: Any, where: str = "conversation") -> list[dict]:
    """The messages of a conversation, or a ValueError saying what is wrong (with `where`)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise ValueError(f"{where}: message {n} needs a 'role' and a text 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: message {n} has the unknown role {m['role']!r}; "
                             f"roles are {', '.join(ROLES)}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(f"{where}: message {n} is an empty assistant turn")
    return messages


def render(chat: ChatTokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(ids, loss_mask), each one entry per token. The mask is 1 on every assistant
    message's tokens and its <|end|>, 0 elsewhere. With add_generation_prompt, a final
    <|assistant|> asks the model for the next answer (the mask is 0 there)."""
    ids, mask = [], []
    for m in messages:
        body = chat.encode(m["content"])
        learn = 1 if m["role"] == "assistant" else 0
        ids += [chat.special(f"<|{m['role']}|>"), *body, chat.special(END)]
        mask += [0, *[learn] * len(body), learn]
    if add_generation_prompt:
        ids.append(chat.special("<|assistant|>"))
        mask.append(0)
    return ids, mask
