"""One run per out dir: a lock the operating system releases when the process dies.

Two training runs writing the same out dir would interleave their logs and overwrite each
other's checkpoints. So train.py holds an exclusive lock on `<out_dir>/train.lock` while it
runs. The lock is fcntl's: the kernel drops it when the holding process ends in any way,
SIGKILL included, so a crashed run never leaves the folder locked. An fcntl lock cannot
tell who holds it, so the holder also writes its PID and host into the file; a second run
reads them for its one-line error. Readers (sample.py, serve.py) take no lock: checkpoints
are committed atomically (model/checkpoint.py) and can be read while training runs.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

LOCK_NAME = "train.lock"


class OutDirInUse(RuntimeError):
    """Another process holds the out dir's lock; the message names it."""


class OutDirLock:
    """with OutDirLock(out_dir): ... runs with the out dir to itself (or raises OutDirInUse)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "OutDirLock":
        import fcntl  # POSIX; on Windows there is no such lock, and no protection
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # (a read-only place, a file in the path): one line that names the folder
            raise OSError(f"cannot create the out dir {self.path.parent}: {error.strerror or error}") from None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").split()
            os.close(fd)
            who = f"pid {holder[0]} on host {holder[1]}" if len(holder) >= 2 else "another process"
            raise OutDirInUse(f"{self.path.parent} is in use by another train.py ({who}); wait for it, stop it, "
                              "or pass another --out-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock; the file stays, unlocked
            self.fd = None

    def __enter__(self) -> "OutDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
