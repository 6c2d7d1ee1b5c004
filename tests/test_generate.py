"""Generation: the KV cache against the uncached reference, the window policy past
block_size, the samplers, seeds, stop strings, batching, speculative decoding (greedy
equality and a chi-square test of its distribution), attention maps, and sample.py end
to end. Tiny random models throughout; the file also runs with TINYGRAD_LITE_DEVICE=strict.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

import tinygrad_lite
from tinygrad_lite import Tensor, backend
from model.attention_plot import attention_maps, plot_attention
from model.generate import (Sampler, TextFollower, generate, generate_with_logits, greedy,
                            softmax, stream, text_stream, top_k_filter, top_p_filter)
from model.gpt import GPT, GPTConfig
from model.speculative import SpeculativeStats, speculative_generate, speculative_stream

ROOT = Path(__file__).resolve().parent.parent
STRICT = backend.default_device() == "strict"


def tiny_gpt(seed: int = 0, pos: str = "learned", **overrides) -> GPT:
    config = dict(vocab_size=11, block_size=32, n_layer=2, n_head=2, n_embd=16, pos=pos)
    config.update(overrides)
    tinygrad_lite.manual_seed(seed)
    return GPT(GPTConfig(**config))


def device_array(values) -> object:
    """A host list/array as logits on the default device."""
    return backend.asarray(np.asarray(values, dtype=np.float32), backend.default_device())


def model_logits(model: GPT, ids: list[int]) -> np.ndarray:
    """Next-token logits (V,) after `ids`, from one plain forward pass."""
    logits, _ = model(Tensor([ids], dtype="int64"))
    return logits.numpy()[0, -1]


# --- the KV cache gives the same logits as re-running the context ------------------------


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("prompts", [[[1, 2, 3]], [[1, 2, 3], [4, 0, 9], [7, 7, 7]]], ids=["B1", "B3"])
def test_cached_and_uncached_agree_at_every_step(pos, prompts):
    model = tiny_gpt(pos=pos)
    # 70 new tokens from a 3-token prompt: the window slides twice past block_size 32
    ids_c, logits_c = generate_with_logits(model, prompts, 70, use_cache=True)
    ids_u, logits_u = generate_with_logits(model, prompts, 70, use_cache=False)
    assert logits_c.shape == (len(prompts), 70, 11)
    assert np.abs(logits_c - logits_u).max() <= 1e-4
    assert ids_c == ids_u
    assert ids_c == [list(np.argmax(row, axis=-1)) for row in logits_c]  # greedy picked the argmax


@pytest.mark.parametrize("new_tokens,cache_len", [(5, 3 + 5 - 1), (40, 32)])
def test_generate_sizes_its_kv_cache_to_the_prompt_and_new_tokens(new_tokens, cache_len, monkeypatch):
    """The cache holds the prompt and every new token but the last (never fed back), at
    most block_size (32 here; a longer generation slides its window inside it). One
    position fewer and the cache refuses the write; the tokens are those of the uncached
    path either way."""
    model = tiny_gpt()
    sizes, real = [], model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda batch, max_len=None: sizes.append(max_len) or real(batch, max_len))
    cached = generate(model, [1, 2, 3], new_tokens, temperature=0)
    assert sizes == [cache_len]
    assert cached == generate(model, [1, 2, 3], new_tokens, temperature=0, use_cache=False)
    if cache_len < 32:
        monkeypatch.setattr(model, "new_cache", lambda batch, max_len=None: real(batch, max_len - 1))
        with pytest.raises(ValueError, match="KV cache holds"):
            generate(model, [1, 2, 3], new_tokens, temperature=0)


@pytest.mark.parametrize("tier", sorted(tinygrad_lite.functional.TIERS))
def test_decoding_a_token_under_no_grad_builds_no_function_and_keeps_nothing(tier, monkeypatch):
    """The lean inference path: ops that record nothing run on spare instances, wiped after."""
    from tinygrad_lite import Function, no_grad, tensor as tensor_module
    model = tiny_gpt()
    built = []
    monkeypatch.setattr(Function, "__init__", lambda self: built.append(type(self).__name__))

    def decode_one_token(cache):
        logits, _ = model(Tensor([[4]], dtype="int64"), cache=cache)
        return logits

    with tinygrad_lite.functional.ops_tier(tier):
        cache = model.new_cache(1)
        spares = tensor_module._spares.__dict__
        spares.clear()
        with no_grad():
            decode_one_token(cache)  # the prompt's token: the first use of each op's spare
            built.clear()
            decode_one_token(cache)
        assert built == []
        if tier == "fast":  # the lean decode step (model/fast_decode.py) runs no op at all
            assert spares == {}
        else:
            assert len(spares) > 5 and all(vars(ctx) == {} for ctx in spares.values())
        decode_one_token(cache)  # with gradients on, the same step records its graph
        assert len(built) > 10


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_the_lean_decode_step_gives_the_usual_paths_logits_to_the_bit(bias, batch, monkeypatch):
    from model import fast_decode
    from tinygrad_lite import no_grad
    model = tiny_gpt(bias=bias)
    model.eval()
    rng = np.random.default_rng(0)
    prompt = Tensor(rng.integers(0, 11, (batch, 5)), dtype="int64")
    lean_cache, usual_cache = model.new_cache(batch, 12), model.new_cache(batch, 12)
    taken = []
    real_forward = fast_decode.forward
    monkeypatch.setattr(fast_decode, "forward", lambda *a: taken.append(1) or real_forward(*a))

    def both_paths(ids, start_pos=0, logits_at=None):
        """The same step on the lean path and (with it switched off) the usual one: equal
        logits, and equal keys in the two caches up to the step's end."""
        lean, _ = model(ids, cache=lean_cache, start_pos=start_pos, logits_at=logits_at)
        with monkeypatch.context() as m:
            m.setattr(fast_decode, "applies", lambda *a: False)
            usual, _ = model(ids, cache=usual_cache, start_pos=start_pos, logits_at=logits_at)
        np.testing.assert_array_equal(lean.numpy(), usual.numpy())
        end = start_pos + ids.shape[1]
        for layer in range(2):
            np.testing.assert_array_equal(backend.to_numpy(lean_cache.k[layer][:, :, :end]),
                                          backend.to_numpy(usual_cache.k[layer][:, :, :end]))

    with no_grad():
        for at in (None, slice(-1, None)):  # a prefill of 5 tokens, all logits or the last one's
            for cache in (lean_cache, usual_cache):
                cache.reset()
            both_paths(prompt, logits_at=at)
        assert len(taken) == 2
        for pos in range(5, 12):
            token = Tensor(rng.integers(0, 11, (batch, 1)), dtype="int64")
            both_paths(token, start_pos=pos)
    assert len(taken) == 9 and lean_cache.pos == usual_cache.pos == 12
    with no_grad(), pytest.raises(ValueError, match="KV cache holds"):  # past its end: the cache's own error
        model(token, cache=lean_cache, start_pos=12)


