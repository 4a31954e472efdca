"""Processes started by tests: one way to start them, one way to end them.

Every child a test starts goes through :func:`start` (or :func:`run`, which waits for it):
it runs in a process group of its own (``start_new_session``), so ending it ends what it
started too (a DDP run's second rank, data-loader workers); a group a library starts (a
Jupyter kernel) is recorded by :func:`adopt`. :func:`stop` ends a group:
SIGTERM, then SIGKILL after a grace period. The ``ended_processes`` fixture in
``conftest.py`` stops every group a test left running, whatever the test's outcome, and the
session fails if a process started under it is still alive at its end
(:func:`survivors`: the groups started here, and, on Linux, every descendant of this
process, which is made a child subreaper so orphaned grandchildren stay visible).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from distillery.config.resolvers import PROJECT_ROOT

GROUPS: set[int] = set()  # process groups started in this (worker) process


def cli_env() -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def start(cmd: list[str], **kwargs) -> subprocess.Popen:
    """``Popen`` in a new process group, recorded for :func:`stop_all`."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    GROUPS.add(proc.pid)  # a new session's group id is its leader's pid
    return proc


def adopt(pgid: int) -> None:
    """Record a process group a library started in a session of its own (a Jupyter
    kernel, ``tests/test_notebooks.py``), so that it is ended like one :func:`start` made."""
    GROUPS.add(pgid)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not all(zombie(pid) for pid in members(pgid))


def members(pgid: int) -> list[int]:
    """Pids in process group ``pgid`` (Linux /proc; elsewhere: the leader)."""
    if not Path("/proc").is_dir():
        return [pgid]
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = read_stat(stat)
        if fields and int(fields[2]) == pgid:
            found.append(int(stat.parent.name))
    return found


def read_stat(stat: Path) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...)."""
    try:
        text = stat.read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def zombie(pid: int) -> bool:
    fields = read_stat(Path(f"/proc/{pid}/stat"))
    return fields is None or fields[0] in ("Z", "X")


def stop(proc_or_pgid: subprocess.Popen | int, grace: float = 5.0) -> None:
    """End a process group: SIGTERM, then SIGKILL if it is still alive after ``grace``."""
    pgid = proc_or_pgid if isinstance(proc_or_pgid, int) else proc_or_pgid.pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not isinstance(proc_or_pgid, int):
                proc_or_pgid.poll()  # the leader, once it exits, is reaped by its Popen
            if not group_alive(pgid):
                break
            time.sleep(0.05)
        else:
            continue
        break
    if not isinstance(proc_or_pgid, int):
        try:
            proc_or_pgid.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for pipe in (proc_or_pgid.stdin, proc_or_pgid.stdout, proc_or_pgid.stderr):
            if pipe is not None:
                pipe.close()
    if not group_alive(pgid):
        GROUPS.discard(pgid)


def stop_all() -> list[int]:
    """Stop every group still alive; returns the ones that were."""
    alive = [g for g in sorted(GROUPS) if group_alive(g)]
    for pgid in alive:
        stop(pgid, grace=2.0)
    GROUPS.difference_update(g for g in list(GROUPS) if not group_alive(g))
    return alive


def become_subreaper() -> None:
    """Orphans of our children re-parent to this process (Linux), not to init."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def reap() -> None:
    """Collect exited children (orphans re-parented to a subreaper become ours). Only at
    the session's end: it would take the exit status of a ``Popen`` still to be waited."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def descendants(root: int | None = None) -> dict[int, str]:
    """Live descendants of ``root`` (default: this process): pid -> command line."""
    root = root or os.getpid()
    parent, cmd = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = read_stat(stat)
        if fields and fields[0] not in ("Z", "X"):
            pid = int(stat.parent.name)
            parent[pid] = int(fields[1])
            try:
                cmd[pid] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                cmd[pid] = "?"
    found, frontier = {}, {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier and p not in found}
        found.update({p: cmd[p] for p in frontier})
    return found


def survivors(grace: float = 10.0) -> dict[int, str]:
    """Processes started under this session that are still alive after ``grace`` seconds,
    then killed. Empty when every test ended what it started."""
    deadline = time.monotonic() + grace
    while True:
        reap()
        left = {g: f"process group {g}" for g in GROUPS if group_alive(g)}
        if Path("/proc").is_dir():
            left.update(descendants())
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    stop_all()
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    reap()
    return left


def run(
    module: str, *args: str, check: bool = True, timeout: int = 300
) -> subprocess.CompletedProcess:
    """``python -m module args`` from the project root; its group ends with it, on every
    path (a timeout or an interrupted test included)."""
    cmd = [sys.executable, "-m", module, *args]
    proc = start(cmd, cwd=PROJECT_ROOT, env=cli_env(), stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        stop(proc)
        raise
    stop(proc)  # what it started and left behind
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{out[-3000:]}\n{err[-5000:]}")
    return done
