"""Every bad input in docs/errors.md gets the error the table promises.

Three tables, one parametrized test each:
- API_ERRORS: calls into the engine and the model code -> (exception type, message);
- TRAIN_ERRORS and SAMPLE_ERRORS: command lines -> exit code 2 and exactly one line on
  stderr, "error: ...", with no traceback; with --debug the traceback is shown instead.
The CLI rows run in-process through `train.main` / `sample.main` (fast); set
TEST_ERRORS_SUBPROCESS=1 to run each one as a real `python train.py ...` process.
Rows already covered by other test files are cited there, not repeated here; the last
test checks that every test docs/errors.md cites exists.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import sample
import train
from model.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from model.data import get_batch
from model.generate import stream
from model.gpt import GPT, GPTConfig
from model.tokenizer import load_encoding, tokenizer_from_dict
from tinygrad_lite import Tensor, backend, concatenate, manual_seed, nn, optim, where
from tinygrad_lite import functional as F

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
SUBPROCESS = os.environ.get("TEST_ERRORS_SUBPROCESS") == "1"
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--max-iters", "2", "--eval-iters", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def restore_default_device():
    """train.py and sample.py --device switch the default device; put it back."""
    before = backend.default_device()
    yield
    backend.set_default_device(before)


def leaf(*shape, device="cpu") -> Tensor:
    return Tensor(np.zeros(shape), requires_grad=True, device=device)


def ids(values, device="cpu") -> Tensor:
    return Tensor(np.array(values, dtype=np.int64), device=device)


# --- files: broken checkpoints, each in its own folder as ckpt.npz ------------------------


def write_checkpoint_files(folder: Path, base: Path | None = None) -> dict[str, Path]:
    """name -> an out dir holding one kind of bad checkpoint: old single-file ckpt.npz
    breakages (format 1 is still read), and breakages of the current format. With `base`
    (a good out dir), the header-level ones start from its real weights and header."""
    files: dict[str, Path] = {}

    def put(name: str, content: bytes | None = None) -> Path:
        """The out dir `name`; with content, its ckpt.npz (the old format) holds that."""
        (folder / name).mkdir(parents=True, exist_ok=True)
        if content is not None:
            (folder / name / "ckpt.npz").write_bytes(content)
        files[name] = folder / name
        return folder / name

    put("empty", b"")
    put("text", b"just some text, not a checkpoint\n")
    np.save(folder / "array.npy", np.ones(3))
    put("npy", (folder / "array.npy").read_bytes())
    np.savez(put("pickled") / "ckpt.npz", payload=np.array([{"run": "code"}], dtype=object))
    np.savez(put("no-meta") / "ckpt.npz", w=np.ones(3, np.float32))
    np.savez(put("bad-header") / "ckpt.npz", __meta__=np.frombuffer(b"\xff\xfe{not json", dtype=np.uint8))
    legacy = {"model/w": np.ones(3, np.float32), "__meta__": np.frombuffer(b'{"format_version": 1}', dtype=np.uint8)}
    np.savez(folder / "legacy.npz", **legacy)
    data = (folder / "legacy.npz").read_bytes()
    put("npz-truncated", data[: len(data) // 2])
    save_checkpoint(put("old-format"), {"w": np.ones(3, np.float32)}, {"iter_num": 1})
    manifest = folder / "old-format" / "checkpoint.json"
    manifest.write_text(manifest.read_text().replace(f'"format_version": {FORMAT_VERSION}',
                                                     f'"format_version": {FORMAT_VERSION + 1}'))
    if base is None:
        save_checkpoint(put("good"), {"w": np.ones(3, np.float32)}, {"iter_num": 1})
        truncate_weights(Path(shutil.copytree(folder / "good", put("truncated"), dirs_exist_ok=True)))
        return files

    state, meta, opt = load_checkpoint(base)
    meta = {k: v for k, v in meta.items() if k not in ("format_version", "sha256")}
    truncate_weights(Path(shutil.copytree(base, put("truncated"), dirs_exist_ok=True)))
    save_checkpoint(put("no-model-config"), state, {k: v for k, v in meta.items() if k != "model_config"}, opt)
    save_checkpoint(put("no-train-config"), state, {k: v for k, v in meta.items() if k != "config"}, opt)
    save_checkpoint(put("no-optimizer"), state, meta)
    save_checkpoint(put("broken-tokenizer"), state, {**meta, "tokenizer": {"kind": "char"}}, opt)
    chars = meta["tokenizer"]["chars"]  # same vocabulary size, different characters
    other = {"kind": "char", "chars": chars[1:] + "~"}
    save_checkpoint(put("other-tokenizer"), state, {**meta, "tokenizer": other}, opt)
    save_checkpoint(put("bad-weights"), {**state, "wte.weight": np.zeros((3, 3), np.float32)}, meta, opt)
    save_checkpoint(put("bad-config"), state, {**meta, "model_config": {**meta["model_config"], "n_head": 3}}, opt)
    return files


def truncate_weights(out: Path) -> None:
    """Cut the current checkpoint's model.safetensors in half."""
    import json
    weights = out / json.loads((out / "checkpoint.json").read_text())["checkpoint"] / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> SimpleNamespace:
    """A text file, a tiny trained out dir, and broken variants of its checkpoint."""
    tmp = tmp_path_factory.mktemp("errors")
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "shall", "speak", "now", "and", "then", "to", "my", "lord"]
    text = tmp / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(100)), encoding="utf-8")
    before = backend.default_device()
    good = tmp / "good"
    assert train.main(["--data", str(text), "--out-dir", str(good), *TINY]) == 0
    backend.set_default_device(before)
    (tmp / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp / "unseen.txt").write_text("ZZZ the king shall speak. " * 20, encoding="utf-8")
    return SimpleNamespace(tmp=tmp, text=text, good=good, bad=write_checkpoint_files(tmp / "bad", good))


