"""Serving many users: an engine that batches requests continuously over a paged KV cache.

generate() runs a batch from start to end: a request that arrives meanwhile waits for
the whole batch, and a row that finishes early idles until the longest one is done. An
inference server (vLLM, TGI) instead schedules *every step*:

- **Continuous batching.** Between two steps, finished requests leave and waiting ones
  join, up to `max_batch_size` sequences and `max_step_tokens` tokens a step. One step
  is one forward pass over every scheduled sequence, whatever its length: the new
  tokens of all of them are packed side by side in one row, each at its own position,
  and each attends to its own keys and values (model/paged_batch.py). A running
  sequence brings its one new token (decode); a new one brings its prompt (prefill),
  cut into chunks when the step's token budget is smaller.
- **Paged KV cache.** Keys and values live in a pool of pages; a sequence takes pages
  as it grows. When the pool runs dry, the newest request is *preempted*: its pages go
  back, it returns to the front of the queue, and when it is readmitted its tokens so
  far (prompt and output) are computed again.
- **Prefix caching.** Requests that start alike (one system prompt) share the pages of
  that prefix, and their prefill starts after it.
- Each request samples with its own settings and its own seeded random numbers, so a
  seeded request gives the same tokens alone or in a busy batch. It ends at
  max_new_tokens, at a stop string, at the tokenizer's end-of-turn token (a chat
  model's <|end|>), or when cancelled.

The batch-size trade-off this buys, measured: lab/batching.py; the HTTP front: serve.py.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

from tinygrad_lite import backend, no_grad

from . import fast_decode
from .generate import TextFollower, _check_stops
from .paged_batch import PagedBatch
from .paged_kv_cache import PagedKVCache, page_key
from .prepared_decode import PreparedDecode
from .sampling import Sampler, token_log_prob

MAX_LOGPROBS = 20  # alternatives a request may ask to see beside each token (as vLLM's default limit)


class RequestError(ValueError):
    """A request the engine cannot serve (too long, bad settings): the server's 400."""


