"""Training on several processes, or machines, or GPUs: one communicator interface.

    mpiexec -n 4 python train.py ...                  # 4 processes, here or across a hostfile's hosts

Each process (a rank) holds the whole model and runs the same step on its slice of the
global batch. After backward, the ranks add up their gradients with one collective call,
an all-reduce, so every rank ends up with the gradient of the whole batch and takes the
same optimizer step: the weights stay identical everywhere without ever being sent
again. This is what PyTorch's DistributedDataParallel does, and ChainerMN before it.

A Communicator is the small interface the training loop needs:
    rank, world_size           which process this is, of how many
    allreduce(buffer)          buffer <- the sum of every rank's buffer, in place
    broadcast(buffer, root)    buffer <- root's buffer, in place
    barrier()                  wait until every rank gets here
Two implementations, on established engines, not a home-made transport:
- MPICommunicator: MPI through mpi4py, on host (NumPy) buffers; `pip install
  'tinygrad_lite[mpi]'` brings mpi4py and an MPI (MPICH) with `mpiexec`.
- NCCLCommunicator: NVIDIA's NCCL through CuPy, on GPU buffers, one process per GPU.
  NCCL needs every rank to share one id before it can connect; rank 0 makes it and MPI
  broadcasts it (the usual bootstrap).

`GradientSync` packs every parameter's gradient into one flat float32 buffer (or a few
large buckets) so a step makes one call, not one per parameter: collectives have a
fixed cost per call, and a small model has hundreds of parameters.
"""
from __future__ import annotations

import os
import socket
from typing import Any

from . import backend

ENV_WORLD_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")  # set by mpiexec
BUCKET_BYTES = 25 * 2**20  # NCCL: gradients go in buckets of about this size (DDP's default)


def local_ranks() -> int:
    """How many ranks mpiexec started on this host (they share its cores)."""
    for name in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def launched_world_size() -> int:
    """How many ranks mpiexec started (1 when it did not start us), from its environment."""
    for name in ENV_WORLD_SIZE[:3]:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


class MPICommunicator:
    """MPI's COMM_WORLD through mpi4py: host buffers (NumPy arrays), in place."""

    def __init__(self, comm: Any = None) -> None:
        if comm is None:
            from mpi4py import MPI  # the optional dependency, imported when asked for
            comm = MPI.COMM_WORLD
        self.comm = comm
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()
        self.host = socket.gethostname()

    def allreduce(self, buffer) -> None:
        from mpi4py import MPI
        self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)

    def broadcast(self, buffer, root: int = 0) -> None:
        self.comm.Bcast(buffer, root=root)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return self.comm.bcast(obj, root=root)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        """End every rank of the job at once (a rank that cannot go on)."""
        self.comm.Abort(code)


class NCCLCommunicator:
    """NCCL through CuPy: GPU buffers (CuPy arrays), one process per GPU.

    Bootstrapped over MPI: rank 0 makes the NCCL unique id and MPI broadcasts it; then
    every rank joins the NCCL communicator with (world_size, id, rank). `nccl` is the
    `cupy.cuda.nccl` module (injectable, so the bootstrap and the calls can be tested
    without a GPU).
    """

    def __init__(self, mpi: MPICommunicator, nccl: Any = None, cupy: Any = None) -> None:
        if nccl is None:
            from cupy.cuda import nccl  # the GPU extra
        self.cupy = cupy if cupy is not None else backend.cupy
        self.mpi, self.nccl = mpi, nccl
        self.rank, self.world_size, self.host = mpi.rank, mpi.world_size, mpi.host
        self.cupy.cuda.Device(int(os.environ.get("MPI_LOCALRANKID", mpi.rank))).use()  # one GPU per rank
        unique_id = nccl.get_unique_id() if mpi.rank == 0 else None
        unique_id = mpi.broadcast_object(unique_id, root=0)
        self.comm = nccl.NcclCommunicator(mpi.world_size, unique_id, mpi.rank)

    def _stream(self) -> int:
        return self.cupy.cuda.get_current_stream().ptr

    def allreduce(self, buffer) -> None:
        self.comm.allReduce(buffer.data.ptr, buffer.data.ptr, buffer.size, self.nccl.NCCL_FLOAT32,
                            self.nccl.NCCL_SUM, self._stream())

    def broadcast(self, buffer, root: int = 0) -> None:
        self.comm.bcast(buffer.data.ptr, buffer.size, self.nccl.NCCL_FLOAT32, root, self._stream())

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return self.mpi.broadcast_object(obj, root)

    def barrier(self) -> None:
        self.mpi.barrier()

    def abort(self, code: int = 1) -> None:
        self.mpi.abort(code)