# --- the API table ---------------------------------------------------------------------------
# id -> (call(tmp_path, files), exception type, regex the message must match)


def _cross_entropy(targets, device="cpu", V=5, **kw):
    return F.cross_entropy(leaf(len(targets), V, device=device), np.array(targets), **kw)


API_ERRORS = {
    # shapes
    "matmul-1d": (lambda t, f: leaf(3) @ leaf(3, 2), ValueError, r"matmul needs 2-D .*\(3,\) and \(3, 2\)"),
    "matmul-batch": (lambda t, f: leaf(2, 4, 5) @ leaf(3, 5, 6), ValueError,
                     r"matmul batch dims do not broadcast: \(2, 4, 5\) @ \(3, 5, 6\)"),
    "reshape": (lambda t, f: leaf(2, 3).reshape(4), ValueError,
                r"cannot reshape .*\(2, 3\) \(6 elements\) into \(4,\)"),
    "permute": (lambda t, f: leaf(2, 3).permute(0, 0), ValueError, r"\(0, 0\) are not a permutation of 2 axes"),
    "sum-axis": (lambda t, f: leaf(2, 3).sum(axis=2), ValueError, "axis 2 is out of range for a tensor with 2 dim"),
    "mean-axis": (lambda t, f: leaf(2, 3).mean(axis=-3), ValueError, "axis -3 is out of range for a tensor with 2 dim"),
    "transpose-axes": (lambda t, f: leaf(2, 3).transpose(0, 2), ValueError,
                       r"transpose axes \(0, 2\) are out of range for a tensor with 2 dimensions"),
    "softmax-axis": (lambda t, f: leaf(2, 3).softmax(axis=2), IndexError,
                     "axis 2 is out of bounds for array of dimension 2"),
    "split-equal": (lambda t, f: leaf(5).split(2), ValueError, "cannot split length 5 into 2 equal pieces"),
    "split-sizes": (lambda t, f: leaf(5).split([2, 2]), ValueError, r"split sizes \[2, 2\] do not add up to length 5"),
    "concatenate-empty": (lambda t, f: concatenate([]), ValueError, "at least one tensor"),
    "linear": (lambda t, f: F.linear(leaf(2, 3), leaf(4, 5)), ValueError, r"input has 3 features but weight \(4, 5\)"),
    "layer-norm": (lambda t, f: F.layer_norm(leaf(2, 3), leaf(4)), ValueError, r"weight has shape \(4,\) .*\(2, 3\)"),
    "attention": (lambda t, f: F.scaled_dot_product_attention(leaf(1, 1, 2, 4), leaf(1, 1, 2, 3), leaf(1, 1, 2, 4)),
                  ValueError, r"q \(1, 1, 2, 4\), k \(1, 1, 2, 3\), v .* do not fit together"),
    "cross-entropy-shape": (lambda t, f: F.cross_entropy(leaf(2, 5), np.array([1, 2, 3])), ValueError,
                            r"targets shape \(3,\) does not match logits shape \(2, 5\)"),
    # devices
    "where-devices": (lambda t, f: where(Tensor(np.array([True]), device="strict"), leaf(1), 0.0), RuntimeError,
                      "condition is on strict, values on cpu"),
    # integer indices: NumPy raises, CuPy would wrap silently, so the engine checks them
    "getitem-array-cpu": (lambda t, f: leaf(3, 2)[ids([0, 5])], IndexError,
                          r"index 5 is out of range for axis 0 with size 3 \(valid: -3\.\.2\)"),
    "getitem-array-strict": (lambda t, f: leaf(3, 2, device="strict")[ids([0, 5], "strict")], IndexError,
                             "index 5 is out of range for axis 0 with size 3"),
    "getitem-negative-strict": (lambda t, f: leaf(3, 2, device="strict")[ids([-4], "strict")], IndexError,
                                "index -4 is out of range for axis 0"),
    "getitem-second-axis-strict": (lambda t, f: leaf(3, 2, device="strict")[:, ids([2], "strict")], IndexError,
                                   "index 2 is out of range for axis 1 with size 2"),
    "getitem-int": (lambda t, f: leaf(3, 2)[7], IndexError, "index 7 is out of range for axis 0"),
    "getitem-list": (lambda t, f: leaf(3, 2)[[0, 3]], IndexError, "index 3 is out of range for axis 0"),
    "cross-entropy-target-cpu": (lambda t, f: _cross_entropy([1, 5]), IndexError,
                                 "cross_entropy: target 5 is out of range for size 5"),
    "cross-entropy-target-strict": (lambda t, f: _cross_entropy([1, 5], "strict"), IndexError,
                                    "cross_entropy: target 5 is out of range for size 5"),
    "cross-entropy-negative": (lambda t, f: _cross_entropy([-1, 0], "strict"), IndexError,
                               "cross_entropy: target -1 is out of range"),
    "cross-entropy-float": (lambda t, f: F.cross_entropy(leaf(2, 5), np.array([1.0, 2.0])), TypeError,
                            "targets must be integer class ids, got float64"),
    "embedding-id-cpu": (lambda t, f: F.embedding(leaf(4, 3), np.array([0, 4])), IndexError,
                         "embedding: token id 4 is out of range for size 4"),
    "embedding-id-strict": (lambda t, f: F.embedding(leaf(4, 3, device="strict"), np.array([-1])), IndexError,
                            "embedding: token id -1 is out of range for size 4"),
    "embedding-float": (lambda t, f: F.embedding(leaf(4, 3), np.array([0.0])), TypeError,
                        "embedding ids must be integers, got float64"),
    # optimizers
    "optimizer-state-shape": (lambda t, f: optim.Adam(nn.Linear(2, 3).parameters()).load_state_dict(
        {"step": 1, "lr": [1e-3], "buffers": {"0.exp_avg": np.zeros(9)}}), ValueError,
        r"optimizer state 0.exp_avg has shape \(9,\), parameter has \(3, 2\)"),
    "optimizer-state-index": (lambda t, f: optim.Adam(nn.Linear(2, 3).parameters()).load_state_dict(
        {"step": 1, "lr": [1e-3], "buffers": {"7.exp_avg": np.zeros((3, 2))}}), ValueError,
        "optimizer state '7.exp_avg' names parameter 7, but this optimizer has 2 parameters"),
    "adam-betas": (lambda t, f: optim.Adam(nn.Linear(2, 3).parameters(), betas=(0.9, 1.0)), ValueError,
                   r"betas must be two numbers in \[0, 1\), got \(0.9, 1.0\)"),
    "sgd-momentum": (lambda t, f: optim.SGD(nn.Linear(2, 3).parameters(), momentum=-0.5), ValueError,
                     "momentum must be >= 0, got -0.5"),
    "clip-negative": (lambda t, f: optim.clip_grad_norm(nn.Linear(2, 3).parameters(), -1.0), ValueError,
                      "max_norm must be > 0, got -1.0"),
    # tokenizers and data
    "tiktoken-name": (lambda t, f: load_encoding("nope"), ValueError,
                      "unknown tiktoken encoding 'nope'; choose one of: cl100k_base"),
    "tokenizer-dict-field": (lambda t, f: tokenizer_from_dict({"kind": "char"}), ValueError,
                             "a 'char' tokenizer needs 'chars' in its dict"),
    "get-batch-size": (lambda t, f: get_batch(np.arange(100), 0, 4, np.random.default_rng(0)), ValueError,
                       "batch_size and block_size must be >= 1, got 0 and 4"),
    # checkpoints
    "checkpoint-missing": (lambda t, f: load_checkpoint(t / "nowhere"), CheckpointError, "no checkpoint at"),
    "checkpoint-empty": (lambda t, f: load_checkpoint(f["empty"]), CheckpointError,
                         "is not a checkpoint: the file is empty"),
    "checkpoint-text": (lambda t, f: load_checkpoint(f["text"]), CheckpointError, r"is not a checkpoint: not an \.npz"),
    "checkpoint-npy": (lambda t, f: load_checkpoint(f["npy"]), CheckpointError, r"is not a checkpoint: not an \.npz"),
    "checkpoint-truncated": (lambda t, f: load_checkpoint(f["truncated"]), CheckpointError,
                             "model.safetensors is corrupted: its sha256 does not match"),
    "checkpoint-npz-truncated": (lambda t, f: load_checkpoint(f["npz-truncated"]), CheckpointError,
                                 "is corrupted or truncated"),
    "checkpoint-no-meta": (lambda t, f: load_checkpoint(f["no-meta"]), CheckpointError, "no __meta__ header"),
    "checkpoint-bad-header": (lambda t, f: load_checkpoint(f["bad-header"]), CheckpointError,
                              "has an unreadable header"),
    "checkpoint-version": (lambda t, f: load_checkpoint(f["old-format"]), CheckpointError,
                           f"has format version {FORMAT_VERSION + 1}; this code reads version {FORMAT_VERSION}"),
    # generation
    "stream-ragged-prompts": (lambda t, f: stream(GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2,
                                                                n_embd=8)), [[1, 2], [3]], 2),
                              ValueError, "prompts of different lengths: use generate()"),
}


