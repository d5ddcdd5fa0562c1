"""Watching processes from a test: alive or not, and waiting for a condition."""

from __future__ import annotations

import time
from pathlib import Path


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan or a killed child waits for a reaper that a container may not have)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait(condition, seconds: float = 20.0) -> bool:
    """Whether ``condition()`` became true within ``seconds`` (polled every 0.1 s)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()
