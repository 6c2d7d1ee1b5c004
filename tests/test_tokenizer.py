"""Tests for model/tokenizer.py: round trips, the cl100k seed example, the <unk> policy,
checkpoint (to_dict) round trips and the error messages. All offline."""
import doctest
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import model.tokenizer as tokenizer_module
from model.tokenizer import (CharTokenizer, CompactTiktokenTokenizer, TiktokenTokenizer,
                             TokenizerUnavailableError, count_tokens, load_encoding,
                             make_tokenizer, tokenizer_from_dict)

SEED_TEXT = "Hello, how are you today?"
SEED_IDS = [9906, 11, 1268, 527, 499, 3432, 30]
SMALL_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"

# tiktoken caches the encoding, so building these per test costs ~nothing after the first
texts = st.text(max_size=200)


# ------------------------------------------------------------------------------- char


@given(texts)
def test_char_round_trip(text):
    tok = CharTokenizer(text)
    ids = tok.encode(text)
    assert len(ids) == len(text)  # one id per character
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_char_vocab_is_sorted_distinct_characters():
    tok = CharTokenizer("hello world")
    assert tok.chars == " dehlorw"
    assert tok.vocab_size == 8
    assert tok.encode("hello") == [3, 2, 4, 4, 5]


def test_char_unknown_character_is_named():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match=r"'z'.*outside the char vocabulary") as e:
        tok.encode("abzz")
    assert "\n" not in str(e.value)


def test_char_decode_rejects_out_of_range_id():
    with pytest.raises(ValueError, match=r"token id 3 is outside the vocabulary \(0\.\.2\)"):
        CharTokenizer("abc").decode([0, 3])


# -------------------------------------------------------------------------- full BPE


def test_cl100k_seed_example():
    tok = make_tokenizer("cl100k_base", "")
    assert isinstance(tok, TiktokenTokenizer)
    assert tok.encode(SEED_TEXT) == SEED_IDS
    assert tok.decode(SEED_IDS) == SEED_TEXT
    assert tok.vocab_size == 100277


@given(texts)
def test_cl100k_round_trip(text):
    tok = TiktokenTokenizer("cl100k_base")
    assert tok.decode(tok.encode(text)) == text


def test_special_token_text_is_plain_text():
    tok = TiktokenTokenizer("cl100k_base")
    ids = tok.encode("a<|endoftext|>b")
    assert 100257 not in ids  # never the special token id
    assert tok.decode(ids) == "a<|endoftext|>b"


def test_decode_of_a_hole_in_the_numbering_gives_replacement_char():
    # 100256 is within n_vocab but is no token; a sampling model may still produce it
    assert TiktokenTokenizer("cl100k_base").decode([9906, 100256]) == "Hello\ufffd"


def test_count_tokens():
    assert count_tokens(SEED_TEXT) == 7
    assert count_tokens("") == 0


# ------------------------------------------------------------------------ compact BPE


@given(st.text(min_size=1, max_size=200))
def test_compact_round_trip_on_its_training_text(text):
    tok = CompactTiktokenTokenizer("cl100k_base", text)
    ids = tok.encode(text)
    assert max(ids) < tok.unk_id  # every token of the training text was seen
    assert tok.decode(ids) == text
    assert tok.kept_ids.tolist() == sorted(set(load_encoding("cl100k_base").encode_ordinary(text)))


def test_compact_ids_are_ranks_of_the_original_ids():
    tok = make_tokenizer("cl100k_base-compact", SEED_TEXT)
    # sorted originals: 11, 30, 499, 527, 1268, 3432, 9906 -> 0..6, then <unk> = 7
    assert tok.encode(SEED_TEXT) == [6, 0, 4, 3, 2, 5, 1]
    assert tok.vocab_size == 8 and tok.unk_id == 7


def test_compact_unseen_token_becomes_unk():
    tok = CompactTiktokenTokenizer("cl100k_base", "to be or not to be")
    ids = tok.encode("to be or not to see")  # " see" never occurred in training
    assert ids[-1] == tok.unk_id == tok.vocab_size - 1
    assert tok.unk_id not in ids[:-1]
    assert tok.decode(ids) == "to be or not to\ufffd"


def test_compact_is_fast_enough_for_a_megabyte():
    text = SMALL_TEXT * (1_000_000 // len(SMALL_TEXT))
    tok = CompactTiktokenTokenizer("cl100k_base", text)
    ids = tok.encode(text)  # no Python loop per token: well under a second
    assert len(ids) > 200_000 and tok.unk_id not in ids
    assert tok.decode(ids) == text


# ------------------------------------------------------------------ names and dicts


@pytest.mark.parametrize("name", ["char", "cl100k_base", "cl100k_base-compact"])
def test_to_dict_round_trip(name):
    tok = make_tokenizer(name, SMALL_TEXT)
    saved = json.loads(json.dumps(tok.to_dict()))  # what a checkpoint stores
    rebuilt = tokenizer_from_dict(saved)
    assert type(rebuilt) is type(tok)
    assert rebuilt.vocab_size == tok.vocab_size
    probe = SMALL_TEXT + "Speak!"
    if name == "char":
        probe = SMALL_TEXT[::-1]  # only characters the char vocabulary has
    assert rebuilt.encode(probe) == tok.encode(probe)
    assert rebuilt.decode(tok.encode(probe)) == tok.decode(tok.encode(probe))


def test_unknown_tokenizer_name():
    with pytest.raises(ValueError) as e:
        make_tokenizer("xyz", SMALL_TEXT)
    assert str(e.value).startswith(
        "unknown tokenizer 'xyz'; choose one of: char, cl100k_base, cl100k_base-compact, ")


def test_unknown_tokenizer_kind_in_dict():
    with pytest.raises(ValueError, match="unknown tokenizer kind 'bpe'"):
        tokenizer_from_dict({"kind": "bpe"})


def test_unavailable_encoding_is_a_one_line_value_error(monkeypatch):
    # gpt2 has no bundled copy, so tiktoken would download it: simulate being offline
    def offline(name):
        raise ConnectionError("Max retries exceeded\nFailed to resolve host")

    monkeypatch.setattr(tokenizer_module.tiktoken, "get_encoding", offline)
    with pytest.raises(TokenizerUnavailableError) as e:
        make_tokenizer("gpt2", SMALL_TEXT)
    assert isinstance(e.value, ValueError)
    message = str(e.value)
    assert "'gpt2'" in message and "\n" not in message and "ConnectionError" in message


def test_docstring_examples():
    assert doctest.testmod(tokenizer_module).failed == 0
