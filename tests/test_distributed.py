"""Training that scales out and survives: train.py on 2 MPI ranks matches one process and
resumes exactly; SIGTERM saves the step it ends; one run per out dir; a killed rank ends
the job; NCCL's bootstrap and buckets through a fake cupy.cuda.nccl; mpi4py missing is
one line. The MPI tests run `mpiexec -n 2` from the venv (the dev extra installs it)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

import train
from model.checkpoint import load_checkpoint
from same_run import assert_same_checkpoint
from tinygrad_lite import Tensor, backend, distributed

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(MPIEXEC is None or __import__("importlib").util.find_spec("mpi4py") is None,
                               reason="mpi4py and an mpiexec are not installed (pip install -e '.[mpi]')")
on_cpu = pytest.mark.skipif(backend.default_device() != "cpu", reason="processes and signals: run on the CPU device")
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "6",
        "--eval-iters", "2", "--eval-interval", "10", "--warmup-iters", "2", "--lr-decay-iters", "20", "--no-progress"]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "shall", "speak", "now", "and", "then", "to", "my", "lord"]
    path = tmp_path_factory.mktemp("dist") / "text.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(300)), encoding="utf-8")
    return path


def train_cmd(text: Path, out: Path, *flags) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--data", str(text), "--out-dir", str(out), *TINY, *map(str, flags)]


def mpirun(cmd: list[str], n: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([MPIEXEC, "-n", str(n), *cmd], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def train_losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


# --- MPI ----------------------------------------------------------------------------------------


@needs_mpi
@on_cpu
def test_two_ranks_give_the_losses_of_one_process_with_the_same_global_batch(text, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    done = subprocess.run(train_cmd(text, one, "--max-iters", 20, "--shards", 1), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = mpirun(train_cmd(text, two, "--max-iters", 20))
    assert done.returncode == 0, done.stderr
    assert "(2 MPI ranks)" in done.stderr and done.stderr.count("final: train loss") == 1  # rank 0 alone reports
    a, b = train_losses(one), train_losses(two)
    assert len(a) == len(b) == 20
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)  # float32 rounding: the sums run in another order
    meta = load_checkpoint(two)[1]
    assert meta["world_size"] == 2 and meta["iter_num"] == 20


@needs_mpi
@on_cpu
def test_resume_under_mpi_is_exact(text, tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert mpirun(train_cmd(text, straight, "--max-iters", 8)).returncode == 0
    assert mpirun(train_cmd(text, halves, "--max-iters", 4)).returncode == 0
    done = mpirun(train_cmd(text, halves, "--max-iters", 8, "--resume"))
    assert done.returncode == 0, done.stderr
    assert_same_checkpoint(straight, halves, 8)


@needs_mpi
@on_cpu
def test_a_killed_rank_brings_the_job_down_and_the_checkpoint_stays(text, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    job = subprocess.Popen([MPIEXEC, "-n", "2", *train_cmd(text, out, "--max-iters", 100000, "--ckpt-interval", 5)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not (out / "checkpoint.json").exists() or load_checkpoint(out)[1]["iter_num"] < 10:
            assert time.time() < deadline and job.poll() is None, "the job did not get going"
            time.sleep(0.2)
        rank1 = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _is_rank(int(pid), out, "1")]
        assert rank1, "rank 1 not found"
        os.kill(rank1[0], signal.SIGKILL)
        start = time.time()
        report, _ = job.communicate(timeout=30)
        ended_after = time.time() - start
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0 and ended_after < 15, (job.returncode, ended_after)
    assert "BAD TERMINATION" in report.decode()  # mpiexec's own report of the dead rank (on stdout)
    state, meta, _ = load_checkpoint(out)  # intact
    assert meta["iter_num"] >= 10 and all(np.isfinite(v).all() for v in state.values())


def _is_rank(pid: int, out: Path, rank: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(out).encode() in cmdline and b"PMI_RANK=" + rank.encode() in environ


def test_without_mpi4py_mpiexec_gets_a_one_line_error(text, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PMI_SIZE", "2")  # as if mpiexec started us
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # and mpi4py were not installed
    code = train.main(["--data", str(text), "--out-dir", str(tmp_path / "o"), *TINY, "--max-iters", "2"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and err == ["error: this process was started by mpiexec, but mpi4py is not installed: "
                                 "pip install 'tinygrad_lite[mpi]' (mpi4py and MPICH)"]


# --- NCCL, through a fake cupy.cuda.nccl ---------------------------------------------------------


class FakeMPI:
    """The MPI half of a 2-rank job, seen from one rank: records the object broadcasts."""

    def __init__(self, rank: int, shared: dict) -> None:
        self.rank, self.world_size, self.host, self.shared = rank, 2, "fakehost", shared

    def broadcast_object(self, obj, root=0):
        if self.rank == root:
            self.shared["broadcast"] = obj
        return self.shared["broadcast"]

    def barrier(self):
        pass


class FakeBuffer:
    def __init__(self, array):
        self.array, self.size = array, array.size
        self.data = types.SimpleNamespace(ptr=id(array))


def fake_nccl(log: list):
    nccl = types.SimpleNamespace(NCCL_FLOAT32="f32", NCCL_SUM="sum")
    nccl.get_unique_id = lambda: (log.append(("get_unique_id",)), ("nccl-id", 42))[1]

    class NcclCommunicator:
        def __init__(self, world, uid, rank):
            log.append(("join", world, uid, rank))

        def allReduce(self, send, recv, count, dtype, op, stream):
            log.append(("allReduce", count, dtype, op))

        def bcast(self, buf, count, dtype, root, stream):
            log.append(("bcast", count, dtype, root))
    nccl.NcclCommunicator = NcclCommunicator
    return nccl


def fake_cupy():
    device = types.SimpleNamespace(use=lambda: None)
    cuda = types.SimpleNamespace(Device=lambda i: device, get_current_stream=lambda: types.SimpleNamespace(ptr=7))
    return types.SimpleNamespace(cuda=cuda)


def test_nccl_is_bootstrapped_by_an_id_that_rank_0_makes_and_mpi_broadcasts():
    shared, logs = {}, {0: [], 1: []}
    comms = {r: distributed.NCCLCommunicator(FakeMPI(r, shared), fake_nccl(logs[r]), fake_cupy()) for r in (0, 1)}
    assert logs[0][:2] == [("get_unique_id",), ("join", 2, ("nccl-id", 42), 0)]
    assert logs[1] == [("join", 2, ("nccl-id", 42), 1)]  # rank 1 never makes an id: it receives rank 0's
    buffer = FakeBuffer(np.zeros(10, np.float32))
    comms[1].allreduce(buffer)
    assert logs[1][-1] == ("allReduce", 10, "f32", "sum")


class RecordingComm:
    """A one-rank communicator that records the size of every collective call."""

    rank, world_size = 0, 1

    def __init__(self):
        self.calls = []

    def allreduce(self, buffer):
        self.calls.append(("allreduce", buffer.size))

    def broadcast(self, buffer, root=0):
        self.calls.append(("broadcast", buffer.size))


def test_gradients_go_in_one_flat_buffer_or_a_few_large_buckets():
    params = [Tensor(np.ones(shape, np.float32), requires_grad=True) for shape in ((100, 10), (10,), (300, 10), (5,))]
    for p in params:
        p.grad = np.full(p.shape, 2.0, np.float32)
    comm = RecordingComm()
    sync = distributed.GradientSync(params, comm)
    assert sync.allreduce([1.5, 0.0]) == [1.5, 0.0]
    assert comm.calls == [("allreduce", 1000 + 10 + 3000 + 5 + 2)]  # one call: every gradient and the extras
    comm.calls.clear()
    bucketed = distributed.GradientSync(params, comm, bucket_bytes=4 * 2000)  # buckets of 2000 floats
    assert bucketed.buckets == [(0, 2), (2, 3), (3, 4)]
    bucketed.allreduce([3.0])
    assert comm.calls == [("allreduce", 1010), ("allreduce", 3000), ("allreduce", 5 + 1)]
    assert all((p.grad == 2.0).all() for p in params)  # a single rank's sum is its own gradient


def test_gpu_check_runs_two_gpus_only_where_there_are_two():
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert "mpiexec -n 2" in script and "fewer than 2 GPUs" in script


# --- preemption and the out dir's lock -------------------------------------------------------------


def wait_for_iteration(out: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        rows = (out / "log.jsonl").read_text().splitlines() if (out / "log.jsonl").exists() else []
        if sum('"kind": "train"' in r for r in rows) >= n:
            return
        assert proc.poll() is None and time.time() < deadline, "the run stopped or stalled"
        time.sleep(0.1)


@on_cpu
@pytest.mark.parametrize("shards", [1, 2])
def test_sigterm_to_the_process_group_saves_the_step_it_ends_and_resume_continues(text, tmp_path, shards):
    out = tmp_path / f"term{shards}"
    proc = subprocess.Popen(train_cmd(text, out, "--max-iters", 100000, "--shards", shards, "--batch-size", 8,
                                      "--eval-interval", 100000, "--ckpt-interval", 100000),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, start_new_session=True)
    try:
        wait_for_iteration(out, 5, proc)
        os.killpg(proc.pid, signal.SIGTERM)  # as a cluster does: the whole group, workers included
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 143, err.decode()
    iteration = load_checkpoint(out)[1]["iter_num"]
    assert lines[-1] == (f"stopped by SIGTERM after iteration {iteration}: checkpoint {out / 'checkpoint.json'}; "
                         "continue with --resume")
    assert iteration == len(train_losses(out)) >= 5  # the checkpoint is of the last step taken
    done = subprocess.run(train_cmd(text, out, "--max-iters", iteration + 3, "--shards", shards, "--batch-size", 8,
                                    "--resume"), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(out)[1]["iter_num"] == iteration + 3


@on_cpu
def test_a_second_run_on_an_out_dir_in_use_refuses_and_touches_nothing(text, tmp_path):
    out = tmp_path / "busy"
    first = subprocess.Popen(train_cmd(text, out, "--max-iters", 100000, "--shards", 1), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=ROOT, start_new_session=True)
    try:
        wait_for_iteration(out, 3, first)
        started = time.time()
        second = subprocess.run(train_cmd(text, out, "--max-iters", 5, "--shards", 1), capture_output=True,
                                text=True, cwd=ROOT, timeout=60)
        assert second.returncode == 2 and time.time() - started < 20
        assert second.stderr.strip().splitlines() == [
            f"error: {out} is in use by another train.py (pid {first.pid} on host {os.uname().nodename}); wait for "
            "it, stop it, or pass another --out-dir"]
        wait_for_iteration(out, 6, first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    evals = [r["iter"] for r in rows if r["kind"] == "eval"]
    assert evals[0] == 0 and evals == sorted(set(evals))  # one run's rows only: one iter 0, no repeats
    iters = [r["iter"] for r in rows if r["kind"] == "train"]
    assert iters == list(range(1, len(iters) + 1))


@on_cpu
def test_a_sigkilled_run_never_leaves_the_out_dir_locked(text, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(text, out, "--max-iters", 100000, "--shards", 1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    wait_for_iteration(out, 2, proc)
    proc.kill()
    proc.communicate()
    done = subprocess.run(train_cmd(text, out, "--max-iters", 3, "--shards", 1), capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr  # the kernel dropped the lock with the process
