"""Tiny Shakespeare on disk: unpack it, read it, tokenize it once, sample batches.

The pipeline, as in nanoGPT's data/shakespeare*/prepare.py and train.py's get_batch:

    path = shakespeare_path()                      # hash-verified input.txt, 1,115,394 bytes
    text = load_text(path)                         # str, or a one-line DataError
    tok = make_tokenizer("char", text)             # vocab_size 65
    train, val = encode_dataset(text, tok, cache)  # (1003854,), (111540,) uint16 memmaps
    x, y = get_batch(train, 4, 8, np.random.default_rng(0))  # (4, 8), (4, 8) int64

With "cl100k_base" the same text is 301,829 tokens: 271,646 train, 30,183 val.
Every error a user can cause here is a DataError (a ValueError) with a one-line message
that says what is wrong and how to fix it, so the training script can print it as is.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import json
import lzma
import os
import tempfile
from pathlib import Path

import numpy as np

from model.tokenizer import Tokenizer

# Tiny Shakespeare (Karpathy's char-rnn collection, public domain), shipped inside the
# package xz-compressed (364 KB for 1,115,394 bytes): training needs no network.
SHAKESPEARE_PACKAGED = ("assets", "tinyshakespeare.txt.xz")  # inside the `model` package
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # of the text
TRAIN_FRACTION = 0.9  # the first 90% of the tokens train, the last 10% validate


class DataError(ValueError):
    """The training text cannot be found, read or used; the message is one line."""


# ----------------------------------------------------------------------------- files


def _one_line(x: object) -> str:
    return " ".join(str(x).split())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + os.replace: readers (and a crash
    half-way) see the old file or the new one, never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_cache_dir() -> Path:
    """$TINYGRAD_LITE_CACHE if set, else ~/.cache/tinygrad_lite."""
    env = os.environ.get("TINYGRAD_LITE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tinygrad_lite"


def packaged_shakespeare() -> bytes:
    """The text of the copy inside the package, decompressed; a DataError if it is missing
    or does not hash to SHAKESPEARE_SHA256."""
    resource = importlib.resources.files("model").joinpath(*SHAKESPEARE_PACKAGED)
    try:
        data = lzma.decompress(resource.read_bytes())
    except (OSError, lzma.LZMAError) as e:
        raise DataError(f"the packaged tiny Shakespeare ({resource}) cannot be read "
                        f"({_one_line(e)}); reinstall tinygrad_lite or pass --data FILE") from None
    return _verified(data, resource)


def _verified(data: bytes, source: object) -> bytes:
    got = _sha256(data)
    if got != SHAKESPEARE_SHA256:
        raise DataError(f"{source} is not the tiny Shakespeare file (sha256 {got}, expected "
                        f"{SHAKESPEARE_SHA256}); refusing to use it")
    return data


def shakespeare_path(cache_dir: str | Path | None = None) -> Path:
    """A hash-verified copy of tiny Shakespeare: <cache_dir>/tinyshakespeare/input.txt.

    cache_dir defaults to default_cache_dir(). A cached copy with the right hash is used
    as it is; otherwise (first use, or a truncated or tampered file) the copy shipped in
    the package is decompressed, its sha256 checked, and written there atomically.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "tinyshakespeare" / "input.txt"
    if target.is_file() and _sha256(target.read_bytes()) == SHAKESPEARE_SHA256:
        return target
    _atomic_write(target, packaged_shakespeare())
    return target


def load_text(path: str | Path) -> str:
    """The file's text, or a one-line DataError: missing, a directory, empty, not UTF-8."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        raise DataError(f"data file {path} is a directory, not a text file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {_one_line(e.strerror)}") from None
    if not data:
        raise DataError(f"data file {path} is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text: byte 0x{data[e.start]:02x} "
                        f"at byte offset {e.start} cannot be decoded") from None


# ------------------------------------------------------------------------ token cache


def dataset_key(text: str, tokenizer: Tokenizer) -> str:
    """sha256 over the text and the tokenizer: change either and the cache is stale."""
    h = hashlib.sha256(text.encode("utf-8", "surrogatepass"))
    h.update(b"\0")  # a separator, so no (text, tokenizer) pair can collide with another split
    h.update(json.dumps(tokenizer.to_dict(), sort_keys=True).encode())
    return h.hexdigest()


def _open_bin(path: Path, dtype: str, n: int) -> np.ndarray:
    """(n,) read-only ids from a .bin file, memory-mapped: pages load only when a batch
    touches them, so a corpus never has to fit in RAM."""
    if n == 0:  # NOTE: mmap cannot map an empty file
        empty = np.zeros(0, dtype=dtype)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _cache_is_valid(cache_dir: Path, meta: dict | None, key: str) -> bool:
    if not meta or meta.get("key") != key:
        return False
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        f = cache_dir / f"{split}.bin"
        if not f.is_file() or f.stat().st_size != meta[f"n_{split}"] * itemsize:
            return False
    return True


def encode_dataset(text: str, tokenizer: Tokenizer, cache_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize `text` once and cache it: returns (train_ids (N_train,), val_ids (N_val,)).

    Files in cache_dir: train.bin and val.bin (raw uint16 when vocab_size < 65536,
    else uint32, as nanoGPT stores them) and meta.json with a dataset_key. A later
    call with the same text and tokenizer just maps the files; a changed text or
    tokenizer re-encodes. The split is on tokens: the first 90% train.
    """
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / "meta.json"
    key = dataset_key(text, tokenizer)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):  # missing or corrupt: treat as no cache
        meta = None
    if not _cache_is_valid(cache_dir, meta, key):
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)  # (N,)
        dtype = np.dtype(np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32)
        n_train = int(TRAIN_FRACTION * len(ids))
        # meta.json goes first and comes back last, so the .bin files are never
        # trusted unless they were completely written for this key
        meta_path.unlink(missing_ok=True)
        _atomic_write(cache_dir / "train.bin", ids[:n_train].astype(dtype).tobytes())
        _atomic_write(cache_dir / "val.bin", ids[n_train:].astype(dtype).tobytes())
        meta = {"key": key, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
                "n_train": n_train, "n_val": len(ids) - n_train}
        _atomic_write(meta_path, json.dumps(meta, indent=1).encode())
    return (_open_bin(cache_dir / "train.bin", meta["dtype"], meta["n_train"]),
            _open_bin(cache_dir / "val.bin", meta["dtype"], meta["n_val"]))


# ---------------------------------------------------------------------------- batches


def get_batch(data: np.ndarray, batch_size: int, block_size: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """B random windows of T + 1 tokens: x = tokens 0..T-1, y = tokens 1..T.

    data (N,) ids -> x (B, T) int64, y (B, T) int64, where B = batch_size, T = block_size.
    y[b, t] is the token that follows x[b, :t+1]: the target at every position. The
    offsets come from `rng`, so a seeded generator gives the same batches every run.
    """
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
    n = len(data)
    if n < block_size + 1:
        raise DataError(f"text has {n} tokens; need at least block_size + 1 = {block_size + 1}")
    starts = rng.integers(0, n - block_size, size=batch_size)  # (B,) last start is n - T - 1
    index = starts[:, None] + np.arange(block_size + 1)  # (B, T+1) one window per row
    window = np.array(data[index], dtype=np.int64)  # (B, T+1) a plain in-memory copy
    return window[:, :-1].copy(), window[:, 1:].copy()  # (B, T), (B, T) contiguous
