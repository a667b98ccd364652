"""How a process stops on a signal: SIGTERM, SIGINT and SIGHUP end every process of a command
(workers, co-running profile copies, a bench's runs), each after its `finally` blocks."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["STOP_SIGNALS", "STOPPED_EXIT_CODES", "stop_on_signals", "restore_signals", "stopping_signal",
           "raise_if_stopping", "end_children", "die_with_parent", "descendants"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOPPED_EXIT_CODES = tuple(128 + s for s in STOP_SIGNALS)
_stopped_by: list[int] = []  # the signal that is stopping this process, if any


def stop_on_signals() -> dict:
    """SIGTERM, SIGINT and SIGHUP become SystemExit(128 + signal), so `finally` blocks (cache files,
    child processes) run; a second signal is ignored while they do. `stopping_signal()` then
    tells any error that follows apart from a real failure. Returns the handlers it replaced
    (for `restore_signals`)."""
    _stopped_by.clear()

    def handler(signum, frame):
        if not _stopped_by:
            _stopped_by.append(signum)
            if hasattr(signal, "SIGCHLD"):  # loader workers got the same signal: their end is no failure now
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            sys.unraisablehook = _quiet_while_stopping
            raise SystemExit(128 + signum)
    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}


def restore_signals(previous: dict) -> None:
    """The work is over: a signal has nothing left to stop (and must not raise in shutdown)."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def stopping_signal() -> int | None:
    return _stopped_by[0] if _stopped_by else None


def raise_if_stopping() -> None:
    """For loops that run long: a stop whose SystemExit landed where Python only prints it (in a
    finalizer or a weakref callback, which then goes on) still ends the work here."""
    signum = stopping_signal()
    if signum is not None:
        raise SystemExit(128 + signum)


def _quiet_while_stopping(unraisable) -> None:
    """While stopping, an exception raised where Python can only print it (often the stop's own
    SystemExit inside a finalizer) is a consequence of the stop: the one stop line says it."""
    if stopping_signal() is None:
        sys.__unraisablehook__(unraisable)


def end_children(children: Iterable[subprocess.Popen], grace_seconds: float = 30.0) -> None:
    """Stop children that may still run: SIGTERM to each at once (each stops its own children
    and removes its files); any still running after `grace_seconds` gets SIGKILL, and so does
    every process under it (torch's agent starts its workers in sessions of their own)."""
    running = [c for c in children if c.poll() is None]
    for child in running:
        child.terminate()
    deadline = time.monotonic() + grace_seconds
    for child in running:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGSTOP)  # starts nothing new while we look under it
            for pid in [*descendants(child.pid), child.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            child.wait()


def die_with_parent() -> None:
    """For a child's `preexec_fn`: SIGTERM when the process that started it dies (Linux's
    PR_SET_PDEATHSIG), so a child in a session of its own cannot outlive a killed parent."""
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's handlers still stop it
        pass


def descendants(pid: int) -> list[int]:
    """Every process under `pid`, from /proc (none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "pid (name)": state, ppid
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found
