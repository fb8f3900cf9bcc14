"""The ``bard:`` config section (typed, validated before any heavy work)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from nemo_bard.data.noise import NoiseConfig


class BardConfigError(ValueError):
    """A bad BARD config value; the message names the key and the fix."""


@dataclass
class LossSettings:
    """``bard.loss``: reduction ``sample_mean`` | ``token_mean``; ``min_t`` clamps t inside 1/t."""

    reduction: str = "sample_mean"
    min_t: float | None = None
    pad_weight: float = 0.5
    fp32_upcast: bool = True


@dataclass
class BardSettings:
    """``bard:`` section.

    ``block_size``: training block size when no ``block_merge`` schedule is given (default: the model
    config's ``block_size``).
    """

    block_size: int | None = None
    mask_token_id: int | None = None
    response_pad_token: str = "<|im_end|>"
    max_length: int | None = 8192
    clean_attention: str = "block_causal"
    mask_backend: str = "dense"
    flex_compile: bool = False
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    loss: LossSettings = field(default_factory=LossSettings)
    length_grouped: bool = True
    length_group_mult: int = 50
    export_dtype: str | None = None
    export_final: bool = True
    seed: int | None = None


def _typed(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise BardConfigError(f"{prefix} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BardConfigError(f"unknown key(s) {', '.join(prefix + '.' + k for k in unknown)}; valid: {sorted(known)}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise BardConfigError(f"{prefix}: {exc}") from None


def parse_bard_settings(raw: Any) -> BardSettings:
    """Validate and type the ``bard:`` section."""
    data = dict(raw or {})
    noise = _typed(NoiseConfig, data.pop("noise", None), "bard.noise")
    loss = _typed(LossSettings, data.pop("loss", None), "bard.loss")
    settings = _typed(BardSettings, data, "bard")
    settings.noise, settings.loss = noise, loss
    if settings.loss.reduction not in ("sample_mean", "token_mean"):
        raise BardConfigError(f"bard.loss.reduction={settings.loss.reduction!r}; use 'sample_mean' or 'token_mean'")
    if settings.block_size is not None and settings.block_size < 1:
        raise BardConfigError(f"bard.block_size must be >= 1, got {settings.block_size}")
    if settings.max_length is not None and settings.max_length < 2 * (settings.block_size or 1):
        raise BardConfigError(f"bard.max_length={settings.max_length} is shorter than two blocks")
    if settings.export_dtype not in (None, "bfloat16", "float16", "float32"):
        raise BardConfigError(f"bard.export_dtype={settings.export_dtype!r}; use bfloat16, float16, float32 or null")
    return settings


def to_plain(node: Any) -> Any:
    """ConfigNode / nested containers -> plain Python (dicts, lists, scalars)."""
    if hasattr(node, "to_dict"):
        return node.to_dict()
    if isinstance(node, dict):
        return {k: to_plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [to_plain(v) for v in node]
    return node
