"""The lines a run prints for its user: each one time-stamped and named by what prints it.

    2025-06-01 14:03:22 [stage2] step 40/300 | depth 0.4121/0.9870 ... | eta 3m12s

This module imports nothing of the project, so that every layer (data, trainer, commands) prints alike.
"""
from __future__ import annotations

import time


def timestamp() -> str:
    """Local wall-clock time to the second: when a line was printed, for runs that last hours."""
    return time.strftime("%Y-%m-%d %H:%M:%S")


def say(name: str, message: str) -> None:
    """Print `message` as one progress line of `name` (a stage, a command, "data")."""
    print(f"{timestamp()} [{name}] {message}", flush=True)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
