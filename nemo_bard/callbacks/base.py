"""A tiny callback protocol the BARD recipes call.

Callbacks are listed in YAML under ``callbacks:`` with ``_target_`` (NeMo style) and receive the
recipe object at each hook. ``step`` is the index of the optimizer step (``step_scheduler.step``:
the number of steps already completed).
"""

from __future__ import annotations

from typing import Any, Iterable


class BardCallback:
    """Base class: every hook is a no-op; override the ones you need."""

    def on_train_start(self, recipe: Any) -> None:
        """After setup and checkpoint restore, before the first step of this process."""

    def on_step_start(self, recipe: Any, step: int) -> None:
        """Before optimizer step ``step`` builds its batches."""

    def on_step_end(self, recipe: Any, step: int, metrics: dict[str, float]) -> None:
        """After step ``step`` (metrics as logged)."""

    def on_save(self, recipe: Any, checkpoint_dir: str) -> None:
        """After a checkpoint was written to ``checkpoint_dir``."""

    def on_train_end(self, recipe: Any) -> None:
        """After the last step, before the process exits."""


class CallbackList(BardCallback):
    """Calls a list of callbacks in order."""

    def __init__(self, callbacks: Iterable[BardCallback] = ()) -> None:
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, BardCallback):
                raise TypeError(f"callbacks: {type(cb).__name__} is not a nemo_bard.callbacks.BardCallback")

    def __iter__(self):
        return iter(self.callbacks)

    def on_train_start(self, recipe: Any) -> None:
        for cb in self.callbacks:
            cb.on_train_start(recipe)

    def on_step_start(self, recipe: Any, step: int) -> None:
        for cb in self.callbacks:
            cb.on_step_start(recipe, step)

    def on_step_end(self, recipe: Any, step: int, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_step_end(recipe, step, metrics)

    def on_save(self, recipe: Any, checkpoint_dir: str) -> None:
        for cb in self.callbacks:
            cb.on_save(recipe, checkpoint_dir)

    def on_train_end(self, recipe: Any) -> None:
        for cb in self.callbacks:
            cb.on_train_end(recipe)
