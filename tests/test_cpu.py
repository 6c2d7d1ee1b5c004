"""The CPU-speed module: the kernels' thread pool, the one thread budget, and the rule
that importing the library tunes nothing (the scripts do).

Mirrors tinygrad_lite/cpu.py.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinygrad_lite.functional as F
from tinygrad_lite import Tensor, backend, cpu

ROOT = Path(__file__).resolve().parents[1]
# the entry points: the top-level scripts, and every bench and lab file that runs as one
SCRIPTS = ["train.py", "sample.py", "serve.py", *sorted(
    f"{p.parent.name}/{p.name}" for folder in ("bench", "lab") for p in (ROOT / folder).glob("*.py")
    if "__main__" in p.read_text(encoding="utf-8"))]


def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=env if env is not None else dict(os.environ), timeout=120)


# --- importing changes nothing ------------------------------------------------------------------


def test_import_leaves_the_environment_alone():
    """The check the issue names: the environment is the same before and after the import."""
    done = run_python("import os; e = dict(os.environ); import tinygrad_lite; assert e == dict(os.environ)")
    assert done.returncode == 0, done.stderr


def test_import_starts_no_thread_and_tunes_no_malloc():
    done = run_python("import threading, tinygrad_lite, model.gpt; from tinygrad_lite import cpu; "
                      "print(threading.active_count(), cpu.settings()['malloc'])")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "False"]


def test_a_bad_device_variable_is_an_error_at_first_use_not_at_import():
    env = {**os.environ, "TINYGRAD_LITE_DEVICE": "tpu"}
    done = run_python("import tinygrad_lite; print('imported'); tinygrad_lite.Tensor([1.0])", env)
    assert done.stdout.strip() == "imported"
    assert "TINYGRAD_LITE_DEVICE: unknown device 'tpu'; choose one of: cpu, cuda, strict" in done.stderr


# --- the scripts tune the CPU -------------------------------------------------------------------


def first_statements(path: Path) -> list[ast.stmt]:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return [node for node in body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
            and not (isinstance(node, ast.ImportFrom) and node.module == "__future__")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_set_the_openblas_spin_before_numpy_loads(script):
    """Knob 1 must be in the environment before NumPy is imported: each script's first two
    statements are `import os` and `os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", ...)`."""
    path = ROOT / script
    if not path.exists():
        pytest.skip(f"{script} is not written yet")
    first, second = first_statements(path)[:2]
    assert isinstance(first, ast.Import) and [a.name for a in first.names] == ["os"], script
    call = ast.unparse(second)
    assert call == f"os.environ.setdefault('OPENBLAS_THREAD_TIMEOUT', '{cpu.OPENBLAS_SPIN}')", (script, call)


def test_the_scripts_set_the_spin_and_the_import_does_not():
    """Once meaning 'the import sets OPENBLAS_THREAD_TIMEOUT'; now the scripts do, and a
    value the user chose wins."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    done = run_python("import os, tinygrad_lite; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))", env)
    assert done.stdout.strip() == "None", done.stderr
    done = run_python("import os, train; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))", env)
    assert done.stdout.strip() == cpu.OPENBLAS_SPIN, done.stderr
    done = run_python("import os, train; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))",
                      {**env, "OPENBLAS_THREAD_TIMEOUT": "20"})
    assert done.stdout.strip() == "20"


def test_tune_applies_malloc_and_a_thread_budget():
    done = run_python("from tinygrad_lite import cpu; s = cpu.tune(threads=3); "
                      "print(s['malloc'], s['threads'], cpu.num_threads())")
    assert done.returncode == 0, done.stderr
    malloc, threads, now = done.stdout.split()
    assert (threads, now) == ("3", "3")
    assert malloc == str(sys.platform.startswith("linux"))  # glibc only
    off = run_python("from tinygrad_lite import cpu; print(cpu.tune()['malloc'])",
                     {**os.environ, "TINYGRAD_LITE_MALLOC_TUNING": "0"})
    assert off.stdout.strip() == "False"


def test_a_bad_thread_count_is_one_line():
    done = run_python("from tinygrad_lite import cpu; cpu.num_threads()", {**os.environ, "TINYGRAD_LITE_THREADS": "two"})
    assert "TINYGRAD_LITE_THREADS must be an integer >= 1, got 'two'" in done.stderr
    with pytest.raises(ValueError, match="threads must be >= 1"):
        with cpu.threads(0):
            pass


