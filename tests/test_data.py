"""Tests for model/data.py: one-line errors, the token cache, batches, and the tiny
Shakespeare shipped in the package (offline: a test fails if anything opens a socket)."""
import hashlib
from pathlib import Path

import numpy as np
import pytest

import model.data as data_module
from model.data import DataError, encode_dataset, get_batch, load_text, shakespeare_path
from model.tokenizer import make_tokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 5


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


# --------------------------------------------------------------------------- load_text


def test_load_text_reads_utf8(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("héllo\n", encoding="utf-8")
    assert load_text(f) == "héllo\n"


def test_load_text_missing(tmp_path):
    with pytest.raises(DataError) as e:
        load_text(tmp_path / "nope.txt")
    assert_one_line(e, "nope.txt", "does not exist")


def test_load_text_directory(tmp_path):
    with pytest.raises(DataError) as e:
        load_text(tmp_path)
    assert_one_line(e, "is a directory")


def test_load_text_empty(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_bytes(b"")
    with pytest.raises(DataError) as e:
        load_text(f)
    assert_one_line(e, "empty.txt", "is empty")


def test_load_text_not_utf8_names_the_offset(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf".encode() + b"\xe9 au lait")  # latin-1 é, invalid in UTF-8
    with pytest.raises(DataError) as e:
        load_text(f)
    assert_one_line(e, "not UTF-8", "0xe9", "offset 3")


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------- encode_dataset


class CountingTokenizer:
    """Wraps a tokenizer and counts encode calls, to prove the cache is used."""

    def __init__(self, inner):
        self.inner, self.calls, self.vocab_size = inner, 0, inner.vocab_size

    def encode(self, text):
        self.calls += 1
        return self.inner.encode(text)

    def decode(self, ids):
        return self.inner.decode(ids)

    def to_dict(self):
        return self.inner.to_dict()


def test_encode_dataset_split_and_dtype(tmp_path):
    tok = make_tokenizer("char", TEXT)
    train, val = encode_dataset(TEXT, tok, tmp_path)
    ids = tok.encode(TEXT)
    n_train = int(0.9 * len(ids))
    assert train.dtype == np.uint16 and val.dtype == np.uint16
    assert train.tolist() == ids[:n_train] and val.tolist() == ids[n_train:]
    assert isinstance(train, np.memmap) and not train.flags.writeable
    assert {p.name for p in tmp_path.iterdir()} == {"train.bin", "val.bin", "meta.json"}


def test_encode_dataset_uses_uint32_for_big_vocabularies(tmp_path):
    tok = make_tokenizer("cl100k_base", TEXT)  # vocab_size 100277 >= 65536
    train, val = encode_dataset(TEXT, tok, tmp_path)
    assert train.dtype == np.uint32
    assert train.tolist() + val.tolist() == tok.encode(TEXT)


def test_encode_dataset_is_cached_and_reencodes_on_change(tmp_path):
    tok = CountingTokenizer(make_tokenizer("char", TEXT))
    first = encode_dataset(TEXT, tok, tmp_path)
    second = encode_dataset(TEXT, tok, tmp_path)
    assert tok.calls == 1  # the second call only mapped the files
    assert first[0].tolist() == second[0].tolist()
    changed = TEXT[::-1]
    train, val = encode_dataset(changed, tok, tmp_path)
    assert tok.calls == 2
    assert train.tolist() + val.tolist() == tok.inner.encode(changed)


def test_encode_dataset_reencodes_when_the_tokenizer_changes(tmp_path):
    char = CountingTokenizer(make_tokenizer("char", TEXT))
    compact = CountingTokenizer(make_tokenizer("cl100k_base-compact", TEXT))
    encode_dataset(TEXT, char, tmp_path)
    train, val = encode_dataset(TEXT, compact, tmp_path)
    assert compact.calls == 1
    assert train.tolist() + val.tolist() == compact.inner.encode(TEXT)


def test_encode_dataset_reencodes_a_truncated_bin(tmp_path):
    tok = CountingTokenizer(make_tokenizer("char", TEXT))
    encode_dataset(TEXT, tok, tmp_path)
    (tmp_path / "train.bin").write_bytes(b"\0\0")
    train, _ = encode_dataset(TEXT, tok, tmp_path)
    assert tok.calls == 2 and len(train) == int(0.9 * len(TEXT))


# --------------------------------------------------------------------------- get_batch


def test_get_batch_shapes_dtypes_and_shift():
    data = np.arange(100, dtype=np.uint16)  # token i is i, so windows are easy to read
    x, y = get_batch(data, batch_size=4, block_size=8, rng=np.random.default_rng(0))
    assert x.shape == y.shape == (4, 8)
    assert x.dtype == y.dtype == np.int64
    assert np.array_equal(y[:, :-1], x[:, 1:])  # y is x shifted left by one
    assert np.array_equal(x[:, 1:] - x[:, :-1], np.ones((4, 7)))  # contiguous windows
    assert np.array_equal(y[:, -1], x[:, -1] + 1)


def test_get_batch_is_deterministic_for_a_seed():
    data = np.random.default_rng(1).integers(0, 65, size=1000).astype(np.uint16)
    a = get_batch(data, 8, 16, np.random.default_rng(42))
    b = get_batch(data, 8, 16, np.random.default_rng(42))
    c = get_batch(data, 8, 16, np.random.default_rng(43))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_get_batch_reaches_the_last_token_exactly():
    data = np.arange(9, dtype=np.uint16)  # block_size + 1 tokens: one possible window
    x, y = get_batch(data, 3, 8, np.random.default_rng(0))
    assert x.tolist() == [list(range(8))] * 3 and y.tolist() == [list(range(1, 9))] * 3


def test_get_batch_from_memmap(tmp_path):
    train, _ = encode_dataset(TEXT, make_tokenizer("char", TEXT), tmp_path)
    x, y = get_batch(train, 2, 4, np.random.default_rng(0))
    assert type(x) is np.ndarray and x.shape == (2, 4)


def test_get_batch_too_short():
    with pytest.raises(DataError) as e:
        get_batch(np.arange(8), 2, 8, np.random.default_rng(0))
    assert_one_line(e, "text has 8 tokens; need at least block_size + 1 = 9")


# -------------------------------------------------------------------- shakespeare_path


@pytest.fixture
def offline(monkeypatch):
    """No network: any attempt to open a connection fails the test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("tiny Shakespeare must not need the network")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_shakespeare_path_unpacks_the_packaged_copy(tmp_path, offline):
    path = shakespeare_path(tmp_path / "cache")
    assert path == tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    data = path.read_bytes()
    assert len(data) == 1_115_394 and hashlib.sha256(data).hexdigest() == data_module.SHAKESPEARE_SHA256
    assert [p.name for p in path.parent.iterdir()] == ["input.txt"]  # no temp file left over
    assert shakespeare_path(tmp_path / "cache") == path  # second call: straight from the cache


def test_shakespeare_path_honours_the_env_var(tmp_path, offline, monkeypatch):
    monkeypatch.setenv("TINYGRAD_LITE_CACHE", str(tmp_path / "envcache"))
    assert shakespeare_path() == tmp_path / "envcache" / "tinyshakespeare" / "input.txt"


def test_shakespeare_path_replaces_a_corrupt_cache_file(tmp_path, offline):
    cached = tmp_path / "tinyshakespeare" / "input.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"First Citizen:\nBefore we")  # a truncated earlier copy
    assert hashlib.sha256(shakespeare_path(tmp_path).read_bytes()).hexdigest() == data_module.SHAKESPEARE_SHA256


def test_a_packaged_copy_with_the_wrong_hash_is_refused(tmp_path, offline, monkeypatch):
    monkeypatch.setattr(data_module, "SHAKESPEARE_SHA256", "0" * 64)
    with pytest.raises(DataError) as e:
        shakespeare_path(tmp_path)
    assert_one_line(e, "tinyshakespeare.txt.xz", "sha256", "refusing")
    assert not (tmp_path / "tinyshakespeare" / "input.txt").exists()


def test_a_missing_packaged_copy_says_what_to_do(tmp_path, offline, monkeypatch):
    monkeypatch.setattr(data_module, "SHAKESPEARE_PACKAGED", ("assets", "nothing-here.txt.xz"))
    with pytest.raises(DataError) as e:
        shakespeare_path(tmp_path)
    assert_one_line(e, "nothing-here.txt.xz", "reinstall", "--data FILE")


def test_the_built_wheel_carries_tiny_shakespeare(tmp_path):
    """The compressed text is package data: a wheel built from this checkout contains it."""
    import subprocess
    import sys
    import zipfile
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(root)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("tinygrad_lite-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "model/assets/tinyshakespeare.txt.xz" in names, names
