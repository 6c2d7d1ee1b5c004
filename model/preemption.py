"""Preemption: SIGTERM (and Ctrl-C) end a training run at the next step boundary, saved.

Clusters stop jobs with SIGTERM, usually to the whole process group, and give them a
few seconds. Dying mid-step would lose everything since the last checkpoint. Instead
the signal only raises a flag; the training loop finishes the step it is in, writes a
checkpoint, says where in one line and exits, so `--resume` continues exactly there.
Under mpiexec every rank sees the signal at its own moment, so the flag is added up
across ranks with the step's gradients (tinygrad_lite/distributed.py) and all ranks
stop after the same step. The data-parallel worker processes ignore both signals
(tinygrad_lite/parallel.py): the main process decides when they stop.
"""
from __future__ import annotations

import signal

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + the signal number, as a shell reports


class StopRequest:
    """While installed, SIGTERM and SIGINT set `signal` instead of killing the process;
    a second Ctrl-C stops at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: do not wait for the step
        self.signal = signum

    def install(self) -> "StopRequest":
        for signum in EXIT_CODES:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread): no handler
                pass
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""
