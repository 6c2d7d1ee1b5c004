"""train.py end to end on text made here: exact resume, checkpoints, fine-tuning,
the non-finite guard, and one-line errors for bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from same_run import assert_same_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
              "--batch-size", "4", "--eval-iters", "2", "--eval-interval", "4", "--no-progress",
              "--warmup-iters", "2", "--lr-decay-iters", "8"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "shall", "speak", "now", "and", "then", "to", "my", "lord"]
    text = "\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(300))
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(text, encoding="utf-8")
    return path


def error_line(err: str) -> str:
    """The one error line of a failed run (info lines may come before it), no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def run(args, capsys=None) -> tuple[int, str]:
    code = train.main([str(a) for a in args])
    err = capsys.readouterr().err if capsys else ""
    return code, err


@pytest.mark.parametrize("shards", [1, 2])
def test_resume_is_bitwise_identical_to_a_straight_run(text_file, tmp_path, shards):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    flags = [*TINY_FLAGS, "--shards", shards]  # 2: each batch split over two processes
    assert run(["--data", text_file, "--out-dir", straight, "--max-iters", 8, *flags])[0] == 0
    assert run(["--data", text_file, "--out-dir", halves, "--max-iters", 4, *flags])[0] == 0
    assert load_checkpoint(halves)[1]["iter_num"] == 4
    assert run(["--data", text_file, "--out-dir", halves, "--max-iters", 8, "--resume", *flags])[0] == 0
    meta_a, meta_b = assert_same_checkpoint(straight, halves, 8)
    assert meta_a["losses"] == meta_b["losses"]


def test_sharded_training_follows_the_one_process_run(text_file, tmp_path):
    """Splitting the batch changes only float rounding: after 8 steps (of 2 accumulated
    micro-batches each) the weights agree closely."""
    runs = {}
    for shards in (1, 2):
        out = tmp_path / f"shards{shards}"
        assert run(["--data", text_file, "--out-dir", out, "--max-iters", 8, *TINY_FLAGS,
                    "--grad-accum", 2, "--shards", shards])[0] == 0
        runs[shards] = load_checkpoint(out)
    for name in runs[1][0]:
        np.testing.assert_allclose(runs[2][0][name], runs[1][0][name], rtol=1e-3, atol=1e-5, err_msg=name)
    assert runs[2][1]["losses"]["val"] == pytest.approx(runs[1][1]["losses"]["val"], rel=1e-4)


def test_checkpoint_reload_gives_identical_logits(text_file, tmp_path):
    from tinygrad_lite import no_grad
    from model.gpt import GPT, GPTConfig
    from model.tokenizer import tokenizer_from_dict
    out = tmp_path / "run"
    assert run(["--data", text_file, "--out-dir", out, "--max-iters", 4, *TINY_FLAGS])[0] == 0
    state, meta, _ = load_checkpoint(out)
    model = GPT(GPTConfig(**meta["model_config"]))
    model.load_state_dict(state)
    tok = tokenizer_from_dict(meta["tokenizer"])
    ids = np.array([tok.encode("the king shall")])
    with no_grad():
        first = model(ids)[0].numpy()
    again = GPT(GPTConfig(**meta["model_config"]))
    again.load_state_dict(load_checkpoint(out)[0])
    with no_grad():
        np.testing.assert_array_equal(again(ids)[0].numpy(), first)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in log} == {"train", "eval"}


def test_fine_tuning_starts_from_a_trained_checkpoint(text_file, tmp_path):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    assert run(["--data", text_file, "--out-dir", base, "--max-iters", 4, *TINY_FLAGS])[0] == 0
    other = tmp_path / "other.txt"
    other.write_text("the queen shall speak to my lord now.\n" * 40, encoding="utf-8")
    assert run(["--data", other, "--out-dir", tuned, "--init-from", base, "--max-iters", 4, *TINY_FLAGS])[0] == 0
    base_meta, tuned_meta = load_checkpoint(base)[1], load_checkpoint(tuned)[1]
    assert tuned_meta["tokenizer"] == base_meta["tokenizer"]  # the pre-trained vocabulary is kept
    assert tuned_meta["iter_num"] == 4


