"""The serving engine (model/serving.py): continuous batching over a paged KV cache gives
every request what generate() gives it alone; prefix pages are shared and their prefill
skipped; preemption, chunked prefill, stopping, cancellation and refusals. Tiny random
models; the file also runs with TINYGRAD_LITE_DEVICE=strict.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, strategies as st

import tinygrad_lite
from tinygrad_lite import backend
from model.chat import ChatTokenizer
from model.generate import generate
from model.gpt import GPT, GPTConfig
from model.serving import Engine, RequestError
from model.tokenizer import CharTokenizer
from reference_logprobs import log_softmax_of

TEXT = "abcdefghijklmnopqrstuvwxyz .,!?"


def tiny_gpt(pos: str = "learned", seed: int = 0, **overrides) -> GPT:
    config = dict(vocab_size=len(TEXT), block_size=64, n_layer=2, n_head=2, n_embd=16, pos=pos)
    config.update(overrides)
    tinygrad_lite.manual_seed(seed)
    return GPT(GPTConfig(**config))


def prompts(lengths, seed: int = 0, vocab: int = len(TEXT)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def alone(model: GPT, prompt: list[int], n: int, **sampling) -> list[int]:
    return generate(model, [prompt], n, temperature=sampling.pop("temperature", 0.0), **sampling)[0]


def poisoned(engine: Engine) -> Engine:
    """The engine with NaN in every page: the pool starts as zeros, and a row that never
    reached its page would read those without anyone noticing."""
    for pool in engine.cache.k + engine.cache.v:
        pool[...] = float("nan")
    return engine


def assert_pool_is_empty(engine: Engine) -> None:
    assert engine.free_blocks == engine.num_blocks
    assert engine.pool.ref_counts == [0] * engine.num_blocks


# --- the engine's outputs are generate()'s ------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("staggered", [False, True])
def test_the_lean_step_gives_the_engine_the_usual_paths_logits(bias, staggered, monkeypatch):
    # model/fast_decode.py runs every engine step (prefills and decodes) straight through
    # the fast kernels; with it switched off, each step goes through the ops. Sequences
    # of one length decode the same on both paths, to the bit; sequences of different
    # lengths (staggered arrivals) decode in one masked call on the lean path and each
    # over its own keys on the usual one: the same logits to rounding
    from model import fast_decode, paged_batch
    model = tiny_gpt(bias=bias)
    logits, steady = {}, []
    real_next = paged_batch.PagedBatch.next_step
    monkeypatch.setattr(paged_batch.PagedBatch, "next_step", lambda self: steady.append(real_next(self)) or steady[-1])
    for lean in (True, False):
        engine = poisoned(Engine(model, max_batch_size=4, page_size=4, num_blocks=32))
        seen = logits[lean] = []
        engine._forward = _recording(engine, seen)
        with monkeypatch.context() as m:
            if not lean:
                m.setattr(fast_decode, "applies", lambda *a: False)
            for i, p in enumerate(prompts([5, 9, 3, 7] if staggered else [6, 6, 6], seed=4)):
                engine.submit(p, 6 + i if staggered else 9, temperature=0)
                if staggered:
                    engine.step()
            engine.run()
    assert len(logits[True]) == len(logits[False]) > 8
    assert any(view is not None for view in steady)  # steady steps went on from the step before
    for lean, usual in zip(logits[True], logits[False]):
        if staggered:
            np.testing.assert_allclose(lean, usual, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(lean, usual)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("staggered", [False, True])
@pytest.mark.parametrize("rule", ["one_thread", "per_product", "attention_in_blocks"])
def test_the_prepared_decode_step_gives_the_lean_steps_logits_to_the_bit(bias, staggered, rule, monkeypatch):
    # model/prepared_decode.py runs the engine's steady decode steps with buffers kept
    # from step to step (and, for small products, BLAS on one thread for the whole step):
    # the lean step's kernels in its order, so the same logits to the bit, with sequences
    # of one length and of different ones (masked), and one sequence alone at the end.
    # Every layer norm's weight and bias and every bias are random, so that none of them
    # can stand for another, nor be left out unseen
    from tinygrad_lite import cpu
    from model import fast_decode
    from model.prepared_decode import PreparedDecode
    if rule == "per_product":  # every product "large": the step leaves BLAS's threads to small_matmul
        monkeypatch.setattr(cpu, "ONE_THREAD_MACS", 0)
    if rule == "attention_in_blocks":  # (a big batch's decode: attention by the tier's op, into the buffer)
        monkeypatch.setattr(fast_decode, "SPLIT_MIN_SIZE", 1)
    model = tiny_gpt(bias=bias)
    rng = np.random.default_rng(5)
    for name, param in model.named_parameters():
        if param.data.ndim == 1:  # layer norms' weights (around 1) and biases, Linear biases
            values = (1.0 if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight"
                      else 0.0) + 0.3 * rng.standard_normal(param.data.shape)
            param.data = backend.asarray(values.astype(np.float32), model.wte.weight.device)
    if bias:  # and one weight row-major (an array someone put there): linear_rows's other product
        model.h[0].mlp.c_fc.weight.data = np.ascontiguousarray(backend.to_numpy(model.h[0].mlp.c_fc.weight.data))
        model.h[0].mlp.c_fc.weight.data = backend.asarray(model.h[0].mlp.c_fc.weight.data, model.wte.weight.device)
    logits, prepared, one_thread = {}, [], []
    real, real_threads = PreparedDecode.__call__, cpu.threads
    monkeypatch.setattr(PreparedDecode, "__call__",
                        lambda self, ids, *a: prepared.append(len(ids)) or real(self, ids, *a))
    monkeypatch.setattr(cpu, "threads", lambda n: one_thread.append(n) or real_threads(n))
    for on in (True, False):
        engine = poisoned(Engine(model, max_batch_size=4, page_size=4, num_blocks=32, prepared_decode=on))
        seen = logits[on] = []
        engine._forward = _recording(engine, seen)
        for i, p in enumerate(prompts([5, 9, 3, 7] if staggered else [6, 6, 6], seed=4)):
            engine.submit(p, 6 + 2 * i if staggered else 9, temperature=0)
            if staggered:
                engine.step()
        engine.run()
        assert_pool_is_empty(engine)
        if on:
            calls, switches = len(prepared), len(one_thread)
    assert (len(prepared), len(one_thread)) == (calls, switches)  # switched off: the lean step throughout
    assert len(logits[True]) == len(logits[False]) > 8
    for with_it, without in zip(logits[True], logits[False]):
        np.testing.assert_array_equal(with_it, without)
    assert len(prepared) > len(logits[True]) // 2 and (1 in prepared) == staggered  # most steps; alone at the end
    assert max(prepared) == (4 if staggered else 3)
    small_steps = sum(n > 1 for n in prepared)  # (one sequence: a matrix-vector product, left to BLAS's threads)
    on_host = backend.device_of(model.wte.weight.data) == "cpu"
    assert one_thread == [1] * (small_steps if rule != "per_product" and on_host else 0)


def logits_by_request(engine: Engine) -> dict:
    """Record, from now on, the logits each request's tokens are chosen from: {id: [(V,)]}.
    (A tiny random model's greedy tokens hardly depend on attention; its logits do.)"""
    seen, real = {}, engine._forward

    def forward(batch):
        due, logits = real(batch)
        for request, row in zip(due, logits):
            seen.setdefault(request.id, []).append(row.copy())
        return due, logits
    engine._forward = forward
    return seen


def assert_logits_are_generates(model: GPT, seen: dict, wanted: dict) -> None:
    """Each request's logits (logits_by_request) are generate()'s on its prompt alone."""
    from model.generate import generate_with_logits
    for rid, (prompt, n) in wanted.items():
        np.testing.assert_allclose(np.stack(seen[rid]), generate_with_logits(model, [prompt], n)[1][0],
                                   rtol=1e-5, atol=1e-6, err_msg=str(rid))


def _recording(engine: Engine, seen: list):
    """engine._forward, keeping a copy of each step's logits in `seen`."""
    real = engine._forward

    def forward(batch):
        due, logits = real(batch)
        seen.append(logits.copy())
        return due, logits
    return forward


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_ragged_requests_arriving_while_others_decode_equal_generate_alone(pos):
    model = tiny_gpt(pos)
    engine = Engine(model, max_batch_size=4, page_size=4, num_blocks=64)
    seen = logits_by_request(engine)
    first = prompts([5, 9])
    shared = prompts([10])[0]  # a prefix two later requests share (2.5 pages)
    later = [shared + [1, 2], shared + [3], prompts([3], seed=1)[0]]
    wanted = {}
    for p in first:
        wanted[engine.submit(p, 12, temperature=0)] = (p, 12)
    for _ in range(4):  # the first two are decoding when the others arrive
        engine.step()
    for p in later:
        wanted[engine.submit(p, 10, temperature=0)] = (p, 10)
    results = engine.run()
    for rid, (p, n) in wanted.items():
        assert results[rid] == alone(model, p, n), rid
    assert_logits_are_generates(model, seen, wanted)
    assert engine.prefix_hits >= 2  # the second user of `shared` found its 2 full pages
    assert_pool_is_empty(engine)


def assert_full_pages_hold(engine: Engine, model: GPT, tokens: list[int]) -> None:
    """Every full page of `tokens` is in the prefix cache and holds, in every layer, what
    a contiguous cache holds for those positions."""
    from model.paged_kv_cache import page_key
    from tinygrad_lite import Tensor, backend, no_grad
    cache, page_size, key = model.new_cache(1), engine.page_size, None
    with no_grad():
        model(Tensor([tokens], dtype="int64"), cache=cache)
    for i in range(len(tokens) // page_size):
        chunk = tokens[page_size * i:page_size * (i + 1)]
        key = page_key(key, chunk)
        page = engine.pool.lookup(key, chunk)
        assert page is not None, i
        for layer in range(model.config.n_layer):
            for pool, contiguous in ((engine.cache.k, cache.k), (engine.cache.v, cache.v)):
                np.testing.assert_allclose(
                    backend.to_numpy(pool[layer][page]),
                    backend.to_numpy(contiguous[layer][0, :, page_size * i:page_size * (i + 1)]).transpose(1, 0, 2),
                    rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_pages_filled_while_decoding_hold_the_keys_and_values_of_a_contiguous_cache(pos):
    # while a sequence decodes, its rows reach the pages only when it leaves the slab, when
    # a step reads pages, or when the engine goes idle (PagedBatch.attend's write-back); every
    # full page must then hold what generate()'s contiguous cache holds for those
    # positions, and serve a later prefix hit
    model = tiny_gpt(pos)
    engine = poisoned(Engine(model, max_batch_size=4, page_size=4, num_blocks=64))
    first = prompts([5, 7, 6])
    rids = [engine.submit(p, n, temperature=0) for p, n in zip(first, (21, 13, 17))]  # they leave one by one
    results = engine.run()
    for rid, p in zip(rids, first):
        assert_full_pages_hold(engine, model, p + results[rid][:-1])  # (the last token's keys were never computed)
    later = [p + results[rid][:-1] for p, rid in zip(first, rids)]  # starts with pages filled by decoding
    hits = engine.prefix_hits
    again = [engine.submit(p, 6, temperature=0) for p in later]
    results = engine.run()
    assert engine.prefix_hits - hits == sum((len(p) - 1) // 4 for p in later)
    for rid, p in zip(again, later):
        assert results[rid] == alone(model, p, 6)
    assert_pool_is_empty(engine)


def decoded_a_while(model: GPT, first: list[list[int]]) -> tuple[Engine, list[int]]:
    """A poisoned engine (pages of 4) after a prefill of 4-token prompts and 9 decode
    steps of their 20 new tokens each: the request ids."""
    engine = poisoned(Engine(model, max_batch_size=4, page_size=4, num_blocks=64))
    rids = [engine.submit(p, 20, temperature=0) for p in first]
    for _ in range(10):
        engine.step()
    return engine, rids


def test_a_prefix_hit_on_a_page_a_running_group_filled_while_decoding_reads_its_rows():
    # the page holding a decoding request's newest full page of output waits in the
    # slab; a request arriving meanwhile whose prompt starts with that prompt and output
    # shares the page, so the slab's rows must reach the pages first
    model = tiny_gpt()
    first = prompts([4, 4], seed=5)
    engine, rids = decoded_a_while(model, first)  # pages 1 and 2 (positions 4-11) filled while decoding
    grown = first[0] + engine.request(rids[0]).output[:8]  # 12 tokens: 3 full pages, 2 of them decoded
    hits = engine.prefix_hits
    late = engine.submit(grown, 5, temperature=0)
    results = engine.run()
    assert engine.prefix_hits - hits == 2  # pages 0 and 1 (the third is computed: its last token's logits are needed)
    assert results[late] == alone(model, grown, 5)
    for rid, p in zip(rids, first):
        assert results[rid] == alone(model, p, 20)
        # the rows of the page it was filling then (held: it goes on) reached the page too,
        # so that page, full later, holds all of them
        assert_full_pages_hold(engine, model, p + results[rid][:-1])
    assert_pool_is_empty(engine)


def test_the_pages_hold_a_cancelled_requests_decoded_rows_once_nothing_runs():
    # cancelling the last running request leaves the engine idle in a step that runs no
    # forward pass; the full pages its decoding filled (only in the slab until then) must
    # reach the pool there too, so that a prefix hit can revive them
    model = tiny_gpt()
    prompt = prompts([4], seed=7)[0]
    engine, (rid,) = decoded_a_while(model, [prompt])  # pages 1 and 2 filled while decoding
    engine.cancel(rid)
    engine.step()
    assert not engine.has_work() and engine.request(rid).finish_reason == "cancelled"
    output = engine.request(rid).output
    assert_full_pages_hold(engine, model, prompt + output[:-1])


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_only_rows_someone_could_read_are_copied_to_the_pages(prefix_caching):
    # a finished request's last, partial page is read by nobody again, nor is any of its
    # pages when there is no prefix cache: their rows are never copied (the pages stay
    # poisoned), while the full pages a prefix hit can revive hold their rows
    model = tiny_gpt()
    engine = poisoned(Engine(model, max_batch_size=4, page_size=4, num_blocks=64, prefix_caching=prefix_caching))
    first = prompts([5, 7, 6])
    rids = [engine.submit(p, n, temperature=0) for p, n in zip(first, (21, 13, 14))]  # they leave one by one
    tables = {}
    while engine.has_work():
        tables.update({r.id: list(r.pages) for r in engine.running})  # (each one's pages, before they go back)
        engine.step()
    for rid, p in zip(rids, first):
        computed = len(p) + len(engine.request(rid).output) - 1  # (the last token's keys were never computed)
        full = computed // 4 if prefix_caching else 0
        if prefix_caching:
            assert_full_pages_hold(engine, model, (p + engine.request(rid).output)[:computed])
        for page in tables[rid][full:]:  # the rest: untouched
            assert all(np.isnan(backend_numpy(pool[layer][page])).all() for pool in (engine.cache.k, engine.cache.v)
                       for layer in range(model.config.n_layer)), (rid, page)
    assert_pool_is_empty(engine)


def backend_numpy(array):
    from tinygrad_lite import backend
    return backend.to_numpy(array)


def test_sequences_that_decoded_together_go_on_right_as_they_leave_one_by_one():
    # equal prompts decode side by side in the slab, their new rows there only; each one
    # that leaves writes its rows to its pages and gives its slot to the last member
    model = tiny_gpt()
    engine = poisoned(Engine(model, max_batch_size=4, page_size=4, num_blocks=64))
    seen = logits_by_request(engine)
    wanted = {engine.submit(p, n, temperature=0): (p, n) for p, n in zip(prompts([6, 6, 6], seed=3), (6, 11, 18))}
    results = engine.run()
    for rid, (p, n) in wanted.items():
        assert results[rid] == alone(model, p, n), rid
    assert_logits_are_generates(model, seen, wanted)
    assert_pool_is_empty(engine)


def test_a_step_that_continues_the_last_one_reuses_its_layout_and_only_then(monkeypatch):
    # PagedBatch.next_step: while the same sequences decode one token each (from the step
    # after their prefill on), a step takes the last step's slab one position on instead
    # of planning it again; a request that joins (or leaves) makes the engine plan afresh,
    # and the outputs stay generate()'s, with every row reaching its pages (poisoned pool)
    import model.serving as serving
    built = []

    class Counted(serving.PagedBatch):
        def __init__(self, cache, segments):
            built.append([n for _, _, _, n, _, _ in segments])
            super().__init__(cache, segments)
    monkeypatch.setattr(serving, "PagedBatch", Counted)
    model = tiny_gpt()
    engine = poisoned(Engine(model, max_batch_size=4, page_size=4, num_blocks=64))
    first = prompts([6, 6])
    rids = [engine.submit(p, 12, temperature=0) for p in first]
    for _ in range(5):  # a prefill, then four decode steps that go on from it
        engine.step()
    assert built == [[6, 6]]
    late = prompts([5], seed=3)[0]
    rids.append(engine.submit(late, 4, temperature=0))
    engine.step()  # it joins: built afresh
    assert built[-1] == [1, 1, 5]
    results = engine.run()
    assert len(built) < engine.forward_passes
    for rid, (p, n) in zip(rids, [(first[0], 12), (first[1], 12), (late, 4)]):
        assert results[rid] == alone(model, p, n)
    assert_pool_is_empty(engine)


def test_a_seeded_sampled_request_gives_the_same_tokens_alone_and_in_a_busy_batch():
    model = tiny_gpt()
    p = prompts([6])[0]
    solo = Engine(model, max_batch_size=4, page_size=4, num_blocks=32)
    rid = solo.submit(p, 15, temperature=1.0, top_k=10, seed=7)
    alone_tokens = solo.run()[rid]
    busy = Engine(model, max_batch_size=4, page_size=4, num_blocks=32)
    for q in prompts([3, 8, 11], seed=2):
        busy.submit(q, 15, temperature=1.0)  # unseeded neighbours
    rid = busy.submit(p, 15, temperature=1.0, top_k=10, seed=7)
    assert busy.run()[rid] == alone_tokens
    # and it is generate()'s draw with that seed, too
    assert alone_tokens == alone(model, p, 15, temperature=1.0, top_k=10, seed=7)


def test_one_forward_pass_per_step_with_sequences_of_different_lengths(monkeypatch):
    model = tiny_gpt()
    engine = Engine(model, max_batch_size=4, page_size=4, num_blocks=64)
    for p in prompts([3, 7, 12]):
        engine.submit(p, 8, temperature=0)
    from model.prepared_decode import PreparedDecode
    calls = []  # forward passes: the model's, or the prepared decode step's (model/prepared_decode.py)
    real_forward, real_prepared = GPT.forward, PreparedDecode.__call__
    monkeypatch.setattr(GPT, "forward", lambda self, *a, **k: calls.append("model") or real_forward(self, *a, **k))
    monkeypatch.setattr(PreparedDecode, "__call__",
                        lambda self, *a: calls.append("prepared") or real_prepared(self, *a))
    engine.step()  # the three prefills, together
    assert calls == ["model"] and len(engine.running) == 3
    for _ in range(5):
        calls.clear()
        emitted = engine.step()
        assert len(calls) == 1 and len(emitted) == 3  # three ragged decodes, one pass
    assert calls == ["prepared"]  # (steady steps: the same sequences, a token further each)
    assert {len(r.tokens) for r in engine.running} == {9, 13, 18}


def attention_calls(monkeypatch, shape) -> list:
    """Every later call of the lean step's attention (fast_decode._attention), as
    shape(queries, keys, lengths): a list that grows as the engine steps."""
    from model import fast_decode
    calls, real = [], fast_decode._attention

    def spy(q, k, v, lengths=None, out=None):
        calls.append(shape(q, k, lengths))
        return real(q, k, v, lengths, out)
    monkeypatch.setattr(fast_decode, "_attention", spy)
    return calls


def test_sequences_of_different_lengths_decode_in_one_attention_call_a_layer(monkeypatch):
    # the slab holds every decoding sequence, each in its own slot: one masked call a layer
    # serves them all, whatever their lengths (the lean step's fast kernel)
    model = tiny_gpt()
    engine = Engine(model, max_batch_size=4, page_size=4, num_blocks=64)
    seen = logits_by_request(engine)
    given = prompts([3, 7, 12], seed=1)
    wanted = {engine.submit(p, 8, temperature=0): (p, 8) for p in given}
    engine.step()  # the prefills
    calls = attention_calls(monkeypatch, lambda q, k, lengths: (len(q), lengths))
    engine.step()
    assert calls == [(3, (4, 8, 13))] * model.config.n_layer
    engine.run()
    assert_logits_are_generates(model, seen, wanted)


def test_prompts_that_arrive_together_take_slots_by_length_not_in_the_rows_order(monkeypatch):
    # prompts prefill in groups of adjacent slots; with groups of alike lengths only
    # (PAD_PAIRS 0), the slab's order is not the packed row's: each decoding sequence must
    # still find its own slot (slots hold rows 0, 2, 1, 4, 3, 5: the first and the last in
    # place, which a check of the ends alone would take for a slice)
    from model import packed_row
    monkeypatch.setattr(packed_row, "PAD_PAIRS", 0)
    model = tiny_gpt()
    engine = poisoned(Engine(model, max_batch_size=6, page_size=4, num_blocks=64))
    seen = logits_by_request(engine)
    wanted = {engine.submit(p, 7, temperature=0): (p, 7) for p in prompts([3, 5, 3, 6, 5, 7], seed=8)}
    engine.run()
    assert_logits_are_generates(model, seen, wanted)
    assert_pool_is_empty(engine)


def test_buckets_let_a_prompt_join_while_the_padding_it_adds_stays_within_pad_pairs(monkeypatch):
    # the rule itself: a prompt joins the group of the shorter ones before it while the
    # (query, key) pairs its padding adds, sum over members b of (n - b.n) (start + (n + b.n) / 2),
    # are at most PAD_PAIRS; each group then in the row's order
    from model import packed_row
    from model.packed_row import Segment, buckets

    def seg(n: int, column: int) -> Segment:
        return Segment(sequence=column, table=[], start=0, n=n, limit=128, due=True, column=column)
    long, one, longer = seg(100, 0), seg(1, 100), seg(101, 101)
    monkeypatch.setattr(packed_row, "PAD_PAIRS", 99 * 50.5)  # what 100 adds to [1]: exactly the limit, it joins
    assert buckets([long, one, longer], 0) == [[long, one], [longer]]  # 101 would add 100 * 51 + 1 * 100.5
    monkeypatch.setattr(packed_row, "PAD_PAIRS", 0)
    assert buckets([seg(5, 0), seg(5, 5)], 0) == [[seg(5, 0), seg(5, 5)]]  # alike lengths pad nothing


@pytest.mark.parametrize("pad_pairs, groups", [(None, 1), (100, 2), (0, 5)])
def test_prompts_of_different_lengths_prefill_right_padded_in_few_attention_calls(pad_pairs, groups, monkeypatch):
    # prompts that start together pad to the longest of their group: under the causal mask
    # no real query sees a padded key, so one call a layer serves them all (the last layer
    # attends from each prompt's last token, masked at its own length); PAD_PAIRS bounds
    # the padding a group may add (100 pairs: 4, 5 and 6 join 3, but 40 does not; 0: alike
    # lengths only)
    from model import packed_row
    if pad_pairs is not None:
        monkeypatch.setattr(packed_row, "PAD_PAIRS", pad_pairs)
    model = tiny_gpt()
    engine = poisoned(Engine(model, max_batch_size=6, page_size=4, num_blocks=64))
    seen = logits_by_request(engine)
    wanted = {engine.submit(p, 6, temperature=0): (p, 6) for p in prompts([6, 3, 40, 5, 4], seed=9)}
    calls = attention_calls(monkeypatch, lambda q, k, lengths: (q.shape[0], q.shape[2], lengths))
    engine.step()  # the five prefills: (members, queries, lengths) of each call, layer by layer
    # (groups by length, shortest first; in a group, the row's order)
    below = {1: [(5, 40, None)], 2: [(4, 6, None), (1, 40, None)], 5: [(1, n, None) for n in (3, 4, 5, 6, 40)]}
    top = {1: [(5, 1, (6, 3, 40, 5, 4))], 2: [(4, 1, (6, 3, 5, 4)), (1, 1, None)], 5: [(1, 1, None)] * 5}
    assert calls == below[groups] * (model.config.n_layer - 1) + top[groups]
    engine.run()
    assert_logits_are_generates(model, seen, wanted)
    assert_pool_is_empty(engine)


def test_right_padded_prefills_give_the_usual_paths_logits(monkeypatch):
    # the usual (ops) path pads the same groups and runs them through the ops tier's causal
    # attention (the last layer: each prompt's last query over its own keys)
    from model import fast_decode
    monkeypatch.setattr(fast_decode, "applies", lambda *a: False)
    model = tiny_gpt(bias=True)
    engine = poisoned(Engine(model, max_batch_size=6, page_size=4, num_blocks=64))
    seen = logits_by_request(engine)
    wanted = {engine.submit(p, 5, temperature=0): (p, 5) for p in prompts([6, 3, 17, 5, 4], seed=2)}
    engine.run()
    assert_logits_are_generates(model, seen, wanted)


def test_the_slab_grows_and_gives_a_leavers_slot_to_its_last_member():
    # a sequence that leaves gives its slot to the slab's last member (it moves), and a
    # request that needs more slots or a longer context than the slab has grows it (the
    # members' rows are carried over); the steps after pack their rows in the slab's new
    # order: every output is still generate()'s (poisoned pool)
    from model import packed_row
    model = tiny_gpt()
    engine = poisoned(Engine(model, max_batch_size=4, page_size=4, num_blocks=64))
    seen = logits_by_request(engine)
    wanted = {engine.submit(p, n, temperature=0): (p, n) for p, n in zip(prompts([3, 7, 5], seed=6), (2, 9, 12))}
    moved = grown = repacked = 0
    for step in range(20):
        if step == 4:
            late = prompts([20], seed=7)[0]  # a longer context than any so far
            wanted[engine.submit(late, 30, temperature=0)] = (late, 30)
        engine.step()
        moved += bool(engine._view.plan.moves)
        grown += engine._view.plan.regrow is not None
        if engine._view.plan.steady:  # the engine packs a steady step's row in slot order: a slice, no gather
            assert packed_row.is_whole(engine._view.plan.decode.columns, len(engine._view.positions))
            repacked += engine._view.order is not None
    engine.run()
    assert moved and grown >= 2 and repacked  # (the first prefill makes the slab)
    assert_logits_are_generates(model, seen, wanted)
    assert_pool_is_empty(engine)


@pytest.mark.parametrize("lean", [True, False])
def test_a_prefill_steps_last_block_attends_from_the_due_sequences_last_token_only(lean, monkeypatch):
    # gpt.last_block_rows: only the due sequences' next tokens need logits, so the last
    # layer computes every row's keys and values but attends, projects and runs its MLP
    # for their last rows only; a long prompt's first chunks only store keys and values
    from model import fast_decode, paged_batch
    model = tiny_gpt()
    engine = Engine(model, max_batch_size=4, page_size=4, num_blocks=64, max_step_tokens=24)
    attended = []
    real_attend = paged_batch.PagedBatch.attend

    def attend(self, layer, q, *args, **kwargs):
        y = real_attend(self, layer, q, *args, **kwargs)
        attended.append((layer, len(q), len(y)))
        return y
    monkeypatch.setattr(paged_batch.PagedBatch, "attend", attend)
    if not lean:
        monkeypatch.setattr(fast_decode, "applies", lambda *a: False)
    given = prompts([3, 7, 12, 30], seed=2)
    ids = [engine.submit(p, 6, temperature=0) for p in given]
    engine.step()  # three whole prompts (22 tokens) and the long one's first 2: three rows attend at the top
    assert attended == [(0, 24, 24), (1, 24, 3)]
    attended.clear()
    engine.step()  # three decodes and 21 more of the long prompt (still not due)
    assert attended == [(0, 24, 24), (1, 24, 3)]
    assert engine.run() == {i: alone(model, p, 6) for i, p in zip(ids, given)}


# --- pages: prefix sharing, the pool, preemption ----------------------------------------


def test_requests_sharing_a_prefix_hold_the_same_pages_and_skip_its_prefill():
    model = tiny_gpt()
    engine = Engine(model, max_batch_size=4, page_size=4, num_blocks=32)
    system = prompts([13])[0]  # 3 full pages and one token
    a = engine.submit(system + [5, 6], 6, temperature=0)
    engine.step()
    b = engine.submit(system + [7], 6, temperature=0)
    computed = []
    real_forward = engine._forward
    engine._forward = lambda batch: computed.extend(n for _, n in batch) or real_forward(batch)
    engine.step()
    ra, rb = engine.request(a), engine.request(b)
    assert rb.pages[:3] == ra.pages[:3]  # the same physical pages
    assert all(engine.pool.ref_counts[p] == 2 for p in ra.pages[:3])
    assert rb.pages[3] != ra.pages[3]  # where they differ, their own
    assert engine.prefix_hits == 3 and engine.prefix_hit_tokens == 12 and rb.prefix_tokens == 12
    assert computed == [1, 2]  # a decodes one token; b's prefill is the 2 tokens after the prefix
    results = engine.run()
    assert results[a] == alone(model, system + [5, 6], 6) and results[b] == alone(model, system + [7], 6)
    assert_pool_is_empty(engine)


def test_requests_arriving_together_behind_a_cached_prefix_compute_the_rest_they_share_once():
    # a finished request left 2 pages in the prefix cache; three arrive at once whose prompts
    # go on alike for 3 more pages: the first computes those, the others wait a step and share them
    model = tiny_gpt()
    engine = Engine(model, max_batch_size=4, page_size=4, num_blocks=64)
    cached = prompts([8])[0]
    engine.submit(cached + [1], 2, temperature=0)
    engine.run()
    given = [cached + prompts([12], seed=2)[0] + [t] for t in (3, 4, 5)]  # 5 full pages, then their own token
    ids = [engine.submit(p, 4, temperature=0) for p in given]
    engine.step()
    assert [engine.request(i).num_cached for i in ids] == [21, 0, 0]  # the others hold nothing while they wait
    engine.step()
    first, *others = (engine.request(i) for i in ids)
    assert all(other.pages[:5] == first.pages[:5] for other in others)
    assert engine.prefix_hit_tokens == 2 * 4 + 2 * (5 * 4)
    results = engine.run()
    assert all(results[i] == alone(model, p, 4) for i, p in zip(ids, given))
    assert_pool_is_empty(engine)


def test_questions_of_different_lengths_behind_a_cached_prefix_prefill_in_one_padded_group(monkeypatch):
    # requests behind one cached system prompt start at the same position: their
    # questions prefill as one group, right-padded after the shared pages, while the first
    # request decodes beside them (poisoned pool: every row read was written)
    model = tiny_gpt()
    engine = poisoned(Engine(model, max_batch_size=4, page_size=4, num_blocks=64))
    seen = logits_by_request(engine)
    system = prompts([13])[0]  # 3 full pages and one token
    wanted = {engine.submit(system + [5], 8, temperature=0): (system + [5], 8)}
    engine.step()
    later = [system + q for q in prompts([1, 4, 2], seed=3)]
    wanted.update({engine.submit(p, 6, temperature=0): (p, 6) for p in later})
    calls = attention_calls(monkeypatch, lambda q, k, lengths: (q.shape[0], q.shape[2], k.shape[2], lengths))
    engine.step()  # the first decodes; the three prefill 2, 5 and 3 tokens after the 12 cached
    assert engine.prefix_hits == 3 * 3
    prefill = [c for c in calls if c[0] == 3]  # (the other call a layer is the first one's decode)
    assert prefill == [(3, 5, 17, None)] * (model.config.n_layer - 1) + [(3, 1, 17, (14, 17, 15))]
    engine.run()
    assert_logits_are_generates(model, seen, wanted)
    assert_pool_is_empty(engine)


def test_a_finished_requests_prefix_pages_are_revived_by_a_later_one():
    model = tiny_gpt()
    engine = Engine(model, max_batch_size=2, page_size=4, num_blocks=16)
    system = prompts([8])[0]
    engine.submit(system + [1], 3, temperature=0)
    engine.run()
    assert_pool_is_empty(engine)  # every page free again ...
    rid = engine.submit(system + [2], 3, temperature=0)
    engine.step()
    assert engine.prefix_hits == 2  # ... yet its 2 full pages still held the prefix
    assert engine.run()[rid] == alone(model, system + [2], 3)


def test_a_hash_collision_is_not_a_hit():
    model = tiny_gpt()
    engine = Engine(model, max_batch_size=2, page_size=4, num_blocks=16)
    engine.submit([1, 2, 3, 4, 5], 2, temperature=0)
    engine.run()
    page = next(iter(engine.pool.tokens_of))
    engine.pool.tokens_of[page] = (9, 9, 9, 9)  # as if another prefix had hashed to its key
    engine.submit([1, 2, 3, 4, 6], 2, temperature=0)
    engine.step()
    assert engine.prefix_hits == 0


def test_preemption_under_a_small_pool_still_gives_the_right_outputs():
    model = tiny_gpt()
    # 4 requests of up to 30 tokens need up to 8 pages each: 10 pages cannot hold them all
    engine = Engine(model, max_batch_size=4, page_size=4, num_blocks=10)
    seen = logits_by_request(engine)
    wanted = {engine.submit(p, 20, temperature=0): (p, 20) for p in prompts([6, 9, 4, 7], seed=3)}
    results = engine.run()
    assert engine.preemptions > 0
    for rid, (p, n) in wanted.items():
        assert results[rid] == alone(model, p, n)
    assert_logits_are_generates(model, seen, wanted)  # (a readmitted request's recomputed steps included)
    assert_pool_is_empty(engine)


@given(st.integers(0, 2**32 - 1))
def test_random_workloads_give_every_request_what_generate_gives_it_alone(seed):
    # requests arriving at random steps, some sharing a prefix, pools small enough to
    # preempt, pages of 2-8 tokens, step budgets that chunk prefills, cancellations, the
    # prefix cache on or off (off, a prompt's rows stay in the slab until read): every
    # greedy output (a cancelled one, its part), and the logits each token was chosen
    # from, are generate()'s on that prompt alone, on a pool poisoned with NaN (a row that
    # never reached its page would show), and every page goes back
    from model.generate import generate_with_logits
    rnd = random.Random(seed)
    model = tiny_gpt(rnd.choice(["learned", "rope"]), seed=seed % 3)
    page, pages = rnd.choice([2, 3, 4, 8]), rnd.choice([12, 16, 24, 64])
    engine = poisoned(Engine(model, max_batch_size=rnd.choice([1, 2, 3, 4, 6]), page_size=page,
                             num_blocks=pages, max_step_tokens=rnd.choice([8, 16, 64, 2048]),
                             prefix_caching=rnd.random() < 0.7))
    shared = [rnd.randrange(len(TEXT)) for _ in range(rnd.randrange(1, 12))]
    arrivals = []
    for _ in range(rnd.randrange(2, 9)):
        own = [rnd.randrange(len(TEXT)) for _ in range(rnd.randrange(1, 10))]
        prompt = (shared if rnd.random() < 0.5 else []) + own
        n = rnd.randrange(1, 14)
        if len(prompt) + n <= 64 and -(-(len(prompt) + n) // page) <= pages:
            arrivals.append((rnd.randrange(20), prompt, n))
    arrivals.sort(key=lambda a: a[0])
    wanted, cancelled, step, seen = {}, set(), 0, logits_by_request(engine)
    while arrivals or engine.has_work():
        while arrivals and arrivals[0][0] <= step:
            _, prompt, n = arrivals.pop(0)
            wanted[engine.submit(prompt, n, temperature=0)] = generate_with_logits(model, [prompt], n)
        if engine.running and rnd.random() < 0.03:
            victim = rnd.choice(engine.running).id
            cancelled.add(victim)
            engine.cancel(victim)
        if engine.has_work():
            engine.step()
        step += 1
    for rid, (want, logits) in wanted.items():
        request, got = engine.request(rid), len(engine.request(rid).output)
        if request.finish_reason == "cancelled":
            assert rid in cancelled and request.output == want[0][:got], rid
        else:
            assert request.output == want[0], rid
        if got:
            np.testing.assert_allclose(np.stack(seen[rid]), logits[0, :got], rtol=1e-5, atol=1e-6, err_msg=str(rid))
    assert_pool_is_empty(engine)


def test_a_long_prompt_is_prefilled_in_chunks_within_the_step_budget(monkeypatch):
    from model.paged_batch import PagedBatch
    model = tiny_gpt()
    engine = Engine(model, max_batch_size=2, page_size=4, num_blocks=32, max_step_tokens=8)
    p = prompts([30])[0]
    rid = engine.submit(p, 5, temperature=0)
    gathered = []  # a chunk's copy grows from the last chunk's: nothing is gathered from the pages again
    gather = PagedBatch.gathered_afresh
    monkeypatch.setattr(PagedBatch, "gathered_afresh", lambda self, *a: gathered.append(a) or gather(self, *a))
    steps = 0
    while not engine.step():
        steps += 1
    assert steps == 3 and gathered == []  # 8 + 8 + 8 tokens without output, then the last 6 and a token
    assert engine.run()[rid] == alone(model, p, 5)


# --- stopping -------------------------------------------------------------------------------


def test_stop_strings_end_a_request_before_the_string():
    tokenizer = CharTokenizer(TEXT)
    model = tiny_gpt()
    p = tokenizer.encode("hello")
    full = tokenizer.decode(alone(model, p, 20))
    stop = full[5:7]  # two characters the greedy output will produce
    engine = Engine(model, max_batch_size=2, page_size=4, num_blocks=16, tokenizer=tokenizer)
    rid = engine.submit(p, 20, temperature=0, stop=[stop])
    ids = engine.run()[rid]
    request = engine.request(rid)
    assert request.finish_reason == "stop" and stop not in tokenizer.decode(ids)
    assert tokenizer.decode(ids) == request.text == full[:full.index(stop)]


def test_text_held_back_for_a_possible_stop_string_comes_out_when_the_request_ends():
    tokenizer = CharTokenizer(TEXT)
    model = tiny_gpt()
    p = tokenizer.encode("hello")
    full = tokenizer.decode(alone(model, p, 6))
    engine = Engine(model, max_batch_size=2, page_size=4, num_blocks=16, tokenizer=tokenizer)
    rid = engine.submit(p, 6, temperature=0, stop=[full[-1] + "!?"])  # its last character could start the stop string
    engine.run()
    request = engine.request(rid)
    assert request.finish_reason == "length" and request.text == full == tokenizer.decode(request.result())


def test_the_end_of_turn_token_of_a_chat_tokenizer_ends_a_request():
    chat = ChatTokenizer(CharTokenizer(TEXT))
    model = tiny_gpt(vocab_size=chat.vocab_size)
    p = chat.encode("hi")
    greedy = alone(model, p, 30)
    end = greedy[4]  # pretend the token the model writes 5th ends the turn
    chat.ids["<|end|>"] = end
    engine = Engine(model, max_batch_size=2, page_size=4, num_blocks=16, tokenizer=chat)
    rid = engine.submit(p, 30, temperature=0)
    assert engine.run()[rid] == greedy[:greedy.index(end) + 1]
    assert engine.request(rid).finish_reason == "stop"


def test_a_cancelled_request_stops_and_gives_its_pages_back():
    model = tiny_gpt()
    engine = Engine(model, max_batch_size=2, page_size=4, num_blocks=16)
    rid = engine.submit(prompts([9])[0], 40, temperature=0)
    other = engine.submit(prompts([4])[0], 5, temperature=0)
    for _ in range(3):
        engine.step()
    engine.cancel(rid)
    engine.step()
    assert engine.request(rid).finish_reason == "cancelled" and engine.request(rid).pages == []
    engine.run()
    assert engine.request(other).finish_reason == "length"
    assert_pool_is_empty(engine)


def test_timings_are_in_order():
    engine = Engine(tiny_gpt(), max_batch_size=2, page_size=4, num_blocks=16)
    rid = engine.submit([1, 2, 3], 4, temperature=0)
    engine.run()
    r = engine.request(rid)
    assert r.queued <= r.first_token <= r.finished


# --- settings at their edges -----------------------------------------------------------------


@pytest.mark.parametrize("case", ["pages of one token", "a pool of one page", "one layer", "dropout, left training"])
def test_settings_at_their_edges_still_give_generates_outputs(case):
    model = tiny_gpt(**{"one layer": {"n_layer": 1}, "dropout, left training": {"dropout": 0.5}}.get(case, {}))
    model.train()  # (the engine puts it in eval mode, as generate() does)
    page, blocks, n, lengths = {"pages of one token": (1, 64, 5, [3, 6, 4]), "a pool of one page": (4, 1, 2, [2, 1])}.get(
        case, (4, 32, 5, [3, 6, 4]))  # (three requests, two at a time: the third joins a slab in use)
    engine = Engine(model, max_batch_size=2, page_size=page, num_blocks=blocks)
    wanted = {engine.submit(p, n, temperature=0): p for p in prompts(lengths)}
    results = engine.run()
    assert all(results[rid] == alone(model, p, n) for rid, p in wanted.items())
    assert engine.preemptions == 0  # (one page: the second request waits for it, it does not preempt)
    assert_pool_is_empty(engine)


def test_the_paged_cache_lives_on_the_device_it_is_given():
    from model.paged_kv_cache import PagedKVCache
    other = "strict" if backend.default_device() == "cpu" else "cpu"
    assert PagedKVCache(2, 4, 4, 2, 8, device=other).device == other
    assert PagedKVCache(2, 4, 4, 2, 8).device == backend.default_device()


# --- log-probabilities ----------------------------------------------------------------------


def test_each_tokens_log_probability_is_the_log_softmax_of_generates_logits():
    from model.generate import generate_with_logits
    model = tiny_gpt()
    engine = Engine(model, max_batch_size=4, page_size=4, num_blocks=32)
    given = prompts([5, 9, 3])
    ids = [engine.submit(p, 6, temperature=0, logprobs=k) for p, k in zip(given, (3, 0, None))]
    sampled = engine.submit(given[0], 6, temperature=1.0, seed=2, logprobs=2)
    engine.run()
    for rid, p, k in zip(ids, given, (3, 0, None)):
        request = engine.request(rid)
        if k is None:
            assert request.token_logprobs == []
            continue
        logits = generate_with_logits(model, [p], 6)[1][0].astype(np.float64)  # (6, V): what each token was chosen from
        log_p = logits - logits.max(-1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
        assert [token for token, _, _ in request.token_logprobs] == request.output
        for step, (token, lp, top) in enumerate(request.token_logprobs):
            np.testing.assert_allclose(lp, log_p[step, token], rtol=1e-5, atol=1e-6)
            assert len(top) == k and [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
            if k:  # greedy: the chosen token is the most likely one
                assert top[0][0] == token and top[0][1] == lp
                np.testing.assert_allclose([lp for _, lp in top], np.sort(log_p[step])[::-1][:k], rtol=1e-5, atol=1e-6)
    drawn = engine.request(sampled).token_logprobs
    assert len(drawn) == 6 and all(lp <= 0 and len(top) == 2 for _, lp, top in drawn)


@pytest.mark.parametrize("step_tokens,num_blocks", [(2048, 64), (8, 64), (8, 12)])  # whole, chunked, preempted
def test_a_scored_prompt_gets_each_tokens_log_probability_from_the_whole_prompts_forward(step_tokens, num_blocks):
    """prompt_logprobs: every prompt token after the first scored by the logits before it,
    in prompts prefilled whole or in chunks, recomputed after preemption, or starting with
    a cached prefix (which a scored prompt must compute, not reuse); what they generate is
    unchanged."""
    model = tiny_gpt()
    engine = Engine(model, max_batch_size=4, page_size=4, num_blocks=num_blocks, max_step_tokens=step_tokens)
    given = prompts([20, 2, 13, 27, 9], seed=3)
    given += [given[0][:], given[0][:9] + [1, 2]]  # (the first's pages are cached by then)
    engine.submit(given[0], 4, temperature=0)  # an unscored twin, sharing and caching pages
    ids = [engine.submit(p, 6, temperature=0, prompt_logprobs=i % 3) for i, p in enumerate(given)]
    engine.run()
    assert all(engine.request(rid).prefix_tokens == 0 for rid in ids)  # all computed ...
    if num_blocks == 64:  # ... though the cache held the first prompt's pages: an unscored one reuses them
        engine.submit(given[0], 1, temperature=0)
        engine.run()
        assert engine.prefix_hits == len(given[0]) // 4 - (len(given[0]) % 4 == 0)
    for i, (rid, p) in enumerate(zip(ids, given)):
        request, log_p = engine.request(rid), log_softmax_of(model, given[i])
        assert [token for token, _, _ in request.prompt_token_logprobs] == p[1:]
        np.testing.assert_allclose([lp for _, lp, _ in request.prompt_token_logprobs],
                                   [log_p[t, token] for t, token in enumerate(p[1:])], rtol=1e-5, atol=1e-6)
        assert all(len(top) == i % 3 for _, _, top in request.prompt_token_logprobs)
        assert request.output == alone(model, p, 6)
    assert engine.preemptions > 0 or num_blocks == 64
    assert_pool_is_empty(engine)


def test_the_engine_thread_sends_a_prompts_scores_once_and_only_when_asked():
    """EngineLoop (model/engine_thread.py): a scored request's first update carries its
    prompt's scores, its later ones do not; an unscored request's never do. And the most
    alternatives allowed, 20, are allowed."""
    from model.engine_thread import EngineLoop
    engine = Engine(tiny_gpt(), max_batch_size=4, page_size=4, num_blocks=32)
    loop = EngineLoop(engine)
    loop.start()
    try:
        params = dict(max_new_tokens=3, temperature=0, top_k=None, top_p=None, seed=None, stop=(), logprobs=20)
        given = prompts([6, 7], seed=5)
        (scored,), scored_updates = loop.submit([given[0]], {**params, "prompt_logprobs": 20})
        (plain,), plain_updates = loop.submit([given[1]], {**params, "prompt_logprobs": None})
        updates = [scored_updates.get(timeout=10) for _ in range(3)] + [plain_updates.get(timeout=10) for _ in range(3)]
    finally:
        loop.stopping.set()
        loop.join(timeout=5)
    assert ["prompt_logprobs" in u for u in updates] == [True, False, False, False, False, False]
    assert [token for token, _, top in updates[0]["prompt_logprobs"]] == given[0][1:]
    assert all(len(top) == 20 for _, _, top in updates[0]["prompt_logprobs"] + updates[0]["logprobs"])


def test_a_scored_prompts_last_chunk_beside_another_prompts_first_scores_its_own_columns():
    """The wanted columns of a scored chunk that starts mid-prompt, in a step where another
    prompt's unfinished chunk makes only some columns wanted (so each must be the right one)."""
    model = tiny_gpt()
    engine = Engine(model, max_batch_size=4, page_size=4, num_blocks=32, max_step_tokens=8)
    scored, other = prompts([18, 20], seed=4)
    rid = engine.submit(scored, 3, temperature=0, prompt_logprobs=1)
    engine.step(), engine.step()  # its tokens 0-7, then 8-15
    engine.submit(other, 3, temperature=0)
    engine.step()  # its last two (from 16) and the other's first six
    assert engine.request(rid).num_cached == 18 and engine.computed_tokens == 24
    engine.run()
    log_p = log_softmax_of(model, scored)
    np.testing.assert_allclose([lp for _, lp, _ in engine.request(rid).prompt_token_logprobs],
                               [log_p[t, token] for t, token in enumerate(scored[1:])], rtol=1e-5, atol=1e-6)


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt_ids=[], max_new_tokens=3), "empty"),
    (dict(prompt_ids=[1] * 60, max_new_tokens=5), "longer than the model's context of 64"),
    (dict(prompt_ids=[1], max_new_tokens=0), "max_new_tokens"),
    (dict(prompt_ids=[99], max_new_tokens=2), "token ids"),
    (dict(prompt_ids=[1], max_new_tokens=2, temperature=-1), "temperature"),
    (dict(prompt_ids=[1], max_new_tokens=2, top_p=1.5), "top_p"),
    (dict(prompt_ids=[1], max_new_tokens=2, seed=-1), "seed must be an integer >= 0"),
    (dict(prompt_ids=[1], max_new_tokens=2, logprobs=21), "logprobs must be an integer in 0..20"),
    (dict(prompt_ids=[1], max_new_tokens=2, logprobs=True), "logprobs must be an integer"),
    (dict(prompt_ids=[1], max_new_tokens=2, prompt_logprobs=-1), "prompt_logprobs must be an integer in 0..20"),
    (dict(prompt_ids=[1], max_new_tokens=2, stop=["x"]), "tokenizer"),
])
def test_requests_the_engine_cannot_serve_are_refused_with_one_line(kwargs, message):
    engine = Engine(tiny_gpt(), max_batch_size=2, page_size=4, num_blocks=16)
    with pytest.raises(RequestError, match=message) as error:
        engine.submit(**kwargs)
    assert "\n" not in str(error.value)
    assert not engine.has_work()


def test_a_request_larger_than_the_whole_pool_is_refused():
    engine = Engine(tiny_gpt(), max_batch_size=2, page_size=4, num_blocks=3)
    with pytest.raises(RequestError, match="pages"):
        engine.submit([1] * 10, 5)


def test_bad_engine_settings_are_value_errors():
    with pytest.raises(ValueError, match="page_size"):
        Engine(tiny_gpt(), max_batch_size=2, page_size=0, num_blocks=4)
    with pytest.raises(ValueError, match="max_step_tokens"):
        Engine(tiny_gpt(), max_batch_size=8, page_size=4, num_blocks=4, max_step_tokens=4)


def test_latency_summary_gives_throughput_and_numpy_percentiles_of_ttft_and_tpot():
    from model.serving import latency_summary, percentile
    for values in ([3.0], [5.0, 1.0], [4.0, 1.0, 9.0, 2.0, 7.5]):
        for q in (0, 50, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    model = tiny_gpt()
    engine = Engine(model, max_batch_size=4, page_size=4, num_blocks=32)
    rids = [engine.submit(p, n, temperature=0) for p, n in zip(prompts([3, 5, 4, 2]), (1, 4, 6, 2))]
    engine.run()
    requests = [engine.request(rid) for rid in rids]
    got = latency_summary(requests, 2.0)
    assert got["generated_tokens"] == 13 and got["tokens_per_s"] == 6.5
    ttft = [1000 * (r.first_token - r.queued) for r in requests]
    tpot = [1000 * (r.finished - r.first_token) / (len(r.output) - 1) for r in requests[1:]]  # (one token: none)
    for name, values in (("ttft", ttft), ("tpot", tpot)):
        for q in (50, 99):
            assert got[f"{name}_ms_p{q}"] == pytest.approx(float(np.percentile(values, q))), (name, q)