@pytest.mark.parametrize("tier", sorted(tinygrad_lite.functional.TIERS))
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_the_last_block_computes_only_the_rows_whose_logits_are_wanted(tier, pos, monkeypatch):
    # gpt.last_block_rows: the last block's queries, c_proj and MLP run on the wanted rows
    # only; the logits are those of the whole pass, and the cache holds every row's keys
    from model import fast_decode
    from tinygrad_lite import no_grad
    model = tiny_gpt(pos=pos)
    model.eval()
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 11, (3, 9))
    rows_seen = []  # positions per sequence reaching each MLP, in order (the usual path's or the lean one's)
    for block in model.h:
        real = block.mlp.forward
        monkeypatch.setattr(block.mlp, "forward", lambda x, real=real: rows_seen.append(x.shape[1]) or real(x))
    real_gelu = fast_decode.gelu_array
    monkeypatch.setattr(fast_decode, "gelu_array", lambda x: rows_seen.append(len(x) // 3) or real_gelu(x))
    with tinygrad_lite.functional.ops_tier(tier):
        whole, _ = model(Tensor(ids, dtype="int64"))  # gradients on: every row, as training runs it
        whole = whole.numpy()
        assert rows_seen == [9, 9]
        for at, rows in ((slice(-1, None), 1), (slice(6, 9), 3), (slice(-4, None), 4)):
            rows_seen.clear()
            with no_grad():
                uncached, _ = model(Tensor(ids, dtype="int64"), logits_at=at)
                cache = model.new_cache(3)
                model(Tensor(ids[:, :5], dtype="int64"), cache=cache, logits_at=slice(-1, None))
                cached, _ = model(Tensor(ids[:, 5:], dtype="int64"), cache=cache, start_pos=5,
                                  logits_at=slice(at.start - 5 if at.start > 0 else at.start, None))
            assert rows_seen == [9, rows, 5, 1, 4, rows]
            for pruned in (uncached, cached):
                np.testing.assert_allclose(pruned.numpy(), whole[:, at], rtol=1e-5, atol=1e-5)
            assert cache.pos == 9
            for layer in range(2):  # the last block stored all its keys, not just the wanted rows'
                reference = model.new_cache(3)
                with no_grad():
                    model(Tensor(ids, dtype="int64"), cache=reference)
                np.testing.assert_allclose(backend.to_numpy(cache.k[layer][:, :, :9]),
                                           backend.to_numpy(reference.k[layer][:, :, :9]), rtol=1e-5, atol=1e-6)
        rows_seen.clear()
        with no_grad():  # columns that are not the last ones: every row (causal attention aligns at the end)
            picked, _ = model(Tensor(ids, dtype="int64"), logits_at=slice(2, 5))
        assert rows_seen == [9, 9]
        np.testing.assert_allclose(picked.numpy(), whole[:, 2:5], rtol=1e-5, atol=1e-5)


def test_the_last_block_saves_rows_only_for_inference_and_trailing_positions():
    from model.gpt import last_block_rows
    from tinygrad_lite import no_grad
    with no_grad():
        assert last_block_rows(slice(-2, None), 9, paged=False) == slice(7, 9)
        assert last_block_rows(slice(0, None), 9, paged=False) is None  # every row: nothing to save
        assert last_block_rows(slice(2, 5), 9, paged=False) is None  # not the last rows: causal alignment would not hold
        assert last_block_rows(None, 9, paged=False) is None
        assert np.array_equal(last_block_rows(np.array([3, 8]), 9, paged=True), [3, 8])  # the engine's columns
        assert last_block_rows(slice(-1, None), 9, paged=True) is None
    assert last_block_rows(slice(-2, None), 9, paged=False) is None  # gradients on: every row


def test_the_lean_decode_step_stays_out_of_training_rope_and_the_other_tiers():
    from model import fast_decode
    from tinygrad_lite import no_grad
    model = tiny_gpt()
    cache = model.new_cache(1)
    with no_grad():
        assert fast_decode.applies(model, cache, None)  # (training mode, but no dropout to draw)
        dropping = tiny_gpt(dropout=0.1)
        assert not fast_decode.applies(dropping, dropping.new_cache(1), None)
        assert fast_decode.applies(dropping.eval(), dropping.new_cache(1), None)
        assert not fast_decode.applies(model, None, None)  # no cache: the usual path
        with tinygrad_lite.functional.ops_tier("fused"):
            assert not fast_decode.applies(model, cache, None)
        rope = tiny_gpt(pos="rope").eval()
        assert not fast_decode.applies(rope, rope.new_cache(1), None)
    assert not fast_decode.applies(model, cache, None)  # gradients on


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_sampled_tokens_agree_with_and_without_the_cache(pos):
    model = tiny_gpt(pos=pos)
    kwargs = dict(num_samples=2, temperature=1.0, top_k=5, seed=3)
    assert generate(model, [1, 2], 40, use_cache=True, **kwargs) == generate(model, [1, 2], 40, use_cache=False, **kwargs)


def test_window_policy_past_block_size():
    """Crop a long prompt to its last block_size tokens; when full, keep the last half."""
    model = tiny_gpt(block_size=8)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 11, size=13).tolist()  # longer than the context
    ids, logits = generate_with_logits(model, prompt, 12)
    seq = prompt + ids[0]
    for step in range(12):
        n = len(prompt) + step  # tokens before the one chosen at this step
        # the window: the prompt's last 8 tokens, then one more per step; at 9 it slides to the last 4
        window = [8, 4, 5, 6, 7, 8, 4, 5, 6, 7, 8, 4][step]
        expected = model_logits(model, seq[n - window:n])
        np.testing.assert_allclose(logits[0, step], expected, atol=1e-5, err_msg=f"step {step}")


def test_context_never_overflows_with_a_block_of_one():
    model = tiny_gpt(block_size=1)
    for use_cache in (True, False):
        assert len(generate(model, [3, 4, 5], 5, temperature=0, use_cache=use_cache)[0]) == 5


def test_prompts_of_different_lengths_match_running_them_alone():
    model = tiny_gpt()
    prompts = [[1, 2, 3, 4], [5], [6, 7, 8, 9]]
    together = generate(model, prompts, 10, temperature=0)
    alone = [generate(model, p, 10, temperature=0)[0] for p in prompts]
    assert together == alone
    assert len(generate(model, prompts, 4, num_samples=2, seed=0)) == 6  # prompt-major rows


# --- the samplers --------------------------------------------------------------------------


def test_top_k_never_samples_outside_the_k_best():
    logits = np.log([0.05, 0.3, 0.02, 0.2, 0.1, 0.25, 0.08])  # the 3 best: ids 1, 5, 3
    batch = device_array(np.tile(logits, (4000, 1)))  # 4000 draws in one call
    draws = Sampler(temperature=1.0, top_k=3, seed=0)(batch)
    assert set(draws) == {1, 3, 5}
    counts = np.bincount(draws, minlength=7)[[1, 5, 3]] / len(draws)
    np.testing.assert_allclose(counts, np.array([0.3, 0.25, 0.2]) / 0.75, atol=0.03)
    kept = np.isfinite(backend.to_numpy(top_k_filter(device_array([logits]), 3)))[0]
    assert np.flatnonzero(kept).tolist() == [1, 3, 5]


@pytest.mark.parametrize("p, kept", [(0.3, [1]), (0.6, [1, 3]), (0.75, [1, 3, 4]), (0.9, [1, 2, 3, 4]),
                                     (0.99, [0, 1, 2, 3, 4]), (1.0, [0, 1, 2, 3, 4])])
def test_top_p_keeps_the_smallest_set_with_enough_mass(p, kept):
    probs = [0.05, 0.4, 0.1, 0.3, 0.15]  # sorted: 0.4 (id 1), 0.3 (3), 0.15 (4), 0.1 (2), 0.05 (0)
    filtered = backend.to_numpy(top_p_filter(device_array([np.log(probs)]), p))[0]
    assert np.flatnonzero(np.isfinite(filtered)).tolist() == kept
    draws = Sampler(temperature=1.0, top_p=p, seed=1)(device_array(np.tile(np.log(probs), (500, 1))))
    assert set(draws) <= set(kept)


@given(st.lists(st.integers(-3, 3), min_size=1, max_size=40), st.integers(0, 45), st.data())
def test_a_tokens_log_probability_and_the_likeliest_ids_follow_their_definition(values, top, data):
    """token_log_prob against log-softmax and a full stable sort (ties, which small integer
    logits make common, go to the lower id), for any `top`, larger than V too."""
    from model.sampling import token_log_prob
    logits = np.asarray(values, dtype=np.float32)
    token = data.draw(st.integers(0, len(values) - 1))
    z = logits.astype(np.float64) - logits.max()
    log_p = z - np.log(np.exp(z).sum())
    got, likeliest = token_log_prob(device_array(logits), token, top)
    assert got == pytest.approx(log_p[token], abs=1e-12)
    expected = np.argsort(-log_p, kind="stable")[:top]
    assert [i for i, _ in likeliest] == expected.tolist()
    np.testing.assert_allclose([lp for _, lp in likeliest], log_p[expected], atol=1e-12)


def test_a_tokens_log_probability_does_not_overflow_on_large_logits():
    from model.sampling import token_log_prob
    assert token_log_prob(device_array(np.array([1000.0, 0.0], np.float32)), 0, 2) == (0.0, [(0, 0.0), (1, -1000.0)])


def test_tiny_temperature_equals_greedy():
    model = tiny_gpt()
    greedy_ids = generate(model, [1, 2, 3], 30, temperature=0)
    assert generate(model, [1, 2, 3], 30, temperature=1e-6, seed=5) == greedy_ids
    logits = device_array([[0.1, 2.0, -1.0], [3.0, 2.9, 0.0]])
    assert greedy(logits) == [1, 0] == Sampler(temperature=0)(logits)


def test_same_seed_same_samples_different_seed_different_samples():
    model = tiny_gpt()
    a = generate(model, [1, 2, 3], 30, num_samples=2, seed=7)
    assert a == generate(model, [1, 2, 3], 30, num_samples=2, seed=7)
    assert a != generate(model, [1, 2, 3], 30, num_samples=2, seed=8)
    assert a[0] != a[1]  # the rows of one batch are independent samples


def test_softmax_gives_masked_tokens_zero_probability():
    probs = backend.to_numpy(softmax(device_array([[0.0, -np.inf, 1.0]])))
    assert probs[0, 1] == 0.0 and abs(probs.sum() - 1) < 1e-6


# --- streaming and stop strings -------------------------------------------------------------


def test_stream_yields_the_tokens_generate_returns():
    model = tiny_gpt()
    steps = list(stream(model, [1, 2, 3], 12, num_samples=2, seed=4))
    assert [list(r) for r in zip(*steps)] == generate(model, [1, 2, 3], 12, num_samples=2, seed=4)


CHARS = "abcdefghij\n"  # a char "tokenizer" for the 11-token models


def decode(ids) -> str:
    return "".join(CHARS[i] for i in ids)


def test_stop_strings_end_the_output_before_them():
    model = tiny_gpt()
    full = decode(generate(model, [1, 2, 3], 40, temperature=0)[0])
    stop = full[10:12]
    cut = full.index(stop)
    ids = generate(model, [1, 2, 3], 40, temperature=0, stop=[stop, "zz"], decode=decode)[0]
    assert decode(ids) == full[:cut]
    pieces = list(text_stream((CHARS.index(c) for c in full), decode, [stop]))
    assert "".join(pieces) == full[:cut]
    # a text that only starts a stop string is held back, then released at the end
    assert "".join(text_stream([0, 1, 2], decode, ["cd"])) == "abc"


def test_text_follower_holds_back_an_unfinished_character():
    pieces = {0: b"\xe2\x82", 1: b"\xac", 2: b"!"}  # the euro sign split over two "tokens"
    decode_bytes = lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")
    follower = TextFollower(decode_bytes)
    assert [follower.add(0), follower.add(1), follower.add(2)] == ["", "\u20ac", "!"]


# --- bad inputs: one-line ValueErrors ------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=[]), "prompt is empty"),
    (dict(prompt=[[1], []]), "prompt is empty"),
    (dict(prompt=[1, 11]), "outside the vocabulary"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(num_samples=0), "num_samples"),
    (dict(stop=["x"]), "decode="),
    (dict(stop=[""], decode=decode), "non-empty"),
])
def test_bad_inputs_give_one_line_value_errors(kwargs, message):
    model = tiny_gpt()
    args = dict(prompt=[1, 2], max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message) as info:
        generate(model, args.pop("prompt"), args.pop("max_new_tokens"), **args)
    assert "\n" not in str(info.value)