def test_nonfinite_gradient_stops_and_keeps_the_last_good_checkpoint(text_file, tmp_path, capsys, monkeypatch):
    from tinygrad_lite import optim
    real_clip, calls = optim.clip_grad_norm, []

    def poisoned(params, max_norm):
        calls.append(1)
        norm = real_clip(params, max_norm)
        return float("nan") if len(calls) == 6 else norm  # iteration 5
    monkeypatch.setattr(optim, "clip_grad_norm", poisoned)
    out = tmp_path / "nan"
    code, err = run(["--data", text_file, "--out-dir", out, "--max-iters", 8, *TINY_FLAGS], capsys)
    assert code == 2
    assert "non-finite gradient norm at iteration 5" in error_line(err)
    state, meta, _ = load_checkpoint(out)
    assert meta["iter_num"] == 4 and all(np.isfinite(v).all() for v in state.values())

    calls.clear()  # with --skip-nonfinite the run goes on past the bad step
    code, err = run(["--data", text_file, "--out-dir", tmp_path / "skip", "--max-iters", 8,
                     "--skip-nonfinite", *TINY_FLAGS], capsys)
    assert code == 0 and load_checkpoint(tmp_path / "skip")[1]["iter_num"] == 8


def test_pickled_checkpoint_is_refused(tmp_path):
    evil = tmp_path / "ckpt.npz"
    np.savez(evil, payload=np.array([{"run": "code"}], dtype=object))
    with pytest.raises(CheckpointError, match="pickled"):
        load_checkpoint(evil)


def test_checkpoint_write_is_atomic(tmp_path):
    save_checkpoint(tmp_path, {"w": np.ones(3, np.float32)}, {"iter_num": 1})
    assert not list(tmp_path.glob("*.tmp"))  # nothing half-written is left
    assert load_checkpoint(tmp_path)[1]["iter_num"] == 1
    first = checkpoint_folder(tmp_path)
    save_checkpoint(tmp_path, {"w": np.zeros(3, np.float32)}, {"iter_num": 2})
    assert load_checkpoint(tmp_path)[1]["iter_num"] == 2
    # the previous folder is kept (a reader may still be in it); older ones go
    assert first.is_dir() and len(list(tmp_path.glob("ckpt-*"))) == 2
    save_checkpoint(tmp_path, {"w": np.zeros(3, np.float32)}, {"iter_num": 3})
    assert not first.exists() and len(list(tmp_path.glob("ckpt-*"))) == 2


def test_a_reader_sees_the_old_checkpoint_or_the_new_one(tmp_path):
    """The folder a reader found stays whole while one new checkpoint is written."""
    from model.checkpoint import load_checkpoint_folder
    save_checkpoint(tmp_path, {"w": np.full(4, 1.0, np.float32)}, {"iter_num": 1})
    old = checkpoint_folder(tmp_path)  # a reader resolved the commit point here ...
    save_checkpoint(tmp_path, {"w": np.full(4, 2.0, np.float32)}, {"iter_num": 2})
    state, meta, _ = load_checkpoint_folder(old)  # ... and finishes reading the old one, whole
    assert meta["iter_num"] == 1 and state["w"].tolist() == [1.0] * 4
    assert load_checkpoint(tmp_path)[0]["w"].tolist() == [2.0] * 4


def test_a_failed_checkpoint_write_leaves_the_old_one_and_no_temp_files(tmp_path, monkeypatch):
    import errno
    import os
    import model.checkpoint as checkpoint_module
    save_checkpoint(tmp_path, {"w": np.ones(3, np.float32)}, {"iter_num": 1})
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    real_write = checkpoint_module._fsync_write
    for failing_call in range(1, 5):  # the weights, the optimizer, the header, the manifest
        calls = []

        def full_disk(path, data):
            calls.append(path)
            if len(calls) == failing_call:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            real_write(path, data)
        monkeypatch.setattr(checkpoint_module, "_fsync_write", full_disk)
        with pytest.raises(OSError, match="No space left"):
            save_checkpoint(tmp_path, {"w": np.zeros(3, np.float32)}, {"iter_num": 2},
                            {"step": 2, "lr": [0.1], "buffers": {"0.m": np.zeros(3, np.float32)}})
        after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        assert after == before, f"call {failing_call} failed and left {set(after) ^ set(before)}"
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)[1]["iter_num"] == 1


