"""Lost in the middle, in miniature: can a small GPT find a fact wherever it sits?

The idea. Large language models use information at the start and at the end of a long
prompt better than information buried in the middle (Liu et al., 2023, "Lost in the
Middle"): ask about a fact and the answer is more often right when the fact was placed
near either edge. To see how such a curve is measured, we build the smallest version of
the experiment: a context full of facts, one question at the end, and accuracy as a
function of where the asked-about fact was placed.

The task (synthetic, so the answer can only come from the context). A sequence holds
F facts, each a key letter followed by a value of two letters, with the F keys all
different and the values random; then the same facts again, in a random order, as
questions. Printed with a space between facts (the model sees no spaces):

    luw dcb uri nod cwl | luw cwl uri dcb nod
    F = 5 facts           questions: after each key, its 2 value letters are graded

Only the value letters of the questions are graded (every other target is ignored), so
the model must learn to find the earlier copy of the question's key and copy the two
letters after it: the two-step "induction" pattern (one attention head marks every
position with the letter before it; a head in the next layer matches the question's key
against those marks and copies what it finds). During training the number of facts
varies from batch to batch (2 .. F): in a short context a head that attends almost at
random is often right, which gives the gradient something to follow. The test always
uses F facts.

Two details of the task matter more than one would like. In trial runs, a version with
keys from a separate alphabet (uppercase keys, lowercase values) and one with a
separator character between facts both stayed at chance for thousands of steps, while
this one learns in a few hundred. A small model's ability to pick up a skill at all
depends that much on the format, one more reason not to read its curves as facts about
LLMs.

The measurement. For each fact position d = 0 .. F-1 (0: the first fact, farthest from
the question; F-1: the fact right before it), fresh sequences whose *first* question asks
about fact d; the model reads up to that question's key, and the answer counts if its
most likely next letter is the value's first letter and, given that one, its most likely
letter after it is the second (exactly what greedy decoding would produce; chance is
1/676). The curve is measured at several points of training, to show where copying
starts to work first.

What it shows with the default settings (16 facts, 3500 steps, lab/results/): no U.
Copying switches on between 700 and 1400 steps, all depths at once; at the end facts
from the start to the middle of the context are recalled about half the time and the
last three facts, right before the question, the least (5-15%): the opposite of a
recency advantage. A plausible reason, not tested here, is the training data: each fact
is asked exactly once and in random order, so only the first question can ask about the
fact just before it, and near distances are the rarest ones the model practised.

What this can and cannot show. It measures one thing: whether a 2-layer, 0.1M-parameter
model trained for a few minutes has learned to copy over distance inside a context of
49 characters, and whether distance or position makes that harder. A
real LLM's lost-in-the-middle curve comes from contexts of thousands of tokens,
natural-language documents that compete for attention, position encodings stretched far
beyond short training texts, and training data in which the important part is usually
near the start or the end. None of that exists here, so a flat curve would not mean
LLMs are free of the effect, and a dip would not explain theirs. What it does show is
how such a curve is measured, and that position effects appear (or not) as a property
of what and how long a model was trained on.

    python lab/lost_in_the_middle.py           # ~2.5 min on 2 idle cores (nice'd, one BLAS thread)
    python lab/lost_in_the_middle.py --quick   # seconds, for tests
"""
from __future__ import annotations

import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import string
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root
from lab.common import TrainSpec, lab_parser, log, require_matplotlib, train_gpt, write_results  # noqa: E402
from tinygrad_lite import cpu  # noqa: E402
from model.tokenizer import make_tokenizer  # noqa: E402

LETTERS = string.ascii_lowercase  # keys and values share one alphabet (see the docstring)
VALUE_LEN = 2  # letters per value
RECORD = 1 + VALUE_LEN  # characters per fact: the key, then the value
IGNORE = -1  # targets that count for nothing in the loss