def from_environment(device: str) -> MPICommunicator | NCCLCommunicator | None:
    """The communicator of a job mpiexec started (NCCL on 'cuda', MPI otherwise), or None
    for a single process. A RuntimeError (one line) when mpi4py is missing."""
    if launched_world_size() <= 1:
        return None
    try:
        mpi = MPICommunicator()
    except ImportError:
        raise RuntimeError("this process was started by mpiexec, but mpi4py is not installed: "
                           "pip install 'tinygrad_lite[mpi]' (mpi4py and MPICH)") from None
    if mpi.world_size == 1:
        return None
    return NCCLCommunicator(mpi) if device == "cuda" else mpi


class GradientSync:
    """Adds up the gradients of every rank in one flat buffer (or a few large buckets).

        sync = GradientSync(model.parameters(), communicator)
        sync.broadcast_weights()          # once: every rank starts from rank 0's weights
        loss.backward(); sync.allreduce([loss_sum, stop]) -> the summed extras
    Parameters without a gradient contribute zeros. The extras (a few Python floats: the
    loss, a stop flag) ride in the same call.
    """

    def __init__(self, params: list, communicator, bucket_bytes: int | None = None) -> None:
        self.params, self.comm = params, communicator
        self.xp = params[0].xp
        self.sizes = [p.size for p in params]
        per_bucket = (bucket_bytes // 4) if bucket_bytes else sum(self.sizes) + 1  # float32 elements
        self.buckets, start, filled = [], 0, 0  # (first, end) parameter index of each bucket
        for i, size in enumerate(self.sizes):
            if filled and filled + size > per_bucket:  # this one would overflow: start a new bucket
                self.buckets.append((start, i))
                start, filled = i, 0
            filled += size
        self.buckets.append((start, len(params)))

    def broadcast_weights(self, root: int = 0) -> None:
        for lo, hi in self.buckets:
            # (in memory order: a column-major weight goes as it lies, and comes back so)
            flat = self.xp.concatenate([backend.flatten(p.data) for p in self.params[lo:hi]]).astype("float32")
            self.comm.broadcast(flat, root)
            offset = 0
            for p in self.params[lo:hi]:
                p.data = backend.unflatten(flat[offset:offset + p.size], p.data).astype(p.dtype)
                offset += p.size

    def allreduce(self, extras: list[float] = ()) -> list[float]:
        """Sum every rank's .grad (in place) and the extras; returns the summed extras."""
        summed = []
        for b, (lo, hi) in enumerate(self.buckets):
            parts = [backend.flatten(backend.in_layout_of(p.grad, p.data)) if p.grad is not None
                     else self.xp.zeros(p.size, dtype="float32") for p in self.params[lo:hi]]
            if b == len(self.buckets) - 1:  # the extras ride in the last bucket
                parts.append(self.xp.asarray(list(extras) or [0.0], dtype="float32"))
            flat = self.xp.concatenate(parts).astype("float32")
            self.comm.allreduce(flat)
            offset = 0
            for p, size in zip(self.params[lo:hi], self.sizes[lo:hi]):
                p.grad = backend.unflatten(flat[offset:offset + size], p.data)  # (each rank's weights alike)
                offset += size
            if b == len(self.buckets) - 1:
                summed = [float(v) for v in backend.to_numpy(flat[offset:])][:len(extras)]
        return summed

    def allreduce_values(self, values: list[float]) -> list[float]:
        """Sum a few Python floats over the ranks (evaluation losses)."""
        flat = self.xp.asarray(list(values) or [0.0], dtype="float32")
        self.comm.allreduce(flat)
        return [float(v) for v in backend.to_numpy(flat)][:len(values)]