@dataclass(eq=False)
class Request:
    """One request's tokens, settings, pages and timings (time.perf_counter() seconds)."""

    id: int
    prompt: list[int]
    max_new_tokens: int
    sampler: Sampler
    follower: TextFollower | None  # watches for stop strings (needs the tokenizer)
    output: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)  # the block table
    page_keys: list[int] = field(default_factory=list)  # prefix keys of its full pages so far
    num_cached: int = 0  # tokens whose keys and values are in its pages
    prefix_tokens: int = 0  # prompt tokens whose prefill the prefix cache saved
    finish_reason: str | None = None  # "length", "stop" or "cancelled" once finished
    queued: float = 0.0
    first_token: float | None = None
    finished: float | None = None
    cancel_requested: bool = False
    admissions: int = 0  # times it entered the running batch (a preempted one comes back)
    sequence: int = -1  # names what its pages hold while it runs (PagedBatch's sequence id): new at each admission
    text: str = ""  # the text so far, without a stop string (with a tokenizer)
    logprobs: int | None = None  # report each token's log-probability and this many alternatives (None: don't)
    token_logprobs: list = field(default_factory=list)  # per output token: (id, log p, [(id, log p) x logprobs])
    prompt_logprobs: int | None = None  # score the prompt too: each token after the first, with these alternatives
    prompt_token_logprobs: list = field(default_factory=list)  # per prompt token from the second: as token_logprobs
    tokens: list[int] = field(init=False)  # prompt + output, kept as one list (read every step)

    def __post_init__(self) -> None:
        self.tokens = self.prompt + self.output

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def result(self) -> list[int]:
        """The generated ids, without the stop string's."""
        return self.follower.kept_ids() if self.follower is not None and self.follower.stopped else list(self.output)

    def result_logprobs(self) -> list:
        """token_logprobs of the ids result() returns."""
        return self.token_logprobs[:len(self.result())]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, interpolated between the two nearest ranks (NumPy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    at = (len(ordered) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def latency_summary(requests: Sequence[Request], seconds: float) -> dict:
    """What a workload of finished requests got: generated tokens, tokens/s over `seconds`,
    and the time to first token (TTFT, from submit) and time per output token after it
    (TPOT) in ms, p50 and p99."""
    ttft = [1000 * (r.first_token - r.queued) for r in requests]
    tpot = [1000 * (r.finished - r.first_token) / (len(r.output) - 1) for r in requests if len(r.output) > 1]
    tokens = sum(len(r.output) for r in requests)
    return {"generated_tokens": tokens, "tokens_per_s": tokens / seconds,
            "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
            "tpot_ms_p50": percentile(tpot, 50), "tpot_ms_p99": percentile(tpot, 99)}


class Engine:
    """Continuous batching over a paged KV cache. Not thread-safe: one thread steps it
    (serve.py's engine thread); others hand it requests through that thread.

    Engine(model, max_batch_size, page_size, num_blocks, tokenizer=None):
      - submit(prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
        seed=None, stop=(), logprobs=None, prompt_logprobs=None) -> request id (logprobs=k:
        record each token's log-probability and its k most likely alternatives, in
        request(id).token_logprobs; prompt_logprobs=k: the prompt's tokens' too, from the
        second on, in request(id).prompt_token_logprobs: how likely the model finds a text);
      - step() -> {request id: [ids emitted this step]}; run() -> {request id: ids};
      - cancel(id); request(id) (timings, finish reason); free_blocks, num_blocks,
        prefix_hits (pages reused), prefix_hit_tokens (prompt tokens not recomputed).
    max_step_tokens is the token budget of one step; prefix_caching=False turns sharing off
    (lab/batching.py measures what it saves), and then nothing is kept for later requests.
    prepared_decode=False runs steady decode steps through the model's lean step, not the
    prepared one (model/prepared_decode.py; the same logits, slower).
    """

    def __init__(self, model: Any, max_batch_size: int = 8, page_size: int = 16, num_blocks: int = 256,
                 tokenizer: Any = None, max_step_tokens: int = 2048, prefix_caching: bool = True,
                 prepared_decode: bool = True) -> None:
        for name, value in (("max_batch_size", max_batch_size), ("page_size", page_size),
                            ("num_blocks", num_blocks), ("max_step_tokens", max_step_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if max_step_tokens < max_batch_size:
            raise ValueError(f"max_step_tokens ({max_step_tokens}) must be >= max_batch_size "
                             f"({max_batch_size}): every running sequence decodes a token each step")
        model.eval()
        c = model.config
        self.model, self.tokenizer = model, tokenizer or getattr(model, "tokenizer", None)
        self.max_batch_size, self.page_size, self.max_step_tokens = max_batch_size, page_size, max_step_tokens
        self.cache = PagedKVCache(c.n_layer, num_blocks, page_size, c.n_head, c.n_embd // c.n_head,
                                  dtype=model.wte.weight.dtype, device=model.wte.weight.device,
                                  prefix_caching=prefix_caching)
        self.pool = self.cache.pool
        self.end_id = getattr(self.tokenizer, "end_of_turn", None)  # a chat model's <|end|>
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._sequences = itertools.count()  # (an int per admission: cheap to hash, every layer of every step)
        self.prefix_hits = 0
        self.prefix_hit_tokens = 0
        self.computed_tokens = 0  # tokens run through the model (prefill, recomputation, decode)
        self.preemptions = 0
        self.forward_passes = 0
        self._cancels = 0  # cancel() calls since the last step
        self._view: PagedBatch | None = None  # the last forward's layout of the batch (_forward)
        self._row: list[Request] = []  # the last forward's requests, in the order of its row
        self._regrouped = True  # has a sequence joined, left or been preempted since then?
        self.prepared_decode = prepared_decode
        self._prepared: PreparedDecode | None = None  # (its buffers: made at the first steady step)

    # --- the public API -----------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def prefix_caching(self) -> bool:
        return self.cache.prefix_caching  # (the cache's rule for prompt rows follows it too)

    def submit(self, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop: Sequence[str] = (), logprobs: int | None = None, prompt_logprobs: int | None = None) -> int:
        """Queue a request; returns its id. Refused (RequestError) when it cannot be served."""
        prompt = [int(t) for t in prompt_ids]
        block_size, vocab = self.model.config.block_size, self.model.config.vocab_size
        if not prompt:
            raise RequestError("the prompt is empty: the model needs at least one token")
        if any(not 0 <= t < vocab for t in prompt):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if len(prompt) + max_new_tokens > block_size:
            raise RequestError(f"the prompt ({len(prompt)} tokens) plus max_new_tokens ({max_new_tokens}) "
                               f"is longer than the model's context of {block_size} tokens")
        if -(-(len(prompt) + max_new_tokens) // self.page_size) > self.num_blocks:
            raise RequestError(f"the request needs more than the cache's {self.num_blocks} pages of "
                               f"{self.page_size} tokens")
        try:
            stops = _check_stops(stop)
            sampler = Sampler(temperature, top_k, top_p, seed)
        except ValueError as error:
            raise RequestError(str(error)) from None
        if stops and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer (Engine(..., tokenizer=...))")
        for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if value is not None and (type(value) is not int or not 0 <= value <= MAX_LOGPROBS):
                raise RequestError(f"{name} must be an integer in 0..{MAX_LOGPROBS} (or None), got {value!r}")
        follower = TextFollower(self.tokenizer.decode, stops) if self.tokenizer is not None else None
        request = Request(next(self._ids), prompt, max_new_tokens, sampler, follower, queued=time.perf_counter(),
                          logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        self.requests[request.id] = request
        self.waiting.append(request)
        return request.id

    def cancel(self, request_id: int) -> None:
        """Stop a request at the next step (a client that went away); its pages go back."""
        request = self.requests.get(request_id)
        if request is not None and not request.done:
            request.cancel_requested = True
            self._cancels += 1

    def request(self, request_id: int) -> Request:
        return self.requests[request_id]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self) -> dict[int, list[int]]:
        """Step until every request is done; {request id: generated ids} of all of them."""
        while self.has_work():
            self.step()
        return {rid: r.result() for rid, r in self.requests.items()}

    def step(self) -> dict[int, list[int]]:
        """One scheduler step and (at most) one forward pass: {request id: ids emitted}."""
        emitted: dict[int, list[int]] = {}
        if self._cancels:
            for request in [r for r in (*self.running, *self.waiting) if r.cancel_requested]:
                self._finish(request, "cancelled")
                emitted[request.id] = []
            self._cancels = 0
        batch = self._schedule()
        if batch:
            due, logits = self._forward(batch)
            greedy = logits.argmax(axis=-1).tolist()  # one call for every greedy request (host logits)
            now = time.perf_counter()
            for i, request in enumerate(due):
                token = greedy[i] if request.sampler.temperature == 0 else request.sampler(logits[i:i + 1])[0]
                if request.logprobs is not None:
                    request.token_logprobs.append((token, *token_log_prob(logits[i], token, request.logprobs)))
                emitted[request.id] = [token]
                self._append(request, token, now)
        if not self.running:  # idle (finished or cancelled): the pages take the full pages only copies held
            self.cache.settle()
        return emitted

    # --- scheduling ------------------------------------------------------------------------

    def _schedule(self) -> list[tuple[Request, int]]:
        """Which requests compute how many tokens this step: the running ones first (oldest
        first), then waiting ones while there is room in the batch, the budget and the pool."""
        budget, batch, preempted = self.max_step_tokens, [], set()
        for request in list(self.running):
            if request in preempted:  # preempted below, to make room for an older one
                continue
            n = min(len(request.tokens) - request.num_cached, budget)
            # NOTE: n is never 0 as things are scheduled (a chunk that leaves a prompt unfinished
            # takes the whole budget, so nobody newer is admitted while a prompt is mid-way)
            if n == 0:  # (a guard: no budget left for it, it waits a step)
                continue
            while not self._reserve(request, n):
                victim = self.running[-1]  # the newest
                self._preempt(victim)
                preempted.add(victim)
                if victim is request:
                    break
            else:
                batch.append((request, n))
                budget -= n
        starting: set[int] = set()  # keys of the first full pages that requests admitted now compute
        while self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            request = self.waiting[0]
            hits, computes = self._reuse_prefix(request)
            if computes in starting:  # another request computes that page right now: share it next step
                self._release(request)  # (it waits holding nothing)
                break
            n = min(len(request.tokens) - request.num_cached, budget)
            if not self._reserve(request, n):
                self._release(request)  # the pool is full: it waits for pages, holding none
                break
            if computes is not None:
                starting.add(computes)
            self.prefix_hits += hits
            self.prefix_hit_tokens += hits * self.page_size
            request.prefix_tokens += hits * self.page_size
            self.waiting.popleft()
            self.running.append(request)
            self._regrouped = True
            request.admissions += 1
            request.sequence = next(self._sequences)
            batch.append((request, n))
            budget -= n
        return batch

    def _reserve(self, request: Request, n: int) -> bool:
        """Pages for the request's first num_cached + n tokens, if the pool has them."""
        needed = -(-(request.num_cached + n) // self.page_size) - len(request.pages)
        if needed <= 0:  # (most decode steps: the last page has room)
            return True
        if needed > self.pool.num_free:
            return False
        request.pages += [self.pool.allocate() for _ in range(needed)]
        return True

    def _preempt(self, request: Request) -> None:
        """Give back the request's pages; it waits at the front, to be computed again."""
        self._release(request)
        self.running.remove(request)
        self._regrouped = True
        self.waiting.appendleft(request)
        self.preemptions += 1

    def _release(self, request: Request) -> None:
        for page in request.pages:
            self.pool.release(page)
        request.pages, request.page_keys, request.num_cached = [], [], 0

    def _reuse_prefix(self, request: Request) -> tuple[int, int | None]:
        """Hold the cached pages that hold the start of the request's tokens, so their
        prefill is skipped. Returns how many, and the prefix key of the first full page it
        must compute itself (None if none). The last token is always computed: its logits
        choose the next token, so a page that holds it is never reused. (Nor any page of a
        request that scores its prompt: it wants the logits of every prompt position.)"""
        tokens, page = request.tokens, self.page_size
        key = None
        for i in range((len(tokens) - 1) // page if self.prefix_caching and request.prompt_logprobs is None else 0):
            chunk = tokens[i * page:(i + 1) * page]
            key = page_key(key, chunk)
            hit = self.pool.lookup(key, chunk)
            if hit is None:
                return len(request.pages), key
            self.pool.hold(hit)
            request.pages.append(hit)
            request.page_keys.append(key)
            request.num_cached += page
        return len(request.pages), None

    # --- the forward pass and its results ---------------------------------------------------

    def _forward(self, batch: list[tuple[Request, int]]) -> tuple[list[Request], Any]:
        """One forward pass over the batch's new tokens, packed in one row. Returns the R
        requests whose known tokens are now all computed, and their host logits (R, V)."""
        view = None
        if not self._regrouped and len(batch) == len(self._row) and all(n == 1 for _, n in batch):
            view = self._view.next_step()  # last step's sequences, one token each (None unless all in the slab)
        if view is not None:  # their tokens in the order the slab wants (the last row's, or its slots')
            if view.order is not None:
                slot = {sequence: i for i, sequence in enumerate(view.order)}
                self._row.sort(key=lambda request: slot[request.sequence])
            batch = [(request, 1) for request in self._row]
        else:
            self._row = [request for request, _ in batch]
        ids, wanted, due, is_due = [], [], [], []
        scoring: list[Request | None] = []  # per wanted column: the request whose prompt it scores (None: due)
        for request, n in batch:
            start = request.num_cached
            ids += request.tokens[start:start + n]
            if request.prompt_logprobs is not None:  # position p's logits score prompt token p + 1
                for position in range(max(start, len(request.prompt_token_logprobs)),  # (none twice, if recomputed)
                                      min(start + n, len(request.prompt) - 1)):
                    wanted.append(len(ids) - n + position - start)
                    scoring.append(request)
            is_due.append(start + n == len(request.tokens))  # the whole sequence is in: its next token is due
            if is_due[-1]:
                wanted.append(len(ids) - 1)
                scoring.append(None)
                due.append(request)
        if view is None:
            view = PagedBatch(self.cache, [(r.sequence, r.pages, r.num_cached, n, len(r.prompt) + r.max_new_tokens, d)
                                           for (r, n), d in zip(batch, is_due)])
        device = self.cache.device
        columns = wanted or [len(ids) - 1]  # (only prefill chunks: their keys and values are the point)
        at = None if len(columns) == len(ids) else backend.asarray(columns, device)  # None: all (decode)
        with no_grad():
            if self.prepared_decode and view.plan is not None and view.plan.steady and \
                    fast_decode.applies(self.model, view, None):  # (the lean step's conditions hold)
                if self._prepared is None:
                    self._prepared = PreparedDecode(self.model, self.max_batch_size)
                logits = self._prepared(ids, self.cache.slab, view.plan.decode)  # (S, V)
            else:
                logits = self.model(backend.asarray([ids], device), cache=view, logits_at=at)[0].data[0]
        self._view, self._regrouped = view, False
        self.forward_passes += 1
        self.computed_tokens += len(ids)
        for request, n in batch:
            request.num_cached += n
            if self.prefix_caching and request.num_cached // self.page_size > len(request.page_keys):
                self._register_full_pages(request)  # (without a prefix cache, nobody would look them up)
        rows = backend.to_numpy(logits)[:len(wanted)]
        if len(wanted) > len(due):  # some rows score prompts
            rows = self._score_prompts(rows, scoring)
        return due, rows  # (R, V)

    @staticmethod
    def _score_prompts(rows, scoring: list) -> Any:
        """Record the prompt tokens' log-probabilities from their rows of logits; the rest of
        the rows (the due requests')."""
        for row, request in zip(rows, scoring):
            if request is not None:
                token = request.prompt[len(request.prompt_token_logprobs) + 1]
                request.prompt_token_logprobs.append((token, *token_log_prob(row, token, request.prompt_logprobs)))
        return rows[[i for i, request in enumerate(scoring) if request is None]]

    def _register_full_pages(self, request: Request) -> None:
        """Offer the request's newly full pages to the prefix cache."""
        tokens, page = request.tokens, self.page_size
        for i in range(len(request.page_keys), request.num_cached // page):
            key = page_key(request.page_keys[-1] if request.page_keys else None, tokens[i * page:(i + 1) * page])
            request.page_keys.append(key)
            self.pool.register(request.pages[i], key, tokens[i * page:(i + 1) * page])

    def _append(self, request: Request, token: int, now: float) -> None:
        if request.first_token is None:
            request.first_token = now
        request.output.append(token)
        request.tokens.append(token)
        if token == self.end_id:  # the end of the turn: among the ids, not in the text
            return self._finish(request, "stop")
        if request.follower is not None:
            request.text += request.follower.add(token)
            if request.follower.stopped:
                return self._finish(request, "stop")
        if len(request.output) >= request.max_new_tokens:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str) -> None:
        if request.follower is not None and not request.follower.stopped:
            request.text += request.follower.finish()  # what it held back for a possible stop string
        request.finish_reason, request.finished = reason, time.perf_counter()
        self._release(request)
        if request in self.running:
            self.running.remove(request)
            self._regrouped = True
        elif request in self.waiting:
            self.waiting.remove(request)