# --- one thread budget for BLAS and the kernels -----------------------------------------------


def test_threads_limits_blas_and_the_kernels_and_restores():
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads() -> list[int]:  # NumPy's BLAS (other libraries loaded later, e.g. torch's, aside)
        return [lib["num_threads"] for lib in threadpoolctl.threadpool_info()
                if lib["user_api"] == "blas" and "numpy" in lib["filepath"]]
    big = np.zeros((4, 1 << 16), dtype=np.float32)
    before, blocks_before = blas_threads(), cpu.row_blocks(big)
    with cpu.threads(1):
        assert cpu.num_threads() == 1
        assert cpu.row_blocks(big) == [slice(None)]
        if before:
            assert blas_threads() == [1] * len(before)
    assert blas_threads() == before and cpu.row_blocks(big) == blocks_before


def test_a_small_product_of_several_rows_runs_on_one_blas_thread(monkeypatch):
    """cpu.small_matmul: the same product, with BLAS on one thread while it runs and its
    thread count given back after; a one-column or one-row product (gemv) and a big one are
    untouched."""
    class FakeBlas:  # records what small_matmul asks of a BLAS library
        def __init__(self):
            self.threads, self.calls = 2, []

        def get_num_threads(self):
            return self.threads

        def set_num_threads(self, n):
            self.calls.append(n)
            self.threads = n
    blas = FakeBlas()
    monkeypatch.setattr(cpu, "_blas_libraries", lambda: [(blas.get_num_threads, blas.set_num_threads)])
    rng = np.random.default_rng(0)
    w = rng.standard_normal((512, 128)).astype(np.float32)
    with cpu.threads(2):
        for columns, one_thread in ((8, True), (1, False), (64, False)):  # 8 x 512 x 128 <= ONE_THREAD_MACS < 64 x ...
            blas.calls.clear()
            x = rng.standard_normal((128, columns)).astype(np.float32)
            np.testing.assert_array_equal(cpu.small_matmul(w, x), w @ x)
            assert blas.calls == ([1, 2] if one_thread else []), columns
            assert blas.threads == 2
        blas.calls.clear()
        row = rng.standard_normal((1, 512)).astype(np.float32)  # one row times a matrix: a gemv too
        np.testing.assert_array_equal(cpu.small_matmul(row, w), row @ w)
        assert blas.calls == []
    with cpu.threads(1):  # one thread anyway: nothing to switch
        blas.calls.clear()
        cpu.small_matmul(w, x[:, :8])
        assert blas.calls == []


def test_threads_switches_blas_through_its_own_setters_and_gives_it_back(monkeypatch):
    """cpu.threads(1) around a whole step (model/prepared_decode.py): inside, BLAS runs on
    one thread and num_threads() is 1, so the small products in it (small_matmul) switch
    nothing themselves; after it, even after an error, both are as they were."""
    calls = []
    threads = {"n": 2}

    def set_threads(n):
        calls.append(n)
        threads["n"] = n
    monkeypatch.setattr(cpu, "_blas_libraries", lambda: [(lambda: threads["n"], set_threads)])
    rng = np.random.default_rng(0)
    w, x = (rng.standard_normal(shape).astype(np.float32) for shape in ((512, 128), (128, 8)))
    with cpu.threads(2):
        calls.clear()
        with pytest.raises(RuntimeError):
            with cpu.threads(1):
                assert cpu.num_threads() == 1 and threads["n"] == 1
                np.testing.assert_array_equal(cpu.small_matmul(w, x), w @ x)
                raise RuntimeError("a step that fails")
        assert calls == [1, 2] and cpu.num_threads() == 2 and threads["n"] == 2


@pytest.mark.parametrize("layout", ["column_major", "row_major"])
@pytest.mark.parametrize("rows", [1, 8, 300])  # (a few rows, and more than fast.SMALL_ROWS)
def test_the_fast_kernels_write_into_given_buffers_the_numbers_they_return(layout, rows):
    """linear_rows, layer_norm_rows and gelu_array with out= (model/prepared_decode.py keeps
    its buffers) give what they give into arrays of their own, to the bit."""
    from tinygrad_lite.fast import gelu_array, layer_norm_rows, linear_rows
    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, 24)).astype(np.float32)
    w = rng.standard_normal((40, 24)).astype(np.float32)
    w = np.asfortranarray(w) if layout == "column_major" else w
    b = rng.standard_normal(40).astype(np.float32)
    out = np.full((rows, 40), np.nan, dtype=np.float32)
    assert linear_rows(x, w, b, out) is out
    np.testing.assert_array_equal(out, linear_rows(x, w, b))
    buffers = tuple(np.full(shape, np.nan, dtype=np.float32) for shape in ((rows, 24), (rows, 24), (rows, 1)))
    for given, own in zip(layer_norm_rows(x, w[0], b[:24], 1e-5, buffers), layer_norm_rows(x, w[0], b[:24], 1e-5)):
        np.testing.assert_array_equal(given, own)
    assert layer_norm_rows(x, w[0], None, 1e-5, buffers)[0] is buffers[0]
    out = np.full_like(x, np.nan)
    assert gelu_array(x, out) is out
    np.testing.assert_array_equal(out, gelu_array(x))


