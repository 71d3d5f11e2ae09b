"""The failures every command expects, and how a command ends on one: one line on stderr, no traceback.

    ConfigError    a bad config value, flag or input path: exit status 2, before anything is built
    RunError       a run-time failure (a bad record met in training, a non-finite loss, a checkpoint
                   that cannot be written or read): exit status 1
    OSError        a file that cannot be read or written (its message names it): exit status 1

Set MMCMAE_DEBUG=1 (or pass --debug) to get the traceback instead. This module imports nothing of the
project, so that every layer can raise these without an import circle.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable

USAGE_STATUS = 2    # a bad config, flag or input: nothing was run
RUN_TIME_STATUS = 1  # the run started and failed
DEBUG_VARIABLE = "MMCMAE_DEBUG"


class ConfigError(ValueError):
    """A config field, flag or input path has a bad value; the message starts with the field's path."""


class RunError(Exception):
    """A failure met while running, named in its message: where (file, record, step) and what to do."""


class NonFiniteError(RunError, FloatingPointError):
    """A loss or gradient became NaN or infinite; the last good checkpoint is left as it was."""


class CheckpointError(RunError):
    """A checkpoint could not be written or read back."""


@contextlib.contextmanager
def unreadable_as(error: type, path: str, what: str):
    """Turn any failure of a reader library (safetensors, torch, orbax, msgpack: each has its own error
    types, and few name the file) into `error` naming `path`, what it should have been, and the cause."""
    try:
        yield
    except (ConfigError, RunError):
        raise
    except Exception as err:  # noqa: BLE001 -- re-raised as one error that names the file
        raise error(f"{path}: cannot be read as {what} ({type(err).__name__}: {one_line(err)}); "
                    "is it complete and of that format?") from err


def exit_status(err: BaseException) -> int | None:
    """The exit status a command ends with on `err`, or None when `err` is not an expected failure
    (a bug: its traceback is what a report needs)."""
    if isinstance(err, ConfigError):
        return USAGE_STATUS
    if isinstance(err, (RunError, OSError)):
        return RUN_TIME_STATUS
    return None


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (orbax, tensorstore and the OS spread theirs over several)."""
    return " ".join(str(err).split()) or type(err).__name__


def debug_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def run_reporting(body: Callable[[], int | None], debug: bool = False) -> int:
    """body() -> exit status (None: 0), with an expected failure printed as one line on stderr and turned
    into its exit status; with `debug` (or MMCMAE_DEBUG=1) it propagates with its traceback."""
    try:
        return body() or 0
    except Exception as err:  # noqa: BLE001 -- re-raised unless it is one of the expected failures
        status = exit_status(err)
        if status is None or debug_requested(debug):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        return status