def test_an_old_single_file_checkpoint_still_resumes(text_file, tmp_path):
    """Format 1 (one ckpt.npz) is read; the run goes on in the current format."""
    out = tmp_path / "old"
    assert run(["--data", text_file, "--out-dir", out, "--max-iters", 4, *TINY_FLAGS])[0] == 0
    state, meta, opt = load_checkpoint(out)
    arrays = {f"model/{k}": v for k, v in state.items()} | {f"optim/{k}": v for k, v in opt["buffers"].items()}
    header = {**meta, "format_version": 1, "optimizer": {"step": opt["step"], "lr": opt["lr"]}}
    arrays["__meta__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    np.savez(legacy / "ckpt.npz", **arrays)
    assert load_checkpoint(legacy)[1]["iter_num"] == 4
    assert run(["--data", text_file, "--out-dir", legacy, "--max-iters", 8, "--resume", *TINY_FLAGS])[0] == 0
    assert load_checkpoint(legacy)[1]["iter_num"] == 8 and (legacy / "checkpoint.json").exists()


def checkpoint_folder(out: Path) -> Path:
    return out / json.loads((out / "checkpoint.json").read_text())["checkpoint"]


def bad_checkpoint(kind: str, out: Path, text_file: Path) -> None:
    """Break out's current checkpoint in one way."""
    assert run(["--data", text_file, "--out-dir", out, "--max-iters", 4, *TINY_FLAGS])[0] == 0
    path = checkpoint_folder(out) / "model.safetensors"
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "corrupted":
        path.write_bytes(data[:1000] + bytes(200) + data[1200:])  # in the weights, past the header
    elif kind == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif kind == "missing":
        path.unlink()
    elif kind == "bad manifest":
        (out / "checkpoint.json").write_text("{not json")
    elif kind == "bad header":
        header = checkpoint_folder(out) / "state.json"
        header.write_text(header.read_text().replace('"iter_num": 4', '"iter_num": 5'))
    elif kind == "incompatible":
        state, meta, opt = load_checkpoint(out)
        state["wte.weight"] = np.zeros((3, 3), np.float32)
        save_checkpoint(out, state, {k: v for k, v in meta.items() if k not in ("format_version", "sha256")}, opt)


@pytest.mark.parametrize("kind", ["truncated", "corrupted", "garbage", "missing", "bad manifest", "bad header",
                                  "incompatible"])
def test_bad_checkpoint_on_resume_is_one_line(kind, text_file, tmp_path, capsys):
    out = tmp_path / kind
    bad_checkpoint(kind, out, text_file)
    capsys.readouterr()
    code, err = run(["--data", text_file, "--out-dir", out, "--max-iters", 8, "--resume", *TINY_FLAGS], capsys)
    assert code == 2 and error_line(err), err


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


BAD_INPUTS = {  # name -> (extra flags builder, expected words in the message)
    "missing data file": (lambda d: ["--data", d / "nope.txt"], "does not exist"),
    "empty data file": (lambda d: ["--data", write(d / "empty.txt", b"")], "empty"),
    "non-UTF-8 data": (lambda d: ["--data", write(d / "latin1.txt", "café".encode("latin-1") * 50)], "UTF-8"),
    "text shorter than block": (lambda d: ["--data", write(d / "short.txt", b"tiny text\n" * 2)], "block_size"),
    "n_embd not divisible": (lambda d: ["--n-embd", "15"], "divisible"),
    "unknown preset": (lambda d: ["--preset", "shakespeare-word"], "unknown preset"),
    "unknown tokenizer": (lambda d: ["--tokenizer", "morse"], "unknown tokenizer"),
    "resume without checkpoint": (lambda d: ["--resume"], "no checkpoint"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_gets_one_line_error(name, text_file, tmp_path, capsys):
    flags, words = BAD_INPUTS[name]
    extra = flags(tmp_path)
    base = ["--out-dir", tmp_path / "out", "--max-iters", 2, *TINY_FLAGS]
    if "--data" not in extra:
        base = ["--data", text_file, *base]
    code, err = run([*base, *extra], capsys)
    assert code == 2, err
    assert words.lower() in error_line(err).lower(), err


def test_cli_error_has_no_traceback_unless_debug(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "--preset", "nope", "--out-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["error: unknown preset 'nope'; choose one of: "
                                                "shakespeare-char-cpu, shakespeare-char, finetune-gpt2"]
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, cwd=ROOT)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