def test_zero_new_tokens_is_an_empty_output():
    assert generate(tiny_gpt(), [[1, 2], [3]], 0) == [[], []]


# --- speculative decoding --------------------------------------------------------------------


@pytest.mark.parametrize("pos, num_draft", [("learned", 4), ("rope", 3), ("learned", 1)])
def test_speculative_greedy_equals_target_greedy(pos, num_draft):
    target = tiny_gpt(0, pos)
    draft = tiny_gpt(1, pos, n_layer=1)
    for prompt in ([1, 2, 3], [4]):
        plain = generate(target, prompt, 60, temperature=0)[0]  # past block_size 32
        ids, stats = speculative_generate(target, draft, prompt, 60, num_draft=num_draft, temperature=0)
        assert ids == plain
        assert stats.generated == 60 and 0 <= stats.accepted <= stats.drafted
        assert stats.target_passes + stats.passes_saved == 60 and stats.target_passes < 60


def test_speculative_with_a_rejecting_draft_still_equals_greedy():
    target, draft = tiny_gpt(0), tiny_gpt(2, n_embd=8, n_head=1)
    for name, p in draft.named_parameters():  # louder blocks: a draft that often disagrees
        if name.startswith("h.") and ".ln_" not in name:
            p.data = p.data * 1.5
    stats = SpeculativeStats()
    ids = list(speculative_stream(target, draft, [5, 6], 40, temperature=0, stats=stats))
    assert ids == generate(target, [5, 6], 40, temperature=0)[0]
    assert 0 < stats.accepted < stats.drafted  # partial rounds: the caches were rolled back


