"""DPO (model/dpo.py, train.py --stage dpo): the loss is ln 2 where it starts and its
gradient checks out in float64, log-probabilities count only the answers, the reference
never changes, runs resume exactly, and bad input gets one line."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import train
from model import dpo
from model.chat import ChatTokenizer, render
from model.checkpoint import load_checkpoint, load_extra
from model.sft import IGNORE, padded_batch
from model.tokenizer import make_tokenizer
from tinygrad_lite import Tensor, backend, gradcheck

from chat_runs import TINY, make_base
from strategies import arrays, tensor


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpo")
    made = make_base(folder)
    made["sft"] = folder / "sft"
    assert train.main(["--stage", "sft", "--data", str(made["chats"]), "--init-from", str(made["base"]),
                       "--out-dir", str(made["sft"]), "--max-iters", "4", *TINY]) == 0
    return made


def test_the_loss_is_ln_2_when_the_policy_is_the_reference():
    logps = Tensor(np.array([-3.0, -7.5, -1.25]), requires_grad=True)
    other = Tensor(np.array([-2.0, -9.0, -4.0]), requires_grad=True)
    loss, chosen, rejected = dpo.dpo_loss(logps, other, logps.numpy(), other.numpy(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert not chosen.any() and not rejected.any()
    loss.backward()  # at the start the gradient is beta/2 * (d chosen - d rejected), not zero
    np.testing.assert_allclose(backend.to_numpy(logps.grad), [-0.1 / 2 / 3] * 3)
    np.testing.assert_allclose(backend.to_numpy(other.grad), [0.1 / 2 / 3] * 3)


@given(data=st.data(), beta=st.sampled_from([0.1, 0.5, 2.0]))
def test_the_loss_passes_the_float64_gradient_check(data, beta):
    B = data.draw(st.integers(1, 4))
    pc, pr = tensor(data.draw(arrays((B,), -20, 0))), tensor(data.draw(arrays((B,), -20, 0)))
    rc, rr = data.draw(arrays((B,), -20, 0)), data.draw(arrays((B,), -20, 0))
    gradcheck(lambda a, b: dpo.dpo_loss(a, b, rc, rr, beta)[0], [pc, pr], name="dpo_loss")
    same_c, same_r = pc.numpy(), pr.numpy()  # a reference equal to the policy: z = 0, where DPO starts
    gradcheck(lambda a, b: dpo.dpo_loss(a, b, same_c, same_r, beta)[0], [pc, pr], name="dpo_loss at policy == reference")


def test_log_sigmoid_is_finite_far_out_and_has_slope_one_half_at_zero():
    z = Tensor(np.array([-1e4, -50.0, 0.0, 50.0, 1e4]), requires_grad=True)
    out = dpo.log_sigmoid(z)
    out.sum().backward()
    np.testing.assert_allclose(out.numpy(), [-1e4, -50.0, -math.log(2), 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(z.grad), [1.0, 1.0, 0.5, 0.0, 0.0], atol=1e-12)


def test_rewards_are_detached_and_log_probs_count_only_the_answer():
    chat = ChatTokenizer(make_tokenizer("char", "shout: good GOOD!."))
    rows = [render(chat, [{"role": "user", "content": "shout: good"}, {"role": "assistant", "content": a}])
            for a in ("GOOD!", "GOOD.")]
    x, y = padded_batch(rows, [0, 1], 24, chat.special("<|end|>"))
    logits = Tensor(np.random.default_rng(0).standard_normal((2, 24, chat.vocab_size)), requires_grad=True)
    logps = dpo.sequence_logps(logits, y)
    log_probs = logits.numpy() - np.log(np.exp(logits.numpy()).sum(-1, keepdims=True))
    for b in range(2):
        keep = y[b] != IGNORE
        assert keep.sum() == 6  # G O O D !|. <|end|>
        assert logps.numpy()[b] == pytest.approx(log_probs[b, np.arange(24)[keep], y[b][keep]].sum(), rel=1e-12)
    loss, chosen, rejected = dpo.dpo_loss(logps[:1], logps[1:], np.zeros(1), np.zeros(1), 0.1)
    assert isinstance(chosen, np.ndarray) and isinstance(rejected, np.ndarray)
    np.testing.assert_allclose(chosen, 0.1 * logps.numpy()[:1])


def test_kl_to_reference_is_exact_and_never_below_zero():
    rng = np.random.default_rng(0)
    targets = np.array([[1, 2, IGNORE], [IGNORE, 0, 3]])
    ref = rng.standard_normal((2, 3, 5)).astype(np.float32)
    policy = ref + rng.standard_normal((2, 3, 5)).astype(np.float32)
    p = policy - np.log(np.exp(policy.astype(np.float64)).sum(-1, keepdims=True))
    r = ref - np.log(np.exp(ref.astype(np.float64)).sum(-1, keepdims=True))
    expected = (np.exp(p) * (p - r)).sum(-1)[targets != IGNORE].mean()
    assert dpo.kl_to_reference(Tensor(policy), Tensor(ref), targets) == pytest.approx(expected, rel=1e-5)
    # a policy a hair away from its reference: float32 rounding must not make the KL negative
    nearly = [dpo.kl_to_reference(Tensor(ref + np.float32(1e-7) * rng.standard_normal(ref.shape).astype(np.float32)),
                                  Tensor(ref), targets) for _ in range(20)]
    assert min(nearly) >= 0.0 and max(nearly) < 1e-6  # (float32 log-probs: a noise floor of ~1e-7)


def test_the_reference_never_changes_and_never_gets_a_gradient(runs, tmp_path):
    import argparse
    out = tmp_path / "dpo"
    args = train.parse_args(["--stage", "dpo", "--data", str(runs["prefs"]), "--init-from", str(runs["sft"]),
                             "--out-dir", str(out), *TINY])
    cfg = train.resolve_config(args)
    cfg["data"] = args.data
    run = train.setup(cfg, args)
    start = {k: v.copy() for k, v in run.reference.state_dict().items()}
    sft_state, _, _ = load_checkpoint(runs["sft"])
    for k in start:
        np.testing.assert_array_equal(start[k], sft_state[k])  # the frozen copy of where DPO starts
    for _ in range(3):
        train.train_step(run, 1e-3)
        assert all(p.grad is None for p in run.reference.parameters())
    after = run.reference.state_dict()
    for k in start:
        np.testing.assert_array_equal(after[k], start[k], err_msg=k)  # bitwise unchanged
    assert any(not np.array_equal(run.model.state_dict()[k], start[k]) for k in start)  # the policy moved
    assert isinstance(args, argparse.Namespace)


def test_dpo_stores_its_reference_and_resumes_exactly(runs, tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    flags = ["--stage", "dpo", "--data", str(runs["prefs"]), "--init-from", str(runs["sft"]), "--beta", "0.5", *TINY]
    assert train.main([*flags, "--out-dir", str(straight), "--max-iters", "8"]) == 0
    assert train.main([*flags, "--out-dir", str(halves), "--max-iters", "4"]) == 0
    assert train.main(["--resume", "--out-dir", str(halves), "--max-iters", "8", *TINY]) == 0
    a, meta_a, _ = load_checkpoint(straight)
    b, meta_b, _ = load_checkpoint(halves)
    assert meta_a["iter_num"] == meta_b["iter_num"] == 8 and meta_b["config"]["beta"] == 0.5
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    sft_state, _, _ = load_checkpoint(runs["sft"])
    reference = load_extra(halves, "reference")
    for name in sft_state:
        np.testing.assert_array_equal(reference[name], sft_state[name], err_msg=name)
    for key in ("reward_margin", "reward_accuracy", "kl"):
        assert key in meta_a["losses"]


BAD = {
    "malformed JSON": (['{"prompt": "shout: good", '], [], "prefs.jsonl:1: malformed JSON"),
    "missing prompt": (['{"chosen": "GOOD!", "rejected": "GOOD."}'], [], "prefs.jsonl:1: missing 'prompt'"),
    "missing chosen": (['{"prompt": "shout: good", "rejected": "GOOD."}'], [], "prefs.jsonl:1: missing 'chosen'"),
    "missing rejected": (['{"prompt": "shout: good", "chosen": "GOOD!"}'], [], "prefs.jsonl:1: missing 'rejected'"),
    "empty answer": (['{"prompt": "shout: good", "chosen": "", "rejected": "GOOD."}'], [], "empty assistant turn"),
    "beta 0": ([], ["--beta", "0"], "--beta must be > 0, got 0.0"),
    "beta negative": ([], ["--beta", "-1"], "--beta must be > 0, got -1.0"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_dpo_input_gets_one_line(kind, runs, tmp_path, capsys):
    lines, flags, words = BAD[kind]
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(lines) + "\n" if lines else runs["prefs"].read_text())
    out = tmp_path / "out"
    code = train.main(["--stage", "dpo", "--data", str(data), "--init-from", str(runs["sft"]), "--out-dir", str(out),
                       *TINY, *flags])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_dpo_without_init_from_says_so(runs, tmp_path, capsys):
    code = train.main(["--stage", "dpo", "--data", str(runs["prefs"]), "--out-dir", str(tmp_path / "o"), *TINY])
    assert code == 2
    assert "--stage dpo starts from a trained model: pass --init-from OUT_DIR (an SFT out dir" in capsys.readouterr().err


def test_sample_chat_answers_and_keeps_the_conversation(runs, monkeypatch, capsys):
    import io
    import sample
    seen = []

    def recording_render(chat, messages, add_generation_prompt=False):
        seen.append([m["role"] for m in messages])
        return render(chat, messages, add_generation_prompt)
    monkeypatch.setattr(sample, "render", recording_render)
    monkeypatch.setattr("sys.stdin", io.StringIO("shout: good\nshout: king\n"))
    assert sample.main(["--out-dir", str(runs["sft"]), "--chat", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("you: ") == 3 and captured.out  # two turns, then EOF ends it cleanly
    assert seen == [["user"], ["user", "assistant", "user"]]  # the second turn sees the first
    monkeypatch.setattr("sys.stdin", io.StringIO("shout: ~~~\n"))  # '~' is outside the char vocabulary
    assert sample.main(["--out-dir", str(runs["sft"]), "--chat", "--max-new-tokens", "3"]) == 0
    assert "error: character(s) '~' are outside the char vocabulary" in capsys.readouterr().err


def test_chat_needs_a_chat_checkpoint(runs, capsys):
    import sample
    assert sample.main(["--out-dir", str(runs["base"]), "--chat"]) == 2
    assert "--chat needs a chat checkpoint" in capsys.readouterr().err