def test_thread_generators_are_per_thread():
    with backend.use_generator(7):
        a = backend.rand((3,), "cpu")
    with backend.use_generator(7):
        b = backend.rand((3,), "cpu")
    np.testing.assert_array_equal(a, b)


# --- the kernels' thread pool ---------------------------------------------------------------------


def test_parallel_rows_on_a_big_array_matches_one_call():
    """Big kernels run in row blocks on threads; the result must not depend on the split."""
    x = np.random.default_rng(0).standard_normal((2049, 257)).astype(np.float32)  # rows not divisible
    assert len(cpu.row_blocks(x)) == cpu.num_threads()
    w, b = (Tensor(np.random.default_rng(i).standard_normal(257).astype(np.float32), requires_grad=True)
            for i in (1, 2))
    for fn in (F.gelu, lambda t: F.layer_norm(t, w, b)):
        results = []
        for tier in ("fast", "primitive"):
            t = Tensor(x, requires_grad=True)
            w.grad = b.grad = None
            with F.ops_tier(tier):
                y = fn(t)
            (y * y).sum().backward()
            results.append([y.numpy()] + [backend.to_numpy(p.grad) for p in (t, w, b) if p.grad is not None])
        for fast, ref in zip(*results):
            np.testing.assert_allclose(fast, ref, rtol=1e-3, atol=1e-3)

    out = np.empty_like(x)
    cpu.parallel_rows(lambda a, o: np.multiply(a, 2, out=o), x, out)
    np.testing.assert_array_equal(out, x * 2)


@pytest.mark.parametrize("blocks", [1, 2])
def test_chunked_parallel_rows_runs_cache_sized_pieces(blocks):
    """In pieces of at most CHUNK_ELEMENTS, in each block: on one thread or on two."""
    x = np.arange(5 * cpu.CHUNK_ELEMENTS // 2, dtype=np.float32).reshape(-1, 2)  # 2.5 chunks
    out, pieces = np.empty_like(x), []

    def kernel(a, o):
        pieces.append(a.size)
        np.multiply(a, 2, out=o)
    half = x.shape[0] // 2
    split = [slice(None)] if blocks == 1 else [slice(0, half), slice(half, None)]
    with cpu.threads(blocks):
        cpu.parallel_rows(kernel, x, out, blocks=split, chunked=True)
    np.testing.assert_array_equal(out, x * 2)
    assert max(pieces) <= cpu.CHUNK_ELEMENTS and sum(pieces) == x.size
    assert len(pieces) == (3 if blocks == 1 else 4)  # 2.5 chunks; or 2 x 1.25 chunks


def test_threaded_packed_attention_matches_the_primitive_one():
    """A batch big enough to be split across threads gives the same values and grads."""
    from test_functional import multi_head_attention
    x = np.random.default_rng(3).standard_normal((5, 64, 3 * 216)).astype(np.float32)  # odd batch
    results, blocks = [], None
    for tier, fn in (("fast", lambda t: F.packed_causal_attention(t, 4)), ("primitive", lambda t: multi_head_attention(t, 4))):
        t = Tensor(x, requires_grad=True)
        with F.ops_tier(tier):
            y = fn(t)
        blocks = blocks or y._ctx.blocks  # how the fast op split its (5, 4, 64, 54) queries
        (y * y).sum().backward()
        results.append((y.numpy(), backend.to_numpy(t.grad)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-3, atol=1e-4)
    on_host = backend.default_device() == "cpu"  # (CuPy and strict arrays run in one block)
    assert len(blocks) == (min(cpu.num_threads(), 5) if on_host else 1)
    assert sum(len(range(5)[b]) for b in blocks) == 5
