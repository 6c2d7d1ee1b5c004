"""Sampling: how a distribution over the next token becomes one token.

The model gives logits (B, V): unnormalised scores for every token of the vocabulary.
- temperature T divides the logits: T < 1 sharpens the distribution (safer, more
  repetitive text), T > 1 flattens it (more surprising text); T = 0 is greedy, the
  single most likely token;
- top-k keeps only the k most likely tokens; top-p (nucleus) keeps the smallest set of
  most likely tokens whose probabilities add up to at least p;
- then one token is drawn from what is left, with a seeded generator so a seed fixes
  the samples. Filters apply in the order temperature, top-k, top-p.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tinygrad_lite import Tensor, backend

# Each function takes logits (..., V) as a backend array or a Tensor and works on the
# last axis with the array's own module (`xp`), so the data never leaves the device
# until a handful of ids comes back to the host.


def _array(x: Any) -> Any:
    return x.data if isinstance(x, Tensor) else x


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """One-line ValueErrors for settings no sampler accepts."""
    if not temperature >= 0:  # written so that NaN fails too
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k <= 0):
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def greedy(logits: Any) -> list[int]:
    """The most likely token of each row: (B, V) -> B ids (a tie goes to the lowest id)."""
    return backend.to_numpy(_array(logits).argmax(axis=-1)).tolist()


def apply_temperature(logits: Any, temperature: float) -> Any:
    """logits / T: T < 1 sharpens the distribution, T > 1 flattens it. (..., V) -> (..., V)."""
    return _array(logits) / temperature


def softmax(logits: Any) -> Any:
    """Probabilities (..., V); a -inf logit gets probability exactly 0."""
    a = _array(logits)
    xp = backend.xp_of(a)
    e = xp.exp(a - a.max(axis=-1, keepdims=True))  # NOTE: subtract the max so exp never overflows
    return e / e.sum(axis=-1, keepdims=True)


def token_log_prob(logits: Any, token: int, top: int = 0) -> tuple[float, list[tuple[int, float]]]:
    """How sure the model was: log p(token) from one row of logits (V,), and the `top`
    most likely ids with their log-probabilities, most likely first (ties: the lower id
    first). From the raw logits (before temperature, top-k and top-p), as OpenAI and vLLM
    report them by default. log p_i = z_i - log sum_j exp(z_j), in float64 on the host."""
    np = backend.numpy
    z = backend.to_numpy(_array(logits)).astype("float64")
    log_p = z - z.max()
    log_p -= np.log(np.exp(log_p).sum())
    if top <= 0:
        return float(log_p[token]), []
    # NOTE: not a sort of all V ids (6.4 ms a row for GPT-2's 50,257; this, 0.6-1.3 ms):
    # the top-th largest log p, then the ids at least that likely (ties included), sorted
    V = len(log_p)
    least = log_p.max() if top == 1 else np.partition(log_p, max(V - top, 0))[max(V - top, 0)]
    ids = np.flatnonzero(log_p >= least)
    ids = ids[np.lexsort((ids, -log_p[ids]))][:top]  # likeliest first, ties by id
    return float(log_p[token]), [(int(i), float(log_p[i])) for i in ids]


def top_k_filter(logits: Any, k: int) -> Any:
    """Keep each row's k largest logits, set the others to -inf. (..., V) -> (..., V).

    A logit tied with the k-th largest is kept too: it is exactly as good a choice.
    """
    a = _array(logits)
    xp = backend.xp_of(a)
    V = a.shape[-1]
    if k >= V:
        return a
    kth = xp.sort(a, axis=-1)[..., V - k][..., None]  # (..., 1): the k-th largest logit
    return xp.where(a < kth, -xp.inf, a)


def top_p_filter(logits: Any, p: float) -> Any:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of most probable
    tokens whose total probability is >= p; the others get -inf. (..., V) -> (..., V).

    E.g. probabilities (0.4, 0.3, 0.15, 0.1, 0.05) and p = 0.6 keep the first two (0.7).
    """
    a = _array(logits)
    if p >= 1:
        return a
    xp = backend.xp_of(a)
    probs = softmax(a)
    desc = -xp.sort(-probs, axis=-1)  # (..., V) most probable first
    mass = xp.cumsum(desc, axis=-1)  # (..., V): mass[i] = mass of the i+1 most probable
    # token i (in that order) is needed while the tokens before it hold less than p
    n_keep = 1 + (mass[..., :-1] < p).sum(axis=-1, keepdims=True)  # (..., 1)
    smallest_kept = xp.take_along_axis(desc, n_keep - 1, axis=-1)  # (..., 1)
    return xp.where(probs < smallest_kept, -xp.inf, a)


def make_rng(seed: int | None) -> Any:
    """The host random generator of a sampler: NumPy's, seeded; seed None shares the
    generator that `tinygrad_lite.manual_seed` seeds."""
    if seed is None:
        return backend.generator("cpu")
    if int(seed) != seed or seed < 0:  # (NumPy's own message, "expected non-negative integer", names nothing)
        raise ValueError(f"seed must be an integer >= 0, got {seed}")
    return backend.namespace("cpu").random.default_rng(seed)


def draw(probs: Any, rng: Any) -> list[int]:
    """One id per row of probs (B, V) by inverse transform sampling.

    u ~ U[0, 1) comes from the host generator (a few numbers, not the whole
    distribution, cross to the device); the id is the number of ids whose cumulative
    probability is <= u. A zero-probability id spans an empty interval: never drawn.
    """
    p = _array(probs)
    xp = backend.xp_of(p)
    B, V = p.shape
    cdf = xp.cumsum(p, axis=-1)  # (B, V)
    u = backend.asarray(rng.random((B, 1)), backend.device_of(p)) * cdf[:, -1:]  # rows need not sum to exactly 1
    ids = (cdf <= u).sum(axis=-1)  # (B,)
    return backend.to_numpy(xp.minimum(ids, V - 1)).tolist()


@dataclass
class Sampler:
    """How the next token is chosen from logits: greedy (temperature 0) or a seeded draw
    after temperature, top-k and top-p (in that order)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p)
        self.rng = make_rng(self.seed)

    def probs(self, logits: Any) -> Any:
        """The distribution (..., V) a token is drawn from; one-hot at the argmax when greedy."""
        # NOTE: float64 so top-p's running sums and speculative decoding's ratios p/q
        # are not rounded at float32's 1e-7
        a = _array(logits).astype("float64")
        xp = backend.xp_of(a)
        if self.temperature == 0:
            return (xp.arange(a.shape[-1]) == a.argmax(axis=-1)[..., None]).astype("float64")
        a = apply_temperature(a, self.temperature)
        if self.top_k is not None:
            a = top_k_filter(a, self.top_k)
        if self.top_p is not None:
            a = top_p_filter(a, self.top_p)
        return softmax(a)

    def draw(self, probs: Any) -> list[int]:
        return draw(probs, self.rng)

    def __call__(self, logits: Any) -> list[int]:
        """The next id of each row: logits (B, V) -> B ids."""
        return greedy(logits) if self.temperature == 0 else self.draw(self.probs(logits))
