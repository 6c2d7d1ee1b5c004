"""Embeddings as geometry: what a char-level GPT's token vectors learned.

The idea. The first thing a GPT does with a token id is look up a row of its embedding
table wte (vocab_size, C): one learned vector per token. Nothing tells the model which
tokens are alike; it only learns that putting two tokens close together helps predict the
next character, because they behave alike. So nearness in this space is a summary of
behaviour, and we can read it with cosine similarity, cos(u, v) = u.v / (|u| |v|):

- nearest neighbours: which characters the model treats as interchangeable;
- analogies by vector arithmetic: if "lowercase -> uppercase" is one consistent
  direction, then e('a') - e('A') + e('B') should land nearest to e('b');
- a 2-D picture: project all vectors on their two directions of largest variance
  (principal component analysis, done here with NumPy's SVD of the centred table).

Our model ties its input and output embeddings (the logits are x . wte^T), so a
character's vector is also the direction that makes the model predict it: characters
that can follow the same contexts (the vowels after a consonant, the end-of-clause marks
before a space) are pulled together from both sides. Every number is compared with the
same measurement on the untrained (randomly initialised) table, where any structure is
chance.

What a model this small can and cannot show. With 65 characters the space can show
classes (vowels, consonants, capitals, punctuation) and maybe a case direction, but it
has no words, so it cannot show meaning. The famous king - man + woman ~ queen is a
word-level result from models trained on billions of words (word2vec, GloVe): it needs
tokens that carry meaning and enough text for each to appear in many contexts. Ours has
one 1 MB play collection and characters such as 'X', 'Z', '3' or '$' that occur a
handful of times, so their vectors barely move from their random start; a handful of
characters is also too few to trust any one neighbour list.

    python lab/embeddings.py           # seconds once the base model exists
    python lab/embeddings.py --quick   # seconds, for tests
"""
from __future__ import annotations

import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import string
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `python lab/embeddings.py`
from lab.common import base_model, lab_parser, log, require_matplotlib, write_results  # noqa: E402
from tinygrad_lite import cpu  # noqa: E402
from model.gpt import GPT, GPTConfig  # noqa: E402
from tinygrad_lite import backend  # noqa: E402

PROBES = ["a", "e", "o", "t", "s", "A", "E", "T", ".", "!", ",", " ", "\n"]
NAMED_ANALOGIES = [("a", "A", "B", "b"), ("e", "E", "T", "t"), ("s", "S", "K", "k"), ("B", "b", "m", "M")]


def char_class(ch: str) -> str:
    if ch in "aeiou":
        return "vowel"
    if ch in string.ascii_lowercase:
        return "consonant"
    if ch in "AEIOU":
        return "Vowel"
    if ch in string.ascii_uppercase:
        return "Consonant"
    if ch in " \n":
        return "space"
    return "punctuation"


BROAD = {"vowel": "lower", "consonant": "lower", "Vowel": "upper", "Consonant": "upper",
         "space": "other", "punctuation": "other"}
COLORS = {"vowel": "tab:red", "consonant": "tab:orange", "Vowel": "tab:blue", "Consonant": "tab:cyan",
          "space": "tab:green", "punctuation": "tab:purple"}


def show(ch: str) -> str:
    return {"\n": "\\n", " ": "' '"}.get(ch, ch)


def cosine_matrix(E: np.ndarray) -> np.ndarray:
    """(V, C) vectors -> (V, V) cosine similarities."""
    U = E / np.linalg.norm(E, axis=1, keepdims=True)
    return U @ U.T


def neighbours(S: np.ndarray, chars: str, ch: str, k: int = 5) -> list[tuple[str, float]]:
    i = chars.index(ch)
    order = [j for j in np.argsort(-S[i]) if j != i][:k]
    return [(chars[j], float(S[i, j])) for j in order]


def nearest(E: np.ndarray, query: np.ndarray, exclude: list[int], k: int = 5) -> list[int]:
    """The k rows of E closest to `query` by cosine, skipping the analogy's own inputs."""
    U = E / np.linalg.norm(E, axis=1, keepdims=True)
    scores = U @ (query / np.linalg.norm(query))
    scores[exclude] = -np.inf
    return list(np.argsort(-scores)[:k])


