"""How a process stops on a signal: SIGTERM and SIGINT end every process of a command
(workers, co-running profile copies, a bench's runs), each after its `finally` blocks."""
from __future__ import annotations

import signal
import subprocess

__all__ = ["stop_on_signals", "restore_signals", "stopping_signal", "end_child"]

_stopped_by: list[int] = []  # the signal that is stopping this process, if any


def stop_on_signals() -> dict:
    """SIGTERM and SIGINT become SystemExit(128 + signal), so `finally` blocks (cache files,
    child processes) run; `stopping_signal()` then tells any error that follows apart from a
    real failure. Returns the handlers it replaced (for `restore_signals`)."""
    _stopped_by.clear()

    def handler(signum, frame):
        if not _stopped_by:
            _stopped_by.append(signum)
            raise SystemExit(128 + signum)
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


def restore_signals(previous: dict) -> None:
    """The work is over: a signal has nothing left to stop (and must not raise in shutdown)."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def stopping_signal() -> int | None:
    return _stopped_by[0] if _stopped_by else None


def end_child(child: subprocess.Popen, grace_seconds: float = 30.0) -> None:
    """Stop a child that may still run: SIGTERM (it stops its own children and removes its
    files), then SIGKILL if it has not ended within `grace_seconds`."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(grace_seconds)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
