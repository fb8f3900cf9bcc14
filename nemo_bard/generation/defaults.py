"""The decoding point a model directory carries (this module itself needs no torch).

A ``bard_vl`` directory may name its default decoding point in ``generation_config.json``::

    {"denoising_steps": 16, "remasking_strategy": "low_confidence_dynamic", "confidence_threshold": 0.7, ...}

(the block size is the model's ``config.json`` ``block_size``). ``python -m nemo_bard.eval --tune`` writes these
keys (:func:`write_decoding_point`, atomically, the replaced file kept as ``generation_config.json.bak``) with the
evidence beside them in ``decoding_point.json``. ``generate``, ``eval``, the lmms-eval model and ``serve`` read
them (:func:`read_decoding_defaults`) as their defaults; an explicit flag or model arg wins, field by field.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_bard.errors import UserError
from nemo_bard.generation.points import STRATEGY_ALIASES, DecodePoint

GENERATION_CONFIG = "generation_config.json"
BACKUP_SUFFIX = ".bak"
EVIDENCE_FILE = "decoding_point.json"
KEYS = ("denoising_steps", "remasking_strategy", "confidence_threshold")
BUILTIN_THRESHOLD = 0.9  # tau when neither a flag nor the model directory names one (generate, serve)


class DefaultsError(UserError):
    """A decoding default that cannot be read or written; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class DecodingDefaults:
    """The decoding keys of a model directory's ``generation_config.json`` (None: not set)."""

    denoising_steps: int | None = None
    remasking_strategy: str | None = None
    confidence_threshold: float | None = None
    source: str | None = None  # the file they were read from

    @property
    def empty(self) -> bool:
        return self.denoising_steps is None and self.remasking_strategy is None and self.confidence_threshold is None

    def resolve(
        self,
        block_size: int,
        denoising_steps: int | None = None,
        remasking_strategy: str | None = None,
        confidence_threshold: float | None = None,
        fallback_threshold: float = BUILTIN_THRESHOLD,
    ) -> tuple[int, str, float]:
        """``(steps, strategy, tau)``: each an explicit value, else this directory's, else S = B and
        ``fallback_threshold``; a strategy left unset follows an explicit tau (static at tau >= 1, else dynamic)
        rather than the file, so ``--confidence-threshold 0.8`` alone never meets a stored static strategy."""
        steps = denoising_steps or self.denoising_steps or block_size
        tau = confidence_threshold if confidence_threshold is not None else self.confidence_threshold
        tau = fallback_threshold if tau is None else float(tau)
        if remasking_strategy:
            strategy = STRATEGY_ALIASES[remasking_strategy]
        elif confidence_threshold is None and self.remasking_strategy:
            strategy = self.remasking_strategy
        else:
            strategy = DecodePoint(block_size, 1, tau).remasking_strategy
        return min(max(int(steps), 1), block_size), strategy, tau

    def point(self, block_size: int) -> DecodePoint | None:
        """The stored point at ``block_size`` (None when the directory stores none)."""
        if self.empty:
            return None
        steps, strategy, tau = self.resolve(block_size, fallback_threshold=1.0)
        return DecodePoint(block_size, steps, tau, strategy.removeprefix("low_confidence_"))


def _check(path: Path, key: str, value: Any) -> Any:
    fix = "fix or delete the key (python -m nemo_bard.eval --tune writes it)"
    if key == "denoising_steps":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DefaultsError(f"{path}: {key} is {value!r}, not an integer >= 1; {fix}")
        return value
    if key == "remasking_strategy":
        if value not in STRATEGY_ALIASES:
            names = ", ".join(sorted(set(STRATEGY_ALIASES.values())))
            raise DefaultsError(f"{path}: {key} is {value!r}, not one of {names}; {fix}")
        return STRATEGY_ALIASES[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and 0 <= value <= 1):
        raise DefaultsError(f"{path}: {key} is {value!r}, not a number in [0, 1]; {fix}")
    return float(value)


def read_decoding_defaults(model_dir: str | os.PathLike) -> DecodingDefaults:
    """The decoding keys of ``model_dir/generation_config.json`` (all None when the file or the keys are absent).

    Raises :class:`DefaultsError` naming the file and field when the file is not JSON or a value is invalid.
    """
    path = Path(model_dir) / GENERATION_CONFIG
    if not path.is_file():
        return DecodingDefaults()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DefaultsError(f"{path} is not valid JSON ({exc}); restore it from {path.name}{BACKUP_SUFFIX} or "
                            "re-export the model") from None
    if not isinstance(data, dict):
        raise DefaultsError(f"{path} is not a JSON object; restore it from {path.name}{BACKUP_SUFFIX} or re-export")
    values = {k: _check(path, k, data[k]) for k in KEYS if data.get(k) is not None}
    return DecodingDefaults(**values, source=str(path)) if values else DecodingDefaults()


def check_writable(model_dir: str | os.PathLike, flag: str = "--model") -> None:
    """Raise :class:`DefaultsError` unless files can be created and replaced in ``model_dir``."""
    d = Path(model_dir)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DefaultsError(f"{flag} {d} is read-only ({exc.strerror}), so {GENERATION_CONFIG} cannot be written; "
                            "copy the model directory somewhere writable, or pass --dry-run to only print the "
                            "choice") from None


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.copymode(path, tmp)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_decoding_point(
    model_dir: str | os.PathLike,
    point: DecodePoint,
    evidence: dict | None = None,
) -> dict[str, Path]:
    """Store ``point`` as the directory's default: its keys in ``generation_config.json`` (other keys kept; the
    previous file copied to ``generation_config.json.bak`` first) and ``evidence`` in ``decoding_point.json``.

    Every file is written to a temporary name and renamed into place, so a crash leaves the old or the new file,
    never half of one. Returns the paths written (``config``, ``backup`` when there was a file, ``evidence``).
    """
    if point.is_ar:
        raise ValueError("the AR baseline is not a block-diffusion decoding point")
    d = Path(model_dir)
    check_writable(d)
    path = d / GENERATION_CONFIG
    data: dict[str, Any] = {}
    written: dict[str, Path] = {}
    if path.is_file():
        old = path.read_text(encoding="utf-8")
        try:
            data = json.loads(old)
        except json.JSONDecodeError:
            raise DefaultsError(f"{path} is not valid JSON; fix or delete it before storing a decoding point") from None
        backup = d / (GENERATION_CONFIG + BACKUP_SUFFIX)
        _write_atomic(backup, old)
        written["backup"] = backup
    data.update(denoising_steps=int(point.denoising_steps or point.block_size),
                remasking_strategy=point.remasking_strategy,
                confidence_threshold=1.0 if point.threshold is None else float(point.threshold))
    _write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    written["config"] = path
    if evidence is not None:
        _write_atomic(d / EVIDENCE_FILE, json.dumps(evidence, indent=2) + "\n")
        written["evidence"] = d / EVIDENCE_FILE
    return written
