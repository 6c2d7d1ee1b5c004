"""Supervised fine-tuning (model/sft.py, train.py --stage sft): the loss counts only the
answers, rows are padded and never cut, bad files get one line naming the file and line,
and a run resumes exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest

import tinygrad_lite.functional as F
import train
from model.chat import ChatTokenizer, render
from model.checkpoint import load_checkpoint
from same_run import assert_same_checkpoint
from model.sft import IGNORE, ChatDataError, encode_conversations, padded_batch
from model.tokenizer import make_tokenizer
from tinygrad_lite import Tensor

from chat_runs import TINY, make_base


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("sft"))


def chat() -> ChatTokenizer:
    return ChatTokenizer(make_tokenizer("char", "shout: good morrow GOOD MORROW!. abcdefghijklmnopqrstuvwxyz"))


def test_the_loss_gradient_is_exactly_zero_at_every_masked_out_position():
    c = chat()
    rows = [render(c, [{"role": "user", "content": "shout: good"}, {"role": "assistant", "content": "GOOD!"}]),
            render(c, [{"role": "system", "content": "be loud"}, {"role": "user", "content": "shout: morrow"},
                       {"role": "assistant", "content": "MORROW."}])]
    x, y = padded_batch(rows, [0, 1], 40, c.special("<|end|>"))
    logits = Tensor(np.random.default_rng(0).standard_normal((2, 40, c.vocab_size)), requires_grad=True)
    F.cross_entropy(logits, y, ignore_index=IGNORE).backward()
    grad = logits.grad
    masked = y == IGNORE
    assert masked.any() and (~masked).any()
    assert (grad[masked] == 0).all()  # exactly zero: the prompt, the tags, the padding
    assert (np.abs(grad[~masked]).sum(axis=-1) > 0).all()
    # the targets that count are the answers and their <|end|>, nothing else
    learned = [c.decode(row[row != IGNORE].tolist()) for row in y]
    assert learned == ["GOOD!<|end|>", "MORROW.<|end|>"]


def test_a_conversation_that_does_not_fit_is_refused_never_cut(tmp_path):
    path = tmp_path / "chats.jsonl"
    long = {"messages": [{"role": "user", "content": "shout: " + "good " * 8},
                         {"role": "assistant", "content": "GOOD " * 8}]}
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "shout: good"},
                                             {"role": "assistant", "content": "GOOD!"}]}) + "\n" + json.dumps(long) + "\n")
    with pytest.raises(ChatDataError, match=r"chats.jsonl:2: the conversation is \d+ tokens, longer than block_size 32"):
        encode_conversations(path, chat(), 32)
    assert len(encode_conversations(path, chat(), 128)) == 2


BAD_CHATS = {
    "malformed JSON": ('{"messages": [', "malformed JSON"),
    "missing messages": ('{"turns": []}', "missing 'messages'"),
    "unknown role": ('{"messages": [{"role": "narrator", "content": "hi"}]}', "unknown role 'narrator'"),
    "empty answer": ('{"messages": [{"role": "user", "content": "shout: good"}, {"role": "assistant", "content": ""}]}',
                     "empty assistant turn"),
    "no answer": ('{"messages": [{"role": "user", "content": "shout: good"}]}', "no assistant message to learn from"),
    "too long": ('{"messages": [{"role": "user", "content": "shout: ' + "good " * 20 + '"}, '
                 '{"role": "assistant", "content": "GOOD"}]}', "longer than block_size 48 + 1: no room for the whole answer"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CHATS))
def test_bad_conversations_get_one_line_naming_the_file_and_line(kind, runs, tmp_path, capsys):
    line, words = BAD_CHATS[kind]
    good = runs["chats"].read_text().splitlines()[0]
    data = tmp_path / "chats.jsonl"
    data.write_text(good + "\n\n" + line + "\n")  # the bad one is on line 3
    out = tmp_path / "out"
    code = train.main(["--stage", "sft", "--data", str(data), "--init-from", str(runs["base"]), "--out-dir", str(out),
                       "--max-iters", "2", *TINY])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert code == 2 and len(err) == 1, err
    assert f"{data}:3:" in err[0] and words in err[0], err[0]
    assert not out.exists()  # nothing written


def test_sft_needs_a_model_to_start_from(runs, tmp_path, capsys):
    code = train.main(["--stage", "sft", "--data", str(runs["chats"]), "--out-dir", str(tmp_path / "o"), *TINY])
    assert code == 2 and "--stage sft starts from a trained model: pass --init-from" in capsys.readouterr().err


def test_sft_trains_the_answers_and_carries_the_chat_tokenizer(runs, tmp_path):
    out = tmp_path / "sft"
    assert train.main(["--stage", "sft", "--data", str(runs["chats"]), "--init-from", str(runs["base"]),
                       "--out-dir", str(out), "--max-iters", "4", *TINY]) == 0
    state, meta, _ = load_checkpoint(out)
    base_state, base_meta, _ = load_checkpoint(runs["base"])
    assert meta["tokenizer"]["kind"] == "chat" and meta["tokenizer"]["base"] == base_meta["tokenizer"]
    assert state["wte.weight"].shape[0] == base_state["wte.weight"].shape[0] + 4  # the four chat tokens
    assert meta["config"]["stage"] == "sft" and meta["losses"]["val"] > 0


def test_sft_resumes_exactly(runs, tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    flags = ["--stage", "sft", "--data", str(runs["chats"]), "--init-from", str(runs["base"]), *TINY]
    assert train.main([*flags, "--out-dir", str(straight), "--max-iters", "8"]) == 0
    assert train.main([*flags, "--out-dir", str(halves), "--max-iters", "4"]) == 0
    assert train.main(["--resume", "--out-dir", str(halves), "--max-iters", "8", *TINY]) == 0  # stage, data: from the checkpoint
    _, meta_b = assert_same_checkpoint(straight, halves, 8)
    assert meta_b["config"]["stage"] == "sft"


def test_sft_refuses_shards(runs, tmp_path, capsys):
    code = train.main(["--stage", "sft", "--data", str(runs["chats"]), "--init-from", str(runs["base"]),
                       "--out-dir", str(tmp_path / "o"), *TINY, "--shards", "2"])
    assert code == 2 and "--stage sft runs in one process; drop --shards 2" in capsys.readouterr().err
