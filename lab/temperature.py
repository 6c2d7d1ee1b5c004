"""Temperature: one knob between copying the most likely text and saying anything.

The idea. At every step a language model gives a score (a logit) to each possible next
token; the softmax turns the scores into probabilities and we draw one token. Before the
softmax we may divide every logit by a temperature T:

    p_T(token) = softmax(logits / T)

T = 1 keeps the model's own distribution. T < 1 stretches the gaps between scores, so the
likely tokens get likelier and the draw approaches always taking the top token (T -> 0 is
greedy decoding). T > 1 shrinks the gaps, so unlikely tokens get a real chance and at very
high T every token is equally likely. Two measurements show the trade:

- entropy of the distribution we actually sample from, H = -sum p_T log p_T (nats per
  token): how many choices the sampler is really weighing (e^H of them, roughly);
- distinct-n: of all the word n-grams in the samples, the fraction that are different
  (Li et al., 2016). Low distinct-n means the text repeats itself.

Every temperature draws with the same seed, so the samples share their random numbers
and differ only through T; greedy decoding (T = 0) turns every sample into the same
text, which is part of why its distinct-n is so low.

Diversity is not quality, so we also report two quality signals: how surprised the model
itself is by the text it produced (mean -log p_1 of each sampled token under the untempered
model, nats) and the fraction of generated words that occur anywhere in tiny Shakespeare.

What a model this small can and cannot show. The mechanics are exact at any size: entropy
rises with T, greedy text loops, high T text falls apart into non-words, and somewhere in
between the text is both varied and mostly made of real words. What it cannot show is the
part people care about in large models, where "quality" means facts and reasoning, not
spelling: our char-level model makes words, not claims, so low temperature here buys
spelling and repetition, not truthfulness. The best temperature for our samples says
nothing about the best temperature for a large model on a given task.

    python lab/temperature.py           # ~1 min once the base model exists
    python lab/temperature.py --quick   # seconds, for tests
"""
from __future__ import annotations

import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `python lab/temperature.py`
from lab.common import base_model, lab_parser, log, require_matplotlib, write_results  # noqa: E402
from tinygrad_lite import cpu  # noqa: E402
from model.data import load_text, shakespeare_path  # noqa: E402
from model.generate import generate_with_logits  # noqa: E402

TEMPERATURES = [0.0, 0.2, 0.5, 0.8, 1.0, 1.3, 2.0]
PROMPT = "\n"
WORD = re.compile(r"[A-Za-z']+")


def sampled_entropy(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Entropy (nats) of softmax(logits / T) at every step: (..., V) -> (...). 0 for greedy."""
    if temperature == 0:
        return np.zeros(logits.shape[:-1])
    z = logits.astype(np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)  # NOTE: shift so exp cannot overflow at small T
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -(np.exp(log_p) * log_p).sum(axis=-1)


def nll_under_model(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """-log p_1(token) of each sampled token under the untempered model: (B, N, V), (B, N) -> (B, N)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_p, ids[..., None], axis=-1)[..., 0]


def distinct_n(texts: list[str], n: int) -> float:
    """Unique word n-grams / all word n-grams, pooled over the texts (lowercased words)."""
    grams = []
    for text in texts:
        words = [w.lower() for w in WORD.findall(text)]
        grams += [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def real_word_fraction(texts: list[str], vocabulary: set[str]) -> float:
    words = [w.lower() for text in texts for w in WORD.findall(text)]
    return sum(w in vocabulary for w in words) / len(words) if words else 0.0


def main(argv=None) -> int:
    parser = lab_parser(__doc__)
    parser.add_argument("--samples", type=int, default=None, help="samples per temperature (default 8, quick 2)")
    parser.add_argument("--tokens", type=int, default=None, help="characters per sample (default 400, quick 40)")
    args = parser.parse_args(argv)
    cpu.tune()  # malloc and threads, as train.py does (tinygrad_lite/cpu.py)
    plt = require_matplotlib()
    out = Path(args.out)
    start = time.perf_counter()
    n_samples = args.samples or (2 if args.quick else 8)
    n_tokens = args.tokens or (40 if args.quick else 400)
    model, tokenizer, info = base_model(out, quick=args.quick)
    vocabulary = {w.lower() for w in WORD.findall(load_text(shakespeare_path()))}

    rows = []
    for T in TEMPERATURES:
        ids, logits = generate_with_logits(model, tokenizer.encode(PROMPT), n_tokens, num_samples=n_samples,
                                           temperature=T, seed=args.seed)  # (B, N), (B, N, V)
        ids = np.asarray(ids)
        texts = [tokenizer.decode(row) for row in ids]
        H = sampled_entropy(logits, T)
        row = {"temperature": T, "entropy_nats": float(H.mean()), "entropy_bits": float(H.mean() / np.log(2)),
               "nll_under_model": float(nll_under_model(logits, ids).mean()),
               "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
               "distinct_3": distinct_n(texts, 3), "real_word_fraction": real_word_fraction(texts, vocabulary),
               "sample": texts[0]}
        rows.append(row)
        log(f"T={T:<4} entropy {row['entropy_nats']:.2f} nats  distinct-1/2/3 {row['distinct_1']:.2f}/"
            f"{row['distinct_2']:.2f}/{row['distinct_3']:.2f}  real words {row['real_word_fraction']:.2f}  "
            f"model nll {row['nll_under_model']:.2f}")
    print("\none short sample per temperature:")
    for row in rows:
        snippet = " ".join(row["sample"].split())[:110]
        print(f"  T={row['temperature']:<4} | {snippet}")

    results = {"quick": args.quick, "base_model": info, "prompt": PROMPT, "samples_per_temperature": n_samples,
               "tokens_per_sample": n_tokens, "temperatures": rows, "wall_s": time.perf_counter() - start}
    write_results(out, "temperature", results, plot(plt, rows, info))
    return 0


def plot(plt, rows: list[dict], info: dict):
    T = [r["temperature"] for r in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
    ax.plot(T, [r["entropy_nats"] for r in rows], "o-", label="entropy of the sampled distribution")
    ax.plot(T, [r["nll_under_model"] for r in rows], "s--", label="model's own surprise at the sample (T=1 nll)")
    if info.get("val_loss"):
        ax.axhline(info["val_loss"], color="grey", lw=0.8, ls=":", label=f"val loss on real text ({info['val_loss']:.2f})")
    ax.set_xlabel("temperature T")
    ax.set_ylabel("nats per character")
    ax.set_title("higher T: a flatter distribution, less likely text", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for n, marker in ((1, "o"), (2, "s"), (3, "^")):
        ax2.plot(T, [r[f"distinct_{n}"] for r in rows], marker + "-", label=f"distinct-{n} (word n-grams)")
    ax2.plot(T, [r["real_word_fraction"] for r in rows], "kx--", label="words found in tiny Shakespeare")
    ax2.set_xlabel("temperature T")
    ax2.set_ylabel("fraction")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("diversity rises with T, real words fall", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