@pytest.fixture(scope="module")
def api_files(tmp_path_factory) -> dict[str, Path]:
    return write_checkpoint_files(tmp_path_factory.mktemp("api"))


@pytest.mark.parametrize("name", list(API_ERRORS))
def test_api_errors(name, tmp_path, api_files):
    call, kind, message = API_ERRORS[name]
    manual_seed(0)
    with pytest.raises(kind, match=message) as info:
        call(tmp_path, api_files)
    assert "\n" not in str(info.value)


def test_valid_indices_are_not_rejected_by_the_bounds_check():
    for device in ("cpu", "strict"):
        x = Tensor(np.arange(6.0).reshape(3, 2), requires_grad=True, device=device)
        picked = x[ids([-3, 2, 0], device)]  # negative indices count from the end
        np.testing.assert_array_equal(picked.numpy(), [[0, 1], [4, 5], [0, 1]])
        assert x[..., -2].shape == (3,) and x[None, 1, -1].shape == (1,) and x[ids([], device)].shape == (0, 2)
        assert x[np.array([[True, False], [False, False], [False, True]])].shape == (2,)
        picked.sum().backward()
        np.testing.assert_array_equal(backend.to_numpy(x.grad), [[2, 2], [0, 0], [1, 1]])


def test_load_state_dict_accepts_plain_lists():
    layer = nn.Linear(2, 1)
    layer.load_state_dict({"weight": [[1.0, 2.0]], "bias": [3.0]})
    np.testing.assert_array_equal(layer.weight.numpy(), [[1.0, 2.0]])