def analyse(E: np.ndarray, chars: str) -> dict:
    """The numbers we compare between the trained and the untrained table."""
    V = len(chars)
    S = cosine_matrix(E)
    classes = [char_class(c) for c in chars]
    # 1. purity: how many of each character's 3 nearest neighbours share its broad class
    pure, chance = [], []
    for i in range(V):
        nb = [j for j in np.argsort(-S[i]) if j != i][:3]
        pure.append(np.mean([BROAD[classes[j]] == BROAD[classes[i]] for j in nb]))
        chance.append((sum(BROAD[c] == BROAD[classes[i]] for c in classes) - 1) / (V - 1))
    # 2. case analogies over every ordered pair of letters x != y: x - X + Y ~ y ?
    idx = {c: i for i, c in enumerate(chars)}
    letters = [c for c in string.ascii_lowercase if c in idx and c.upper() in idx]
    top1 = top5 = total = 0
    for x in letters:
        for y in letters:
            if x == y:
                continue
            q = E[idx[x]] - E[idx[x.upper()]] + E[idx[y.upper()]]
            found = nearest(E, q, [idx[x], idx[x.upper()], idx[y.upper()]])
            top1 += int(found[0] == idx[y])
            top5 += int(idx[y] in found)
            total += 1
    # 3. is "lower minus upper" one direction? mean cosine between the offsets of two letters
    offsets = np.array([E[idx[c]] - E[idx[c.upper()]] for c in letters])
    O = cosine_matrix(offsets)
    offset_cos = float(O[np.triu_indices(len(letters), 1)].mean())
    return {"neighbour_class_purity": float(np.mean(pure)), "purity_by_chance": float(np.mean(chance)),
            "case_analogy_top1": top1 / max(total, 1), "case_analogy_top5": top5 / max(total, 1),
            "case_analogies_tried": total, "analogy_chance_top1": 1 / (V - 3),
            "case_offset_mean_cosine": offset_cos}


def pca_2d(E: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(V, C) -> (V, 2) coordinates on the two principal axes, and the variance share of each."""
    X = E - E.mean(axis=0)
    _, s, Vt = np.linalg.svd(X, full_matrices=False)  # X = U diag(s) Vt; rows of Vt are the axes
    return X @ Vt[:2].T, (s ** 2 / (s ** 2).sum())[:2]


def main(argv=None) -> int:
    args = lab_parser(__doc__).parse_args(argv)
    cpu.tune()  # malloc and threads, as train.py does (tinygrad_lite/cpu.py)
    plt = require_matplotlib()
    out = Path(args.out)
    start = time.perf_counter()
    model, tokenizer, info = base_model(out, quick=args.quick)
    chars = tokenizer.chars
    E = backend.to_numpy(model.wte.weight.data).astype(np.float64)  # (V, C)
    backend.manual_seed(args.seed)
    E0 = backend.to_numpy(GPT(GPTConfig(**info["config"])).wte.weight.data).astype(np.float64)  # untrained

    S = cosine_matrix(E)
    probes = {show(c): [[show(n), round(s, 3)] for n, s in neighbours(S, chars, c)] for c in PROBES if c in chars}
    for c, nb in probes.items():
        log(f"{c:>4} -> " + "  ".join(f"{n} {s:.2f}" for n, s in nb))
    idx = {c: i for i, c in enumerate(chars)}
    named = []
    for a, b, c, want in NAMED_ANALOGIES:
        found = nearest(E, E[idx[a]] - E[idx[b]] + E[idx[c]], [idx[a], idx[b], idx[c]])
        named.append({"query": f"{a} - {b} + {c}", "expected": want, "nearest": [show(chars[j]) for j in found]})
        log(f"{a} - {b} + {c} -> {' '.join(show(chars[j]) for j in found)} (want {want})")
    trained, untrained = analyse(E, chars), analyse(E0, chars)
    log(f"trained:   {trained}")
    log(f"untrained: {untrained}")
    xy, share = pca_2d(E)

    results = {"quick": args.quick, "base_model": info, "neighbours": probes, "analogies": named,
               "trained": trained, "untrained": untrained, "pca_variance_share": share,
               "wall_s": time.perf_counter() - start}
    write_results(out, "embeddings", results, plot(plt, chars, xy, share, S))
    return 0


def plot(plt, chars: str, xy: np.ndarray, share: np.ndarray, S: np.ndarray):
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.6), gridspec_kw={"width_ratios": [1.15, 1]})
    classes = [char_class(c) for c in chars]
    for cls, color in COLORS.items():
        mine = [i for i, c in enumerate(classes) if c == cls]
        ax.scatter(xy[mine, 0], xy[mine, 1], color=color, s=18, alpha=0.5, label=cls)
    for i, c in enumerate(chars):
        ax.annotate(show(c), xy[i], color=COLORS[classes[i]], fontsize=9, ha="center", va="bottom",
                    fontweight="bold")
    ax.set_xlabel(f"PC 1 ({100 * share[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * share[1]:.0f}% of variance)")
    ax.set_title("token embeddings (wte), first two principal components", fontsize=10)
    ax.legend(fontsize=8, title="class (Capital = uppercase)", title_fontsize=8)
    ax.grid(alpha=0.3)
    order = sorted(range(len(chars)), key=lambda i: (list(COLORS).index(classes[i]), chars[i]))
    im = ax2.imshow(S[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1)
    ax2.set_xticks(range(len(order)))
    ax2.set_yticks(range(len(order)))
    ax2.set_xticklabels([show(chars[i]) for i in order], fontsize=5)
    ax2.set_yticklabels([show(chars[i]) for i in order], fontsize=5)
    ax2.set_title("cosine similarity, grouped: vowels, consonants, Vowels, Consonants, space, punct.",
                  fontsize=9)
    fig.colorbar(im, ax=ax2, fraction=0.046)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
