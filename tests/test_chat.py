"""The chat template (model/chat.py): special tokens after any tokenizer's vocabulary,
render -> (ids, loss mask), the round trip, and the explicit embedding resize."""
from __future__ import annotations

import numpy as np
import pytest

from model.chat import ChatTokenizer, check_messages, render
from model.gpt import GPT, GPTConfig
from model.tokenizer import make_tokenizer, tokenizer_from_dict
from tinygrad_lite import manual_seed

from hf_files import write_gpt2_tokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nSHOUT: GOOD MORROW!\n"
CHAT = [{"role": "system", "content": "be loud"}, {"role": "user", "content": "shout: good"},
        {"role": "assistant", "content": "GOOD!"}, {"role": "user", "content": "more"},
        {"role": "assistant", "content": "MORE."}]


@pytest.fixture(params=["char", "cl100k_base", "gpt2-files"])
def base(request, tmp_path):
    if request.param == "gpt2-files":
        from model.tokenizer import GPT2BPETokenizer
        write_gpt2_tokenizer(tmp_path)
        return GPT2BPETokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    return make_tokenizer(request.param, TEXT + "bylmhgE.<|>")


def test_special_tokens_come_after_the_base_vocabulary(base):
    chat = ChatTokenizer(base)
    assert chat.vocab_size == base.vocab_size + 4
    assert [chat.special(n) for n in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")] == \
        list(range(base.vocab_size, base.vocab_size + 4))
    assert max(chat.encode("<|end|>")) < base.vocab_size  # the literal string stays plain text


def test_render_marks_only_the_assistants_tokens_and_round_trips(base):
    chat = ChatTokenizer(base)
    ids, mask = render(chat, CHAT)
    assert len(ids) == len(mask)
    assert chat.decode(ids) == ("<|system|>be loud<|end|><|user|>shout: good<|end|><|assistant|>GOOD!<|end|>"
                                "<|user|>more<|end|><|assistant|>MORE.<|end|>")
    learned = chat.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "GOOD!<|end|>MORE.<|end|>"  # the answers and their end tags, nothing else
    prompt, prompt_mask = render(chat, CHAT[:2], add_generation_prompt=True)
    assert chat.decode(prompt).endswith("<|user|>shout: good<|end|><|assistant|>") and not any(prompt_mask)


def test_the_chat_tokenizer_is_saved_in_the_header_and_rebuilt(base):
    chat = ChatTokenizer(base)
    again = tokenizer_from_dict(chat.to_dict())
    assert chat.to_dict()["kind"] == "chat" and again.to_dict() == chat.to_dict()
    assert render(again, CHAT) == render(chat, CHAT)


@pytest.mark.parametrize("messages,words", [
    ([], "non-empty list"),
    ([{"role": "user"}], "needs a 'role' and a text 'content'"),
    ([{"role": "narrator", "content": "x"}], "unknown role 'narrator'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "empty assistant turn"),
])
def test_bad_messages_are_named(messages, words):
    with pytest.raises(ValueError, match=words):
        check_messages(messages, "chats.jsonl:3")


def test_resizing_the_embedding_keeps_the_old_rows_bitwise():
    manual_seed(0)
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8))
    old = model.wte.weight.numpy()
    model.resize_token_embeddings(14)
    new = model.wte.weight.numpy()
    assert new.shape == (14, 8) and model.config.vocab_size == 14
    np.testing.assert_array_equal(new[:10], old)  # bitwise
    np.testing.assert_allclose(new[10:], np.broadcast_to(old.mean(axis=0), (4, 8)), rtol=1e-6)
    logits, _ = model(np.array([[1, 2, 13]]))  # the new ids are usable, in and out (tied head)
    assert logits.shape == (1, 3, 14)
    with pytest.raises(ValueError, match="only grows"):
        model.resize_token_embeddings(12)


def test_loading_a_grown_embedding_is_refused_without_the_resize():
    """load_state_dict stays strict: the resize is an explicit step, not a relaxed check."""
    small = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8))
    big = GPT(GPTConfig(vocab_size=14, block_size=8, n_layer=1, n_head=2, n_embd=8))
    with pytest.raises(ValueError, match=r"wte.weight has shape \(10, 8\) in the state dict but \(14, 8\)"):
        big.load_state_dict(small.state_dict())
    small.resize_token_embeddings(14)
    big.load_state_dict(small.state_dict())
