"""Errors a user acts on, and how every command line reports them.

Each entry point (``automodel``, ``python -m nemo_bard.convert`` / ``.generate``) prints a
:class:`BardError` as one line on stderr and exits with its ``exit_code``; no traceback unless
``--debug`` or ``NEMO_BARD_DEBUG=1``. Exit codes: 2 bad input (config, schedule, data, paths,
arguments), 3 training diverged (non-finite steps), 1 other failures with a clear cause (disk full),
``128 + signal`` a run stopped by SIGTERM/SIGINT after saving a checkpoint.

Light: imports nothing beyond the standard library, so a front end reports errors before any heavy import.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

DEBUG_ENV = "NEMO_BARD_DEBUG"
EXIT_USAGE = 2
EXIT_DIVERGED = 3


class BardError(Exception):
    """An error whose message alone says what happened and what to do."""

    exit_code = 1


class UserError(BardError, ValueError):
    """Bad input the user can fix (config key, schedule, data file or row, path, argument); exit code 2."""

    exit_code = EXIT_USAGE


class BardConfigError(UserError):
    """A bad BARD config value; the message names the key and the fix."""


class TrainingDiverged(BardError, FloatingPointError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient; exit code 3."""

    exit_code = EXIT_DIVERGED


class DiskFullError(BardError, OSError):
    """A write failed because the file system is full (the incomplete artifact is not published)."""

    exit_code = 1


class RunStopped(BardError):
    """A training run stopped by a signal after saving a checkpoint; exit code 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


def debug_enabled() -> bool:
    """True when ``NEMO_BARD_DEBUG`` is set to something other than ``0`` / empty."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def find_bard_error(exc: BaseException | None) -> BardError | None:
    """The :class:`BardError` that caused ``exc`` (itself, or one in its cause/context chain), if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, BardError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line (an error re-raised from a dataloader worker keeps its last line)."""
    text = str(exc).strip()
    if "Original Traceback" in text:  # torch's re-raise from a worker: "<type>: <message>" is the last line
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].isidentifier() else last
    return " ".join(text.split())


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""


def report(prog: str, exc: BaseException) -> int:
    """Print ``exc`` for the user (one line; the traceback too in debug mode); returns the exit code."""
    err = find_bard_error(exc)
    if debug_enabled():
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, KeyboardInterrupt) and err is None:
        print(f"{_rank_prefix()}{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    assert err is not None
    kind = "" if isinstance(err, RunStopped) else "error: "
    print(f"{_rank_prefix()}{prog}: {kind}{one_line(err)}", file=sys.stderr, flush=True)
    return err.exit_code


def run_reported(prog: str, fn: Callable[[], int | None]) -> int:
    """Run ``fn``; a :class:`BardError` (or an error caused by one) or Ctrl-C becomes a one-line report and
    its exit code. Anything else propagates with its traceback (a bug to report)."""
    try:
        return int(fn() or 0)
    except BaseException as exc:  # noqa: BLE001  filtered right below
        if isinstance(exc, SystemExit) or (find_bard_error(exc) is None and not isinstance(exc, KeyboardInterrupt)):
            raise
        return report(prog, exc)


__all__ = [
    "DEBUG_ENV",
    "EXIT_DIVERGED",
    "EXIT_USAGE",
    "BardError",
    "DiskFullError",
    "RunStopped",
    "TrainingDiverged",
    "UserError",
    "debug_enabled",
    "find_bard_error",
    "one_line",
    "report",
    "run_reported",
]