def test_speculative_sampling_is_seeded_and_the_cache_changes_nothing():
    target, draft = tiny_gpt(0, "rope"), tiny_gpt(3, "rope", n_layer=1)
    kwargs = dict(num_draft=3, temperature=0.9, top_k=6, top_p=0.95, seed=11)
    cached, stats = speculative_generate(target, draft, [1, 2], 50, **kwargs)
    assert 0 < stats.accepted < stats.drafted  # rollbacks happened
    assert speculative_generate(target, draft, [1, 2], 50, **kwargs)[0] == cached
    assert speculative_generate(target, draft, [1, 2], 50, use_cache=False, **kwargs)[0] == cached
    assert speculative_generate(target, draft, [1, 2], 50, **{**kwargs, "seed": 12})[0] != cached


def test_speculative_rejects_mismatched_models_and_bad_k():
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(tiny_gpt(), tiny_gpt(vocab_size=7), [1], 3)
    with pytest.raises(ValueError, match="num_draft"):
        speculative_generate(tiny_gpt(), tiny_gpt(1), [1], 3, num_draft=0)


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom; cells expecting < 5 are pooled."""
    expected = probs * counts.sum()
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return float(((counts - expected) ** 2 / expected).sum()), len(counts) - 1


def critical_value(df: int) -> float:
    """The chi-square statistic exceeded with probability 0.001 under the null."""
    try:
        from scipy.stats import chi2
        return float(chi2.isf(0.001, df))
    except ImportError:
        return {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467}[df]


def test_speculative_sampling_follows_the_target_distribution():
    def peaky(seed: int, scale: float) -> GPT:  # a vocabulary of 5 and far-from-uniform outputs
        model = tiny_gpt(seed, vocab_size=5, block_size=8, n_layer=1, n_head=1, n_embd=8)
        model.wte.weight.data = model.wte.weight.data * scale
        return model.eval()

    target, draft = peaky(0, 6.0), peaky(1, 2.0)
    prompt, n = [1, 2], 1500

    def dist(model: GPT, ids: list[int]) -> np.ndarray:
        logits = model_logits(model, ids).astype(np.float64)
        e = np.exp(logits - logits.max())
        return e / e.sum()

    p1 = dist(target, prompt)  # the exact distribution of the first token
    p2 = sum(p1[x] * dist(target, prompt + [x]) for x in range(5))  # and of the second
    first, second = np.zeros(5), np.zeros(5)
    stats = SpeculativeStats()
    for i in range(n):  # max_new_tokens 3, so each round drafts 2: both positions are verified
        out = list(speculative_stream(target, draft, prompt, 3, num_draft=2, seed=i, stats=stats))
        first[out[0]] += 1
        second[out[1]] += 1
    for counts, probs in ((first, p1), (second, p2)):
        stat, df = chi_square(counts, probs)
        assert stat < critical_value(df), (counts / n, probs)
    assert 0 < stats.accepted < stats.drafted  # both branches of the rule ran
    # the test has power: sampling from the draft instead would fail it by far
    q1 = dist(draft, prompt)
    assert chi_square(q1 * n, p1)[0] > 3 * critical_value(4)


# --- attention maps ---------------------------------------------------------------------------


def test_attention_maps_are_causal_distributions():
    model = tiny_gpt(pos="rope")
    ids = [1, 2, 3, 4, 5, 6]
    maps = attention_maps(model, ids, layer=1)
    assert maps.shape == (2, 6, 6)
    np.testing.assert_allclose(maps.sum(axis=-1), 1.0, atol=1e-5)
    assert np.all(np.triu(maps, k=1) == 0)
    assert model.h[1].attn.keep_weights is False and model.h[1].attn.last_weights is None
    assert attention_maps(model, list(range(11)) * 4, layer=-1).shape == (2, 32, 32)  # cropped
    with pytest.raises(ValueError, match="layer"):
        attention_maps(model, ids, layer=2)


def test_plot_attention_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    maps = attention_maps(tiny_gpt(), [1, 2, 3], layer=0)
    assert plot_attention(maps, tmp_path / "attn.png", labels=list("abc"))
    assert (tmp_path / "attn.png").read_bytes()[:4] == b"\x89PNG"


# --- sample.py end to end -------------------------------------------------------------------------

needs_subprocess = pytest.mark.skipif(STRICT, reason="the subprocess tests run on the CPU device only")


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TINYGRAD_LITE_DEVICE": "cpu"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sample")
    text = "".join(f"the {w} ran to the {v} and back.\n" for w in ("cat", "dog", "fox") for v in ("sea", "hill"))
    (tmp / "data.txt").write_text(text * 40)
    result = run_script("train.py", "--data", str(tmp / "data.txt"), "--out-dir", str(tmp / "out"),
                        "--max-iters", "3", "--eval-iters", "1", "--eval-interval", "3", "--batch-size", "2",
                        "--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--no-progress")
    assert result.returncode == 0, result.stderr
    return tmp / "out"


@needs_subprocess
def test_sample_py_streams_text_to_stdout(checkpoint):
    result = run_script("sample.py", "--out-dir", str(checkpoint), "--prompt", "the ", "--max-new-tokens", "40",
                        "--num-samples", "2", "--top-k", "5", "--top-p", "0.9", "--verbose")
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("---------------")
    assert len(samples) == 2 and all(s.strip().startswith("the") for s in samples)
    assert "prefill" in result.stderr and "decode" in result.stderr
    again = run_script("sample.py", "--out-dir", str(checkpoint), "--prompt", "the ", "--max-new-tokens", "40",
                       "--num-samples", "2", "--top-k", "5", "--top-p", "0.9", "--no-cache")
    assert again.stdout == result.stdout  # same seed, and the cache changes nothing


@needs_subprocess
def test_sample_py_speculative_with_a_prompt_file_and_a_stop(checkpoint, tmp_path):
    (tmp_path / "prompt.txt").write_text("the cat")
    result = run_script("sample.py", "--out-dir", str(checkpoint), "--draft-out-dir", str(checkpoint),
                        "--prompt", f"@{tmp_path / 'prompt.txt'}", "--max-new-tokens", "30", "--temperature", "0",
                        "--verbose", "--stop", "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the cat") and "\n" not in result.stdout.rstrip("\n")
    assert "acceptance rate 100.0%" in result.stderr  # a draft identical to the target


@needs_subprocess
@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature"),
    (["--top-k", "0"], "top_k"),
    (["--top-p", "1.5"], "top_p"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--prompt", "ZQ"], "outside the char vocabulary"),
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "@/no/such/file.txt"], "prompt file"),
    (["--no-such-flag"], "unrecognized"),
    (["--max-new-tokens", "x"], "invalid int"),
])
def test_sample_py_bad_flags_are_one_line_errors(checkpoint, flags, message):
    result = run_script("sample.py", "--out-dir", str(checkpoint), *flags)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@needs_subprocess
def test_sample_py_bad_checkpoints_are_one_line_errors(tmp_path):
    (tmp_path / "ckpt.npz").write_bytes(b"PK\x03\x04 not really a zip file")
    for out_dir in (tmp_path / "missing", tmp_path):
        result = run_script("sample.py", "--out-dir", str(out_dir))
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" in run_script("sample.py", "--out-dir", str(tmp_path), "--debug").stderr


@needs_subprocess
def test_sample_py_attention_map(checkpoint, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "attn.png"
    result = run_script("sample.py", "--out-dir", str(checkpoint), "--max-new-tokens", "10",
                        "--attention-map", str(png), "--layer", "0")
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_sample_py_prompts_runs_a_file_through_the_engine_as_generate_would(checkpoint, tmp_path, capsys):
    import sample
    from sample import SEPARATOR
    (tmp_path / "prompts.txt").write_text("the cat\n\nthe dog ran\nthe\n")
    (tmp_path / "prompts.jsonl").write_text('"the cat"\n{"prompt": "the dog ran"}\n"the"\n')
    outputs = []
    for name in ("prompts.txt", "prompts.jsonl"):
        assert sample.main(["--out-dir", str(checkpoint), "--prompts", str(tmp_path / name), "--max-new-tokens", "5",
                            "--temperature", "0", "--max-batch-size", "2", "--verbose"]) == 0
        captured = capsys.readouterr()
        outputs.append(captured.out)
        assert "3 requests, 15 tokens" in captured.err and "time to first token p50" in captured.err
        assert "prefix cache:" in captured.err
    assert outputs[0] == outputs[1]  # the text and the JSONL file hold the same prompts
    completions = outputs[0].split(SEPARATOR)
    for prompt, completion in zip(("the cat", "the dog ran", "the"), completions):
        assert sample.main(["--out-dir", str(checkpoint), "--prompt", prompt, "--max-new-tokens", "5",
                            "--temperature", "0"]) == 0
        assert capsys.readouterr().out.strip("\n") == completion.strip("\n")  # greedy: generate()'s tokens


@pytest.mark.parametrize("content, flags, message", [
    ("", [], "holds no prompts"),
    ('{"text": 1}\n', [], 'expected a string or an object with a "prompt" string'),
    ("{oops\n", [], "not JSON"),
    ("the\n", ["--chat"], "does not combine"),
    ("the\n", ["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
    ("the\nthe dog ran\n", ["--max-new-tokens", "10"], "prompt 2: the prompt (11 tokens) plus max_new_tokens (10)"),
    ("the\nthe ZOO\n", ["--max-new-tokens", "3"], "prompt 2: character(s) 'O', 'Z' are outside"),
])
def test_sample_py_prompts_errors_are_one_line(checkpoint, tmp_path, capsys, content, flags, message):
    import sample
    path = tmp_path / ("p.jsonl" if content.startswith("{") else "p.txt")
    path.write_text(content)
    assert sample.main(["--out-dir", str(checkpoint), "--prompts", str(path), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
