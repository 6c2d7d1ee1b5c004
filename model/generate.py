"""Generation: turn a trained GPT into a text generator, one token at a time.

A GPT scores, at every position, each possible next token (logits (B, T, V)). To
generate we (1) run the prompt through the model, (2) turn the last position's logits
into a distribution and pick a token from it, (3) append that token and repeat.

Step (1) is the *prefill*: the whole prompt in one parallel pass, which also fills the
KV cache (model/kv_cache.py). Every later step is a *decode*: the one new token goes
through the model and its query attends to the cached keys and values, so a step
costs O(context) instead of re-running the whole O(context^2) sequence. The uncached
path (`use_cache=False`) re-runs the window every step; it stays here as the readable
reference that the tests compare the cache against.

Policies (tested in tests/test_generate.py):
- Empty prompt: a ValueError. The model needs at least one token to condition on, and
  a silent default would hide a bug in the caller; sample.py's default prompt is "\\n".
- Longer than block_size: the model sees a *window* of the sequence. The prompt is
  cropped to its last block_size tokens; when the next token would not fit, the window
  slides so that it holds the last block_size // 2 tokens, the cache is reset and those
  tokens are prefilled again. Keeping half means one re-prefill every block_size / 2
  tokens instead of one per token (sliding by a single token would need a full block
  pass at every step, as the cache's positions would all shift). The uncached path
  follows the same window, so both paths give the same logits at every step.
- Several prompts of different lengths: grouped by length, each group runs as one
  batch. Nothing is padded, so no attention mask is needed (the model has none).
- The model is put in eval mode (no dropout) and left there; every forward pass runs
  under no_grad.
- Sampling filters apply in the order temperature, top-k, top-p; temperature 0 is
  greedy. Draws are inverse-CDF samples whose uniforms come from a seeded host NumPy
  Generator: a seed fixes the samples, and every device gets the same uniforms.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

from tinygrad_lite import Tensor, backend, no_grad

from .attention_plot import attention_maps  # noqa: F401  (re-exported: inspection lives beside plotting)
from .tokenizer import REPLACEMENT_CHAR

from .sampling import (  # noqa: F401  (re-exported: the sampling API lives in sampling.py)
    Sampler, apply_temperature, check_sampling, draw, greedy, make_rng, softmax, top_k_filter, top_p_filter,
)


# ------------------------------------------------------------- the model and its window


class Context:
    """A model, its KV cache, and the window of the token sequence the model sees.

    `logits(rows, last)` feeds the model only the tokens the cache does not hold yet and
    returns the logits of the last `last` positions. With use_cache=False every call
    re-runs the whole window instead. Both follow the window policy of this module.
    """

    def __init__(self, model: Any, batch_size: int, use_cache: bool = True, max_len: int | None = None) -> None:
        model.eval()  # no dropout while generating
        self.model = model
        self.block = model.config.block_size
        self.keep = max(1, self.block // 2)  # tokens kept when the window slides
        # NOTE: a cache as long as the generation needs (max_len tokens, when the caller
        # knows it), not the whole block: each row's keys then lie close together, and a
        # cache that is never read past its end needs no zeroing. 8 x 64-token prompts,
        # 64 new tokens: 76.8 -> 71.6 ms (2-core Xeon VM, alternating runs)
        length = self.block if max_len is None else max(1, min(self.block, max_len))
        self.cache = model.new_cache(batch_size, length) if use_cache else None
        self.device = model.wte.weight.device
        self.start = 0  # index in the sequence of the window's first token
        self.started = False

    def room(self, n: int) -> int:
        """Slide the window if a sequence of n tokens overflows it; return how many more
        tokens fit in it after those n."""
        if n - self.start > self.block:
            # the first window is the prompt's last block_size tokens; later ones keep half
            self.start = n - (self.keep if self.started else self.block)
            if self.cache is not None:
                self.cache.reset()
        self.started = True
        return self.block - (n - self.start)

    def logits(self, rows: Sequence[Sequence[int]], last: int = 1) -> Any:
        """rows: B token lists of one length n -> logits (B, last, V) predicting the tokens
        after each of the last `last` positions."""
        n = len(rows[0])
        self.room(n)
        start_pos = 0
        if self.cache is not None:
            # reuse what the cache holds, but feed at least the positions we need logits for
            self.cache.pos = max(0, min(self.cache.pos, n - self.start - last))
            start_pos = self.cache.pos
        ids = Tensor([row[self.start + start_pos:n] for row in rows], dtype="int64", device=self.device)
        with no_grad():  # entered per call: a suspended generator must not leave it switched on
            wanted = slice(-last, None) if ids.shape[1] > last else None  # (a decode step: its only position)
            logits, _ = self.model(ids, cache=self.cache, start_pos=start_pos, logits_at=wanted)
        return logits.data  # (B, last, V)

    def rollback(self, n_valid: int) -> None:
        """Forget the cached positions of tokens n_valid, n_valid + 1, ... (rejected
        draft tokens): moving `pos` back is enough, later writes overwrite the buffers."""
        if self.cache is not None:
            self.cache.pos = max(0, min(self.cache.pos, n_valid - self.start))


def _steps(model: Any, rows: list[list[int]], max_new_tokens: int, sampler: Sampler,
           use_cache: bool) -> Iterator[tuple[list[int], Any]]:
    """The decode loop everything else shares. rows (B, n) of one length; yields, per
    step, the B new ids and the logits (B, V) they were chosen from."""
    rows = [list(row) for row in rows]
    # the cache holds the prompt and every new token but the last (which is never fed back)
    context = Context(model, len(rows), use_cache, max_len=len(rows[0]) + max_new_tokens - 1)
    for _ in range(max_new_tokens):
        logits = context.logits(rows)[:, -1]  # (B, V): the prefill at step 0, one-token decodes after
        ids = sampler(logits)
        for row, token in zip(rows, ids):
            row.append(token)
        yield ids, logits


# ---------------------------------------------------------------------- stop strings


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class TextFollower:
    """The text of a growing list of generated ids, watching for stop strings.

    `add(id)` returns the new text that is safe to show: text that can no longer become
    part of a stop string, nor of a character whose bytes a later BPE token completes.
    When a stop string appears, `stopped` turns True and it and all after it is dropped.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode, self.stop = decode, tuple(stop)
        self.ids: list[int] = []
        self._done, self._pending = "", []  # text of whole characters; the ids after them
        self.shown = 0  # characters of the text already returned
        self.stopped = False
        self.final_text: str | None = None

    def add(self, token: int) -> str:
        self.ids.append(token)
        self._pending.append(token)
        tail = self.decode(self._pending)  # decode only the ids after the last whole character
        if not tail.endswith(REPLACEMENT_CHAR):
            self._done, self._pending, tail = self._done + tail, [], ""
        text = self._done + tail
        # NOTE: a stop string cannot start before `shown`: such a start would have been held back
        hits = [i for i in (text.find(s, self.shown) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, end = True, min(hits)
            self.final_text = text[:end]
        else:
            end = len(self._done) - _partial_stop(self._done, self.stop)
        piece = text[self.shown:end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return piece

    def finish(self) -> str:
        """The text still held back, once no more ids will come."""
        if self.stopped:
            return ""
        text = self._done + (self.decode(self._pending) if self._pending else "")
        self.final_text = text
        piece, self.shown = text[self.shown:], len(text)
        return piece

    def kept_ids(self) -> list[int]:
        """The ids before the stop string (all of them if none appeared)."""
        if not self.stopped:
            return list(self.ids)
        n = len(self.ids)  # drop ids from the end until their text ends before the stop string
        while n and len(self.decode(self.ids[:n])) > len(self.final_text):
            n -= 1
        return self.ids[:n]


def text_stream(tokens: Iterable[int], decode: Callable[[list[int]], str],
                stop: Sequence[str] = ()) -> Iterator[str]:
    """Text pieces of a token stream as soon as they are safe to show, ending before the
    first stop string."""
    follower = TextFollower(decode, _check_stops(stop))
    for token in tokens:
        piece = follower.add(token)
        if piece:
            yield piece
        if follower.stopped:
            return
    piece = follower.finish()
    if piece:
        yield piece


# -------------------------------------------------------------------- validation


def _check_stops(stop: Sequence[str] | str) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not isinstance(s, str) or s == "" for s in stops):
        raise ValueError("stop strings must be non-empty strings")
    return stops


def _check_max_new_tokens(max_new_tokens: int) -> None:
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")


def prompt_rows(model: Any, prompt: Sequence, num_samples: int = 1) -> list[list[int]]:
    """prompt: one list of ids, or a list of several; each repeated num_samples times,
    prompt by prompt. Checks the policy: no empty prompt, every id in the vocabulary."""
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples}")
    nested = len(prompt) > 0 and (isinstance(prompt[0], (list, tuple)) or getattr(prompt[0], "ndim", 0) >= 1)
    prompts = [[int(t) for t in p] for p in (prompt if nested else [prompt])]
    V = model.config.vocab_size
    for p in prompts:
        if not p:
            raise ValueError("the prompt is empty: give at least one token (e.g. the id of '\\n')")
        bad = [t for t in p if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{V - 1})")
    return [p for p in prompts for _ in range(num_samples)]


# -------------------------------------------------------------------- the public API


def stream(model: Any, prompt: Sequence, max_new_tokens: int, *, num_samples: int = 1,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           seed: int | None = None, use_cache: bool = True) -> Iterator[list[int]]:
    """Yield the B new ids of every step as soon as they are chosen (B = prompts x
    num_samples; the prompts must share one length). Arguments are checked at the call."""
    rows = _equal_rows(model, prompt, num_samples)
    _check_max_new_tokens(max_new_tokens)
    sampler = Sampler(temperature, top_k, top_p, seed)
    return (ids for ids, _ in _steps(model, rows, max_new_tokens, sampler, use_cache))


def generate(model: Any, prompt: Sequence, max_new_tokens: int, *, num_samples: int = 1,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, use_cache: bool = True, stop: Sequence[str] = (),
             decode: Callable[[list[int]], str] | None = None) -> list[list[int]]:
    """The new token ids of every row (prompts x num_samples, prompt by prompt), without
    the prompt. A row ends after max_new_tokens, or before the first stop string in its
    decoded text (stop strings need `decode`, the tokenizer's decode)."""
    rows = prompt_rows(model, prompt, num_samples)
    _check_max_new_tokens(max_new_tokens)
    stops = _check_stops(stop)
    if stops and decode is None:
        raise ValueError("stop strings need decode= (the tokenizer's decode)")
    sampler = Sampler(temperature, top_k, top_p, seed)
    followers = [TextFollower(decode, stops) if stops else None for _ in rows]
    out: list[list[int]] = [[] for _ in rows]
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(rows):  # one batch per prompt length: no padding, no mask
        groups.setdefault(len(row), []).append(i)
    for members in groups.values():
        for ids, _ in _steps(model, [rows[i] for i in members], max_new_tokens, sampler, use_cache):
            for i, token in zip(members, ids):
                if followers[i] is None:
                    out[i].append(token)
                elif not followers[i].stopped:
                    followers[i].add(token)
            if all(followers[i] is not None and followers[i].stopped for i in members):
                break  # every row of the group hit a stop string
    for i, follower in enumerate(followers):
        if follower is not None:
            out[i] = follower.kept_ids()
    return out


def generate_with_logits(model: Any, prompt: Sequence, max_new_tokens: int, *, num_samples: int = 1,
                         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         seed: int | None = None, use_cache: bool = True) -> tuple[list[list[int]], Any]:
    """Like `stream`, collected: the new ids (B, N) and the host array of logits (B, N, V)
    each token was chosen from (for comparing the cached and uncached paths). Greedy by
    default; logits is None when max_new_tokens is 0."""
    _check_max_new_tokens(max_new_tokens)
    ids, steps = [], []
    for step_ids, logits in _steps(model, _equal_rows(model, prompt, num_samples), max_new_tokens,
                                   Sampler(temperature, top_k, top_p, seed), use_cache):
        ids.append(step_ids)
        steps.append(logits)
    if not steps:
        return [[] for _ in _equal_rows(model, prompt, num_samples)], None
    xp = backend.xp_of(steps[0])
    return [list(row) for row in zip(*ids)], backend.to_numpy(xp.stack(steps, axis=1))  # (B, N, V)


def _equal_rows(model: Any, prompt: Sequence, num_samples: int) -> list[list[int]]:
    rows = prompt_rows(model, prompt, num_samples)
    if len({len(r) for r in rows}) > 1:
        raise ValueError("prompts of different lengths: use generate(), which batches them by length")
    return rows
