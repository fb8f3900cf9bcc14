"""Fault injection for the end-to-end tests: a recipe callback that signals its own process at a given step."""

from __future__ import annotations

import os
import signal as signals
from pathlib import Path

from nemo_bard.callbacks.base import BardCallback


class SignalAt(BardCallback):
    """Send ``signal`` (a name, e.g. ``SIGKILL``) to this process when step ``step`` starts, once: the file ``once``
    records that it fired, so the same command run again (the resume) is not signalled again."""

    def __init__(self, step: int, signal: str, once: str) -> None:
        self.step, self.signum, self.once = int(step), getattr(signals, signal), Path(once)

    def on_step_start(self, recipe, step: int) -> None:
        if step == self.step and not self.once.exists():
            self.once.write_text(str(os.getpid()))
            os.kill(os.getpid(), self.signum)


__all__ = ["SignalAt"]
