"""lab/: every experiment runs end to end in --quick mode and writes its PNG and JSON;
the NumPy-only scaling-law fit recovers a law it is given; the helpers measure what
they say. The scripts need matplotlib, so without it the whole file is skipped."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
# top-level keys each script's JSON must have
EXPECTED = {
    "scaling": {"runs", "fit", "compute_optimal", "compute_optimal_table", "leave_one_out", "wall_s"},
    "temperature": {"temperatures", "base_model", "wall_s"},
    "embeddings": {"neighbours", "analogies", "trained", "untrained", "pca_variance_share", "wall_s"},
    "lost_in_the_middle": {"depth", "accuracy_by_depth", "curves", "chance", "mean_accuracy", "wall_s"},
    "post_training": {"table", "examples", "settings", "held_out_prompts", "dpo_final_eval", "wall_s"},
    "batching": {"same_work", "batch_sweep", "arrivals", "prefix_sharing", "summary", "wall_s"},
}


def run_script(name: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}  # tiny models: threads only add overhead
    return subprocess.run([sys.executable, str(ROOT / "lab" / f"{name}.py"), "--quick", "--out", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """One output dir for all scripts, so the quick base model is trained only once."""
    return tmp_path_factory.mktemp("lab")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_script_writes_png_and_json(name, out):
    result = run_script(name, out)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / f"{name}.json").read_text())
    assert EXPECTED[name] <= set(data), f"missing keys: {EXPECTED[name] - set(data)}"
    assert data["quick"] is True
    png = out / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_contents_are_sane(out):
    """Shapes and ranges of the numbers (after the scripts above ran in the same dir)."""
    if not (out / "lost_in_the_middle.json").exists():
        for name in EXPECTED:
            assert run_script(name, out).returncode == 0
    scaling = json.loads((out / "scaling.json").read_text())
    assert len(scaling["runs"]) == 9  # 3 sizes x 3 budgets in quick mode
    opt = scaling["compute_optimal"]
    assert opt["N"] * opt["D"] * 6 == pytest.approx(opt["C"], rel=1e-6)
    temps = json.loads((out / "temperature.json").read_text())["temperatures"]
    entropies = [row["entropy_nats"] for row in temps]
    assert entropies[0] == 0 and entropies == sorted(entropies)  # greedy first; flatter with T
    assert all(0 <= row[f"distinct_{n}"] <= 1 for row in temps for n in (1, 2, 3))
    emb = json.loads((out / "embeddings.json").read_text())
    assert emb["trained"]["case_analogies_tried"] == 26 * 25
    litm = json.loads((out / "lost_in_the_middle.json").read_text())
    assert len(litm["accuracy_by_depth"]) == len(litm["depth"]) == litm["n_facts"]
    assert all(0 <= a <= 1 for a in litm["accuracy_by_depth"])
    post = json.loads((out / "post_training.json").read_text())["table"]
    assert set(post) == {"base", "sft", "dpo", "dpo-hard"}
    for row in post.values():
        assert all(0 <= row[k] <= 1 for k in ("task_accuracy", "stop_rate", "preferred_rate")) and row["kl_to_sft"] >= 0
    assert post["sft"]["kl_to_sft"] == pytest.approx(0, abs=1e-9)  # the SFT model against itself
    batching = json.loads((out / "batching.json").read_text())
    assert batching["same_work"]["same_tokens"] and batching["prefix_sharing"]["same_tokens"]
    assert [r["max_batch_size"] for r in batching["batch_sweep"]] == batching["settings"]["batch_sizes"]
    sharing = batching["prefix_sharing"]
    # every request after the first skips the system prompt's full pages
    pages = sharing["system_tokens"] // batching["page_size"]
    assert sharing["with_prefix_cache"]["prefix_hit_tokens"] == (sharing["requests"] - 1) * pages * batching["page_size"]
    assert 0 < sharing["prefill_saved_share"] < 1


def test_missing_matplotlib_is_one_line(tmp_path):
    code = ("import sys, runpy; sys.modules['matplotlib'] = None; "  # None in sys.modules: import fails
            f"sys.argv = ['embeddings.py', '--quick', '--out', {str(tmp_path)!r}]; "
            f"runpy.run_path({str(ROOT / 'lab' / 'embeddings.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install matplotlib" in lines[0], result.stderr


# ------------------------------------------------------------------ the pieces, directly


def test_scaling_fit_recovers_a_known_law():
    from lab.scaling import compute_optimal, fit_scaling_law, predict
    true = {"E": 1.2, "A": 40.0, "B": 300.0, "alpha": 0.35, "beta": 0.45}
    N, D = (g.ravel() for g in np.meshgrid([2e4, 1e5, 3e5, 8e5], [1e5, 4e5, 1e6]))
    L = predict(true, N, D)
    fit = fit_scaling_law(N, D, L)
    assert fit["alpha"] == pytest.approx(0.35, abs=0.01) and fit["beta"] == pytest.approx(0.45, abs=0.01)
    assert fit["E"] == pytest.approx(1.2, abs=0.02) and fit["rmse"] < 1e-3
    # the compute-optimal N really minimises the loss along 6 N D = C
    C = 1e13
    best = compute_optimal(fit, C)
    for factor in (0.5, 0.8, 1.25, 2.0):
        n = best["N"] * factor
        assert predict(fit, n, C / (6 * n)) > best["loss"]


def test_temperature_helpers():
    from lab.temperature import distinct_n, sampled_entropy
    logits = np.zeros((2, 3, 4))  # uniform over 4 tokens
    assert np.allclose(sampled_entropy(logits, 1.0), np.log(4))
    assert np.allclose(sampled_entropy(logits, 0.0), 0.0)
    peaked = np.array([[5.0, 0.0, 0.0, 0.0]])
    assert sampled_entropy(peaked, 0.5)[0] < sampled_entropy(peaked, 1.0)[0] < sampled_entropy(peaked, 2.0)[0]
    assert distinct_n(["the cat the cat"], 1) == 0.5
    assert distinct_n(["the cat the cat"], 2) == pytest.approx(2 / 3)


def test_lost_in_the_middle_task_layout():
    from lab.lost_in_the_middle import IGNORE, RECORD, VALUE_LEN, Task
    task = Task()
    F = 5
    x, y = task.sequences(np.random.default_rng(0), 8, F, first_asks=np.arange(8) % F)
    assert x.shape == y.shape == (8, 2 * RECORD * F - 1)
    key = RECORD * F  # the first question's key
    for row in range(8):
        d = row % F
        assert x[row, key] == x[row, d * RECORD]  # the first question asks fact d ...
        fact_value = x[row, d * RECORD + 1: d * RECORD + 1 + VALUE_LEN]
        assert list(y[row, key:key + VALUE_LEN]) == list(fact_value)  # ... and is graded on its value
        assert len(set(x[row, :key:RECORD])) == F  # keys differ
    assert (y[:, :key] == IGNORE).all()  # nothing in the facts is graded