class Task:
    """Sequences of the key-value task as token ids (a CharTokenizer over the 26 lowercase letters)."""

    def __init__(self) -> None:
        self.tokenizer = make_tokenizer("char", LETTERS)
        self.letter_ids = np.array(self.tokenizer.encode(LETTERS))  # (26,)

    def sequences(self, rng: np.random.Generator, n: int, n_facts: int,
                  first_asks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """n sequences of n_facts facts then n_facts questions.

        Returns x (n, L) inputs and y (n, L) targets, L = 2 * RECORD * n_facts - 1; y is
        IGNORE except at the question values. first_asks (n,): the fact
        index the first question asks about (default: random, like every other question).
        """
        keys = np.argsort(rng.random((n, len(LETTERS))), axis=1)[:, :n_facts]  # (n, F) distinct per row
        values = rng.integers(0, len(LETTERS), size=(n, n_facts, VALUE_LEN))  # (n, F, VL)
        order = np.argsort(rng.random((n, n_facts)), axis=1)  # (n, F) question order
        if first_asks is not None:  # swap the wanted fact to the front of the questions
            rows = np.arange(n)
            where = np.argmax(order == first_asks[:, None], axis=1)
            order[rows, where] = order[rows, 0]
            order[:, 0] = first_asks
        k_q = np.take_along_axis(keys, order, axis=1)  # (n, F) keys in question order
        v_q = np.take_along_axis(values, order[..., None], axis=1)  # (n, F, VL)
        seq = np.zeros((n, 2 * n_facts, RECORD), dtype=np.int64)  # (n, 2F records, RECORD)
        seq[:, :n_facts, 0], seq[:, :n_facts, 1:1 + VALUE_LEN] = self.letter_ids[keys], self.letter_ids[values]
        seq[:, n_facts:, 0], seq[:, n_facts:, 1:1 + VALUE_LEN] = self.letter_ids[k_q], self.letter_ids[v_q]
        target = np.full_like(seq, IGNORE)
        target[:, n_facts:, 1:] = seq[:, n_facts:, 1:]  # only the answers are graded
        seq, target = seq.reshape(n, -1), target.reshape(n, -1)  # (n, 2F RECORD)
        return seq[:, :-1], target[:, 1:]  # predict token t+1 from tokens <= t

    def show(self, ids, n_facts: int) -> str:
        """The text for a reader: a space between facts, '|' before the questions."""
        text = self.tokenizer.decode(list(ids))
        facts = [text[i:i + RECORD] for i in range(0, len(text), RECORD)]
        return " ".join(facts[:n_facts]) + " | " + " ".join(facts[n_facts:])


def accuracy_by_depth(model, task: Task, n_facts: int, per_depth: int, seed: int) -> np.ndarray:
    """(n_facts,) exact-match accuracy of the first question's answer, by the fact it asks."""
    rng = np.random.default_rng(seed)
    key = RECORD * n_facts  # input position of the first question's key
    acc = np.zeros(n_facts)
    for d in range(n_facts):
        x, y = task.sequences(rng, per_depth, n_facts, first_asks=np.full(per_depth, d))
        logits, _ = model(x[:, :key + VALUE_LEN])  # (n, key + VL, V)
        guess = logits.numpy()[:, key:].argmax(axis=-1)  # (n, VL) teacher-forced argmax, on the host
        acc[d] = float(np.mean((guess == y[:, key:key + VALUE_LEN]).all(axis=1)))
    return acc


def main(argv=None) -> int:
    parser = lab_parser(__doc__)
    parser.add_argument("--iters", type=int, default=None, help="training iterations (default 3500, quick 30)")
    parser.add_argument("--facts", type=int, default=None, help="facts in a test context (default 16, quick 4)")
    args = parser.parse_args(argv)
    cpu.tune()  # malloc and threads, as train.py does (tinygrad_lite/cpu.py)
    plt = require_matplotlib()
    out = Path(args.out)
    start = time.perf_counter()
    quick = args.quick
    n_facts = args.facts or (4 if quick else 16)
    iters = args.iters or (30 if quick else 3500)
    per_depth = 16 if quick else 150
    spec = TrainSpec(n_layer=2, n_head=4, n_embd=32 if quick else 64, block_size=2 * RECORD * n_facts,
                     batch_size=8 if quick else 32, iters=iters, lr=3e-3, warmup_iters=100, pos="rope",
                     seed=args.seed)
    task = Task()

    def next_batch(rng):
        f = int(rng.integers(2, n_facts + 1))  # a short context now and then: an easier signal
        return task.sequences(rng, spec.batch_size, f)

    curves = {}

    def on_eval(it, model):
        acc = accuracy_by_depth(model, task, n_facts, per_depth, seed=args.seed + 1)
        curves[it] = acc
        log(f"iter {it:5d}  accuracy {acc.mean():.3f}  by depth " + " ".join(f"{a:.2f}" for a in acc)
            + f"  ({time.perf_counter() - start:.0f}s)")

    model, summary = train_gpt(spec, task.tokenizer.vocab_size, next_batch, ignore_index=IGNORE,
                               every=max(1, iters // 5), on_eval=on_eval)
    final = curves[iters]
    depth = np.arange(n_facts) / max(1, n_facts - 1)  # 0 = start of the context, 1 = next to the question
    x, _ = task.sequences(np.random.default_rng(0), 1, n_facts)
    example = task.show(x[0, :RECORD * n_facts + 1], n_facts)
    thirds = np.array_split(final, 3)
    results = {
        "quick": quick, "n_facts": n_facts, "context_chars": RECORD * n_facts + 1,
        "task": f"{n_facts} facts (key letter + {VALUE_LEN}-letter value), then the same facts as questions", "example_prompt": example,
        "model": {"n_layer": spec.n_layer, "n_embd": spec.n_embd, "params": summary["params"], "pos": spec.pos},
        "train_iters": iters, "train_seconds": summary["seconds"], "final_train_loss": summary["final_train_loss"],
        "eval_per_depth": per_depth, "chance": 1 / len(LETTERS) ** VALUE_LEN,
        "depth": depth, "accuracy_by_depth": final, "mean_accuracy": float(final.mean()),
        "accuracy_start_middle_end": [float(t.mean()) for t in thirds],
        "curves": {str(k): v for k, v in curves.items()},
        "wall_s": time.perf_counter() - start,
    }
    log(f"example test prompt: {example!r} -> the {VALUE_LEN} letters after its last key")
    log(f"final accuracy by depth (start .. end): {np.round(final, 2).tolist()}; start/middle/end thirds "
        f"{[round(a, 3) for a in results['accuracy_start_middle_end']]}")
    write_results(out, "lost_in_the_middle", results, plot(plt, curves, depth, per_depth, n_facts))
    return 0


def plot(plt, curves: dict, depth: np.ndarray, per_depth: int, n_facts: int):
    fig, ax = plt.subplots(figsize=(8, 4.6))
    its = sorted(curves)
    colors = plt.cm.viridis(np.linspace(0.15, 0.9, len(its)))
    for it, color in zip(its, colors):
        acc = curves[it]
        last = it == its[-1]
        if last:  # binomial standard error of each point: sqrt(p (1 - p) / n)
            se = np.sqrt(acc * (1 - acc) / per_depth)
            ax.fill_between(depth, acc - se, acc + se, color=color, alpha=0.2)
        ax.plot(depth, acc, "o-" if last else ".-", color=color, lw=2.2 if last else 1, label=f"after {it} iters")
    ax.axhline(1 / len(LETTERS) ** VALUE_LEN, color="grey", ls=":", label=f"chance (1/{len(LETTERS) ** VALUE_LEN})")
    ax.set_xlabel(f"where the asked fact sits: 0 = first of {n_facts} facts, 1 = right before the question")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("key-value recall by depth in the context (2-layer GPT, synthetic task)", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
