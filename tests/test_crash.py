"""Crash safety: SIGKILL train.py at random moments (checkpoint writes included) and
resume; the last good checkpoint always loads and the run finishes with the right count."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from model.checkpoint import has_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
MAX_ITERS = 1000
FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
         "--eval-iters", "1", "--eval-interval", "1", "--no-progress", "--max-iters", str(MAX_ITERS)]


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_the_checkpoint(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("a quick brown fox jumps over the lazy dog.\n" * 200, encoding="utf-8")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(text), "--out-dir", str(out), *FLAGS]
    rng = np.random.default_rng(2026)
    kills, iters_seen = 0, []
    for attempt in range(30):
        resume = ["--resume"] if has_checkpoint(out) else []
        proc = subprocess.Popen(cmd + resume, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
        if kills < 6:
            time.sleep(rng.uniform(0.6, 2.0))  # start-up takes about 0.5 s; then a checkpoint every step
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
        _, err = proc.communicate(timeout=120)
        if has_checkpoint(out):  # after every kill the last checkpoint loads
            iters_seen.append(load_checkpoint(out)[1]["iter_num"])
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()
    print(f"survived {kills} SIGKILLs; checkpoints seen at iterations {iters_seen}")
    assert kills >= 5, f"only {kills} kills landed"
    state, meta, optimizer = load_checkpoint(out)
    assert meta["iter_num"] == MAX_ITERS and optimizer["step"] == MAX_ITERS
    assert all(np.isfinite(v).all() for v in state.values())
    assert iters_seen == sorted(iters_seen)  # progress was never lost
