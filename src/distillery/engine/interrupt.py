"""Stopping a run from outside without losing it: SIGTERM (schedulers, ``kill``) and
SIGUSR1 (SLURM's pre-emption warning with ``--signal``) end the fit after the current
batch, ``last.ckpt`` is written atomically (``distillery.engine.callbacks.ModelCheckpoint``),
and the command exits with 128 + the signal number, saying how to resume.

Lightning handles SIGTERM itself (it raises ``SIGTERMException`` after the batch); SIGUSR1
is turned into the same path, except inside a SLURM job (``SLURM_JOB_ID`` set), where
SIGUSR1 is left to Lightning's SLURM handling (checkpoint and requeue with auto-requeue).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Interrupted(Exception):
    """The fit was stopped by a signal; ``last.ckpt`` holds where it stopped."""

    def __init__(self, signum: int, step: int, ckpt: str | None):
        self.signum, self.step, self.ckpt = signum, step, ckpt
        name = signal.Signals(signum).name
        where = (
            f"last.ckpt written to {ckpt}; resume with ckpt_path={ckpt}"
            if ckpt
            else ("no checkpoint was written (checkpointing is off)")
        )
        super().__init__(f"interrupted by {name} at optimizer step {step}: {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def sigusr1_as_sigterm() -> Iterator[list[int]]:
    """While fitting: SIGUSR1 ends the fit like SIGTERM. Yields the signals received."""
    received: list[int] = []
    usable = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR1")
    if not usable or os.environ.get("SLURM_JOB_ID"):
        yield received
        return

    def on_usr1(signum, frame) -> None:
        received.append(signum)
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's SIGTERM path: stop after the batch

    previous = signal.signal(signal.SIGUSR1, on_usr1)
    try:
        yield received
    finally:
        signal.signal(signal.SIGUSR1, previous)
