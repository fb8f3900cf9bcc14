"""Decoding settings (torch-free, so command lines validate them before heavy imports).

* Decoding points: one grammar, ``BLOCK:STEPS:THRESHOLD[:static|dynamic]`` or ``AR``, used by
  ``python -m nemo_bard.eval --points``, ``python -m nemo_bard.bench.decode --points`` and the demo.
* Engines (one decoding loop, three ways to run its forwards): ``static`` (lean layers, static shapes, CUDA
  graphs on GPU), ``compiled`` (the same with ``torch.compile``), ``eager`` (transformers' own layers, no
  graphs); ``hf`` is Hugging Face ``generate`` (AR baselines only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

ENGINES = ("static", "compiled", "eager")
AR_ENGINES = (*ENGINES, "hf")


class EngineError(ValueError):
    """A request the decoding engine cannot serve; the message names the flag and the limit."""


def check_engine(name: str) -> str:
    """Validate an engine name (``--engine``)."""
    if name not in ENGINES:
        raise EngineError(f"--engine {name!r} is not one of {', '.join(ENGINES)}")
    return name


REMASKING_STRATEGIES = ("low_confidence_dynamic", "low_confidence_static")
STRATEGY_ALIASES = {
    "static": "low_confidence_static",
    "dynamic": "low_confidence_dynamic",
    "low_confidence_static": "low_confidence_static",
    "low_confidence_dynamic": "low_confidence_dynamic",
}


@dataclass(frozen=True)
class DecodePoint:
    """One decoding setting. All fields None = the AR baseline.

    ``strategy`` defaults to ``low_confidence_static`` when ``threshold >= 1.0`` (a fixed number of
    tokens per step; with S = B that is one token per forward) and ``low_confidence_dynamic``
    otherwise (commit every position with confidence > threshold, at least the scheduled number).
    """

    block_size: int | None = None
    denoising_steps: int | None = None
    threshold: float | None = None
    strategy: str | None = None

    @property
    def is_ar(self) -> bool:
        return self.block_size is None

    @property
    def remasking_strategy(self) -> str | None:
        if self.is_ar:
            return None
        if self.strategy:
            return STRATEGY_ALIASES[self.strategy]
        return "low_confidence_static" if (self.threshold if self.threshold is not None else 1.0) >= 1.0 \
            else "low_confidence_dynamic"

    @property
    def label(self) -> str:
        """Short name, e.g. ``B16 S16 t0.9`` or ``AR``."""
        if self.is_ar:
            return "AR"
        tau = 1.0 if self.threshold is None else self.threshold
        text = f"B{self.block_size} S{self.denoising_steps or self.block_size} t{tau:g}"
        if self.strategy:
            text += f" {self.remasking_strategy.removeprefix('low_confidence_')}"
        return text

    @property
    def spec(self) -> str:
        """The point as :meth:`parse` reads it, strategy spelled out: ``"16:16:0.9:dynamic"`` or ``"AR"``."""
        if self.is_ar:
            return "AR"
        tau = 1.0 if self.threshold is None else self.threshold
        strategy = self.remasking_strategy.removeprefix("low_confidence_")
        return f"{self.block_size}:{self.denoising_steps or self.block_size}:{tau:g}:{strategy}"

    @classmethod
    def parse(cls, spec: str) -> "DecodePoint":
        """``"B:S:tau"`` or ``"B:S:tau:static|dynamic"``; ``"AR"`` for the AR baseline."""
        spec = spec.strip()
        if spec.lower() == "ar":
            return cls()
        parts = spec.split(":")
        if not 3 <= len(parts) <= 4:
            raise ValueError(f"decoding point {spec!r}: expected BLOCK:STEPS:THRESHOLD[:static|dynamic]")
        try:
            b, s, tau = int(parts[0]), int(parts[1]), float(parts[2])
        except ValueError:
            raise ValueError(f"decoding point {spec!r}: BLOCK and STEPS must be integers, THRESHOLD a number") from None
        if b < 1 or not 1 <= s <= b:
            raise ValueError(f"decoding point {spec!r}: need BLOCK >= 1 and 1 <= STEPS <= BLOCK")
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"decoding point {spec!r}: THRESHOLD must be in [0, 1]")
        strategy = parts[3].strip() if len(parts) == 4 else None
        if strategy is not None and strategy not in STRATEGY_ALIASES:
            raise ValueError(f"decoding point {spec!r}: strategy must be one of {sorted(STRATEGY_ALIASES)}")
        return cls(b, s, tau, strategy)


def parse_points(spec: str | Sequence[str | DecodePoint] | None) -> list[DecodePoint]:
    """Comma-separated point specs (``"4:4:1.0,16:16:0.9"``) or a list of specs / points."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [p for p in items if not (isinstance(p, str) and not p.strip())]
    return [p if isinstance(p, DecodePoint) else DecodePoint.parse(p) for p in items]


def default_points(block_size: int) -> list[DecodePoint]:
    """One token per forward (tau 1.0) and the fast dynamic setting (tau 0.9) at the checkpoint's block size."""
    return [DecodePoint(block_size, block_size, 1.0), DecodePoint(block_size, block_size, 0.9)]
