"""One check the resume tests share: two out dirs hold the same run, bitwise."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from model.checkpoint import load_checkpoint


def assert_same_checkpoint(a_dir: Path, b_dir: Path, iters: int) -> tuple[dict, dict]:
    """Both checkpoints are at iteration `iters` with equal weights and optimizer buffers;
    returns their headers (meta_a, meta_b) for the caller's own checks."""
    a, meta_a, opt_a = load_checkpoint(a_dir)
    b, meta_b, opt_b = load_checkpoint(b_dir)
    assert meta_a["iter_num"] == meta_b["iter_num"] == iters
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for name in opt_a["buffers"]:
        np.testing.assert_array_equal(opt_a["buffers"][name], opt_b["buffers"][name], err_msg=name)
    return meta_a, meta_b