# --- the CLI tables --------------------------------------------------------------------------


def run_cli(script: str, argv: list, capsys) -> tuple[int, str]:
    """(exit code, stderr) of `python <script> <argv>`, in-process unless TEST_ERRORS_SUBPROCESS=1."""
    argv = [str(a) for a in argv]
    if SUBPROCESS:
        env = {**os.environ, "TINYGRAD_LITE_DEVICE": "cpu"}
        done = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        return done.returncode, done.stderr
    capsys.readouterr()
    try:
        code = (train if script == "train.py" else sample).main(argv)
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    return code, capsys.readouterr().err


def check_cli_error(script: str, argv: list, words: str, from_argparse: bool, capsys) -> None:
    code, err = run_cli(script, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert words in lines[0], err
    if from_argparse:  # a bad flag: --debug has no traceback to show
        return
    if SUBPROCESS:
        code, err = run_cli(script, [*argv, "--debug"], capsys)
        assert code != 0 and "Traceback" in err, err
    else:
        with pytest.raises(Exception):
            (train if script == "train.py" else sample).main([str(a) for a in argv] + ["--debug"])


def copy_of(folder: Path, tmp: Path) -> Path:
    """A private copy of a checkpoint folder (train.py writes into the out dir it resumes)."""
    return Path(shutil.copytree(folder, tmp / "out"))


# id -> (extra flags built from (ctx, tmp_path), words in the error line, comes from argparse)
TRAIN_ERRORS = {
    "bad-int": (lambda c, t: ["--max-iters", "x"], "argument --max-iters: invalid int value: 'x'", True),
    "unknown-flag": (lambda c, t: ["--no-such-flag"], "unrecognized arguments: --no-such-flag", True),
    "bad-choice": (lambda c, t: ["--pos", "sinusoid"], "argument --pos: invalid choice: 'sinusoid'", True),
    "batch-size-0": (lambda c, t: ["--batch-size", "0"], "--batch-size must be >= 1, got 0", False),
    "n-head-0": (lambda c, t: ["--n-head", "0"], "--n-head must be >= 1, got 0", False),
    "max-iters-negative": (lambda c, t: ["--max-iters", "-1"], "--max-iters must be >= 0, got -1", False),
    "dropout-1": (lambda c, t: ["--dropout", "1"], "--dropout must be in [0, 1), got 1.0", False),
    "lr-0": (lambda c, t: ["--lr", "0"], "--lr must be > 0 and --min-lr >= 0, got 0.0 and", False),
    "lr-nan": (lambda c, t: ["--lr", "nan"], "--lr must be > 0 and --min-lr >= 0, got nan and", False),
    "beta2-1": (lambda c, t: ["--beta2", "1"], "--beta2 must be in [0, 1), got 1.0", False),
    "weight-decay-negative": (lambda c, t: ["--weight-decay", "-1"], "--weight-decay must be >= 0, got -1.0", False),
    "grad-clip-negative": (lambda c, t: ["--grad-clip", "-1"], "--grad-clip must be >= 0 (0: no clipping)", False),
    "warmup-negative": (lambda c, t: ["--warmup-iters", "-5"], "--warmup-iters must be >= 0, got -5", False),
    "rope-odd-head": (lambda c, t: ["--pos", "rope", "--n-embd", "6"], "RoPE needs an even head size", False),
    "unknown-device": (lambda c, t: ["--device", "tpu"], "unknown device 'tpu'; choose one of: cpu, cuda, strict",
                       False),
    "shards-0": (lambda c, t: ["--shards", "0"], "--shards must be >= 1, got 0", False),
    "shards-on-strict": (lambda c, t: ["--shards", "2", "--device", "strict"],
                         "--shards 2 splits batches over CPU processes; on --device strict use --shards 1", False),
    "data-is-a-folder": (lambda c, t: ["--data", t], "is a directory, not a text file", False),
    "out-dir-is-a-file": (lambda c, t: ["--out-dir", c.text], "is a file, not a folder", False),
    "out-dir-under-a-file": (lambda c, t: ["--out-dir", c.text / "run"], "cannot create the out dir", False),
    "init-from-missing": (lambda c, t: ["--init-from", t / "nowhere"], "nowhere does not exist", False),
    "init-from-unseen-characters": (lambda c, t: ["--init-from", c.good, "--data", c.tmp / "unseen.txt"],
                                    "character(s) 'Z' are outside the char vocabulary", False),
    "init-from-broken-tokenizer": (lambda c, t: ["--init-from", c.bad["broken-tokenizer"]],
                                   "a 'char' tokenizer needs 'chars' in its dict", False),
    "resume-without-optimizer": (lambda c, t: ["--resume", "--out-dir", copy_of(c.bad["no-optimizer"], t)],
                                 "has no optimizer state; cannot resume exactly", False),
    "resume-without-train-config": (lambda c, t: ["--resume", "--out-dir", copy_of(c.bad["no-train-config"], t)],
                                    "has no config in its header; was it written by train.py?", False),
    "resume-not-a-checkpoint": (lambda c, t: ["--resume", "--out-dir", copy_of(c.bad["npy"], t)],
                                "is not a checkpoint: not an .npz (zip) file", False),
    "resume-old-format": (lambda c, t: ["--resume", "--out-dir", copy_of(c.bad["old-format"], t)],
                          "has format version", False),
}
if not backend.cuda_available:
    TRAIN_ERRORS["cuda-without-cupy"] = (lambda c, t: ["--device", "cuda"], "device 'cuda' needs CuPy: pip install",
                                         False)


@pytest.mark.parametrize("name", list(TRAIN_ERRORS))
def test_train_cli_errors(name, ctx, tmp_path, capsys):
    flags, words, from_argparse = TRAIN_ERRORS[name]
    extra = [str(a) for a in flags(ctx, tmp_path)]
    base = ["--data", ctx.text, "--out-dir", tmp_path / "run", *TINY]  # later flags win
    check_cli_error("train.py", [*base, *extra], words, from_argparse, capsys)


SAMPLE_ERRORS = {
    "num-samples-0": (lambda c, t: ["--num-samples", "0"], "--num-samples must be >= 1, got 0", False),
    "max-new-tokens-negative": (lambda c, t: ["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1",
                                False),
    "num-draft-0": (lambda c, t: ["--num-draft", "0"], "--num-draft must be >= 1, got 0", False),
    "empty-stop": (lambda c, t: ["--stop", ""], "stop strings must be non-empty strings", False),
    "temperature-nan": (lambda c, t: ["--temperature", "nan"], "temperature must be >= 0 (0 = greedy), got nan", False),
    "top-p-0": (lambda c, t: ["--top-p", "0"], "top_p must be in (0, 1], got 0.0", False),
    "top-k-not-int": (lambda c, t: ["--top-k", "2.5"], "argument --top-k: invalid int value: '2.5'", True),
    "unknown-device": (lambda c, t: ["--device", "tpu"], "unknown device 'tpu'; choose one of: cpu, cuda, strict",
                       False),
    "attention-map-folder": (lambda c, t: ["--attention-map", t / "nowhere" / "a.png"],
                             "--attention-map: the folder", False),
    "prompt-file-not-utf8": (lambda c, t: ["--prompt", f"@{c.tmp / 'latin1.txt'}"],
                             "cannot read the prompt file", False),
    "prompt-file-is-a-folder": (lambda c, t: ["--prompt", f"@{t}"], "cannot read the prompt file", False),
    "draft-missing": (lambda c, t: ["--draft-out-dir", t / "nowhere"], "no checkpoint at", False),
    "draft-other-tokenizer": (lambda c, t: ["--draft-out-dir", c.bad["other-tokenizer"]],
                              "the draft checkpoint uses a different tokenizer than the target", False),
    "no-model-config": (lambda c, t: ["--out-dir", c.bad["no-model-config"]],
                        "has no model_config/tokenizer in its header", False),
    "broken-tokenizer": (lambda c, t: ["--out-dir", c.bad["broken-tokenizer"]],
                         "a 'char' tokenizer needs 'chars' in its dict", False),
    "weights-do-not-fit": (lambda c, t: ["--out-dir", c.bad["bad-weights"]],
                           "the checkpoint does not fit its own config: load_state_dict: wte.weight has shape (3, 3)",
                           False),
    "config-invalid": (lambda c, t: ["--out-dir", c.bad["bad-config"]],
                       "the checkpoint does not fit its own config: n_embd (16) must be divisible by n_head (3)",
                       False),
    "checkpoint-empty": (lambda c, t: ["--out-dir", c.bad["empty"]], "is not a checkpoint: the file is empty", False),
    "checkpoint-text": (lambda c, t: ["--out-dir", c.bad["text"]], "is not a checkpoint: not an .npz (zip) file",
                        False),
    "checkpoint-npy": (lambda c, t: ["--out-dir", c.bad["npy"]], "is not a checkpoint: not an .npz (zip) file", False),
    "checkpoint-pickled": (lambda c, t: ["--out-dir", c.bad["pickled"]], "holds pickled data, which is never loaded",
                           False),
    "checkpoint-truncated": (lambda c, t: ["--out-dir", c.bad["truncated"]],
                             "model.safetensors is corrupted: its sha256 does not match", False),
    "checkpoint-no-meta": (lambda c, t: ["--out-dir", c.bad["no-meta"]], "no __meta__ header", False),
    "checkpoint-bad-header": (lambda c, t: ["--out-dir", c.bad["bad-header"]], "has an unreadable header", False),
    "checkpoint-old-format": (lambda c, t: ["--out-dir", c.bad["old-format"]], "has format version", False),
}
if not backend.cuda_available:
    SAMPLE_ERRORS["cuda-without-cupy"] = (lambda c, t: ["--device", "cuda"], "device 'cuda' needs CuPy", False)


@pytest.mark.parametrize("name", list(SAMPLE_ERRORS))
def test_sample_cli_errors(name, ctx, tmp_path, capsys):
    flags, words, from_argparse = SAMPLE_ERRORS[name]
    base = ["--out-dir", ctx.good, "--max-new-tokens", "3", "--prompt", "the "]  # later flags win
    check_cli_error("sample.py", [*base, *flags(ctx, tmp_path)], words, from_argparse, capsys)


def test_sample_cli_layer_out_of_range(ctx, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    argv = ["--out-dir", ctx.good, "--max-new-tokens", "3", "--attention-map", tmp_path / "a.png", "--layer", "5"]
    check_cli_error("sample.py", argv, "--layer must be in 0..0 (or negative, from the end), got 5", False, capsys)


# --- docs/errors.md cites only tests that exist ----------------------------------------------

CITATION = re.compile(r"(tests/[\w/]+\.py)::(\w+)(?:\[([^\]]+)\])?")


def error_table_rows(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table after the '## The table' heading."""
    section = text.split("## The table", 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("## "):
            break
        if line.startswith("|") and not re.match(r"^\|[\s:|-]+\|$", line):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows[1:]  # without the header


def test_error_table_cites_tests_that_exist():
    rows = error_table_rows(DOC.read_text(encoding="utf-8"))
    assert len(rows) >= 30, f"docs/errors.md has only {len(rows)} rows"
    missing = []
    for row in rows:
        assert len(row) == 4, f"a row needs 4 columns (where, input, result, test): {row}"
        citations = CITATION.findall(row[3])
        assert citations, f"a row without a test: {row}"
        for path, name, param in citations:
            source = (ROOT / path).read_text(encoding="utf-8") if (ROOT / path).is_file() else ""
            if not re.search(rf"^\s*def {name}\(", source, re.M):
                missing.append(f"{path}::{name}")
            elif param and f'"{param}"' not in source and f"'{param}'" not in source:
                missing.append(f"{path}::{name}[{param}]")  # a table row id that is not in the file
    assert not missing, f"docs/errors.md cites tests that do not exist: {missing}"
    # every row of this file's tables is documented
    cited = {(name, param) for row in rows for _, name, param in CITATION.findall(row[3])}
    for test, table in (("test_api_errors", API_ERRORS), ("test_train_cli_errors", TRAIN_ERRORS),
                        ("test_sample_cli_errors", SAMPLE_ERRORS)):
        undocumented = [key for key in table if (test, key) not in cited]
        assert not undocumented, f"{test} rows missing from docs/errors.md: {undocumented}"


def test_the_citation_check_can_fail(tmp_path):
    rows = error_table_rows("## The table\n| a | b | c | d |\n|---|---|---|---|\n"
                            "| API | x | y | tests/test_errors.py::test_no_such_test |\n")
    (path, name, _), = CITATION.findall(rows[0][3])
    assert not re.search(rf"^\s*def {name}\(", (ROOT / path).read_text(encoding="utf-8"), re.M)
