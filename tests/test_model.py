"""The GPT: it learns, it is causal, RoPE is relative, attention matches its fused twin,
and a whole tiny model passes a float64 gradient check."""
from __future__ import annotations

import numpy as np
import pytest

import tinygrad_lite.functional as F
from tinygrad_lite import Tensor, backend, gradcheck, manual_seed, no_grad, optim
from model.attention import self_attention
from model.gpt import GPT, GPTConfig
from model.rope import RotaryEmbedding

TINY = dict(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=16)


def tiny_gpt(**overrides) -> GPT:
    manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides}))


def batch(B=3, T=16, V=13, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, (B, T))
    return x, np.roll(x, -1, axis=1)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_overfits_one_batch(pos):
    model = tiny_gpt(pos=pos)
    x, y = batch()
    opt = optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)
    first = None
    for _ in range(60):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else loss.item()
    assert first > 2.0  # about ln(13) = 2.56 at init
    assert loss.item() < 0.3, f"{pos}: loss {first:.3f} -> {loss.item():.3f}"


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_changing_a_later_token_never_changes_earlier_logits(pos):
    model = tiny_gpt(pos=pos)
    x, _ = batch(B=1)
    with no_grad():
        before = model(x)[0].numpy()
        for t in (3, 9, 15):
            changed = x.copy()
            changed[0, t] = (changed[0, t] + 1) % 13
            after = model(changed)[0].numpy()
            np.testing.assert_array_equal(after[:, :t], before[:, :t])
            assert not np.allclose(after[:, t], before[:, t])  # the changed position does move


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(head_size=8, max_positions=64)
    rng = np.random.default_rng(1)
    q = Tensor(rng.standard_normal((1, 1, 1, 8)).astype(np.float32))
    k = Tensor(rng.standard_normal((1, 1, 1, 8)).astype(np.float32))

    def score(p_q, p_k):
        return (rope(q, p_q) * rope(k, p_k)).sum().item()
    for shift in (1, 7, 30):
        assert score(10, 4) == pytest.approx(score(10 + shift, 4 + shift), abs=1e-4)
        assert score(5, 5) == pytest.approx(score(5 + shift, 5 + shift), abs=1e-4)
    assert score(10, 4) != pytest.approx(score(10, 6), abs=1e-3)  # but distance matters
    # a rotation keeps lengths
    np.testing.assert_allclose(np.linalg.norm(rope(q, 17).numpy()), np.linalg.norm(q.numpy()), rtol=1e-5)


@pytest.mark.parametrize("Tq,Tk", [(5, 5), (1, 6), (3, 7)])
def test_standalone_self_attention_equals_fused(Tq, Tk):
    rng = np.random.default_rng(2)
    q = Tensor(rng.standard_normal((2, 3, Tq, 4)), requires_grad=True)
    k = Tensor(rng.standard_normal((2, 3, Tk, 4)), requires_grad=True)
    v = Tensor(rng.standard_normal((2, 3, Tk, 4)), requires_grad=True)
    from tinygrad_lite.ops import causal_mask
    out, weights = self_attention(q, k, v, causal_mask(q.xp, Tq, Tk))
    fused = F.scaled_dot_product_attention(q, k, v, causal=True)
    np.testing.assert_allclose(out.numpy(), fused.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(weights.numpy().sum(-1), 1.0, rtol=1e-12)
    assert np.all(np.triu(weights.numpy()[0, 0], k=1 + Tk - Tq) == 0)  # nothing from the future
    out.sum().backward()
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    fused.sum().backward()
    for g, t in zip(grads, (q, k, v)):
        np.testing.assert_allclose(backend.to_numpy(g), backend.to_numpy(t.grad), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_whole_tiny_gpt_gradient_check_in_float64(pos):
    model = tiny_gpt(pos=pos, block_size=6, n_embd=8, vocab_size=7)
    for p in model.parameters():
        p.data = p.data.astype("float64")
    x, y = batch(B=2, T=6, V=7, seed=3)
    gradcheck(lambda *params: model(x, y)[1], model.parameters(), atol=1e-6, rtol=1e-4,
              max_elements=16, directions=3, name=f"GPT ({pos})")


def test_learned_and_rope_models_both_train_on_text():
    text = "to be or not to be, that is the question. " * 20
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text])
    rng = np.random.default_rng(0)
    for pos in ("learned", "rope"):
        model = tiny_gpt(pos=pos, vocab_size=len(chars))
        opt = optim.AdamW(model.optimizer_groups(0.1), lr=1e-2)
        losses = []
        for _ in range(40):
            starts = rng.integers(0, len(ids) - 17, 8)
            x = np.stack([ids[s:s + 16] for s in starts])
            y = np.stack([ids[s + 1:s + 17] for s in starts])
            _, loss = model(x, y)
            loss.backward()
            optim.clip_grad_norm(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), (pos, losses[:5], losses[-5:])


def test_config_errors():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="pos"):
        GPTConfig(pos="sinusoid")
    with pytest.raises(ValueError, match="longer than block_size"):
        tiny_gpt()(np.zeros((1, 17), dtype=np.int64))
    with pytest.raises(IndexError, match="out of range"):
        tiny_gpt()(np.full((1, 4), 13))


def test_weight_tying_and_init():
    model = tiny_gpt(n_layer=4, n_embd=32, vocab_size=50)
    names = dict(model.named_parameters())
    assert "lm_head.weight" not in names  # the head *is* wte
    std = lambda n: float(names[n].numpy().std())
    assert std("wte.weight") == pytest.approx(0.02, rel=0.15)
    assert std("h.0.attn.c_proj.weight") == pytest.approx(0.02 / np.sqrt(8), rel=0.15)
    groups = model.optimizer_groups(0.1)
    assert all(p.ndim == 2 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])


def test_a_tiny_gpt_trains_the_same_in_every_tier():
    """Same seed, same batches, 30 AdamW steps in float32: the three ops tiers end on the
    same loss and weights, up to float32 rounding."""
    from tinygrad_lite import optim, ops_tier
    from tinygrad_lite.functional import TIERS
    rng = np.random.default_rng(0)
    data = (np.arange(2000) * 3 + rng.integers(0, 2, 2000)) % 11  # a pattern, a little noise
    results = {}
    for tier in TIERS:
        manual_seed(0)
        model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1))
        opt = optim.AdamW(model.optimizer_groups(0.1), lr=3e-3)
        batches = np.random.default_rng(1)
        losses = []
        with ops_tier(tier):
            for _ in range(30):
                starts = batches.integers(0, len(data) - 17, 4)
                window = data[starts[:, None] + np.arange(17)]
                _, loss = model(window[:, :-1], window[:, 1:])
                loss.backward()
                optim.clip_grad_norm(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
        results[tier] = losses, model.state_dict()
    first, last = results["primitive"][0], results["primitive"][0][-1]
    assert last < first[0] - 0.1  # it learned something
    for tier in ("fused", "fast"):
        np.testing.assert_allclose(results[tier][0], first, rtol=2e-5, atol=2e-5, err_msg=tier)
        for name, w in results["primitive"][1].items():
            np.testing.assert_allclose(results[tier][1][name], w, rtol=1e-3, atol=1e-4, err_msg=f"{tier} {name}")
