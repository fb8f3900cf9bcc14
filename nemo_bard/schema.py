"""The config-section models the runtime objects are built from (pydantic; no torch).

:class:`Section` is the base of every section model (unknown keys are errors, assignments are validated). The
noise prior (``bard.noise``) and the loss (``bard.loss``) are defined here because the data and loss modules
take them as they are; the rest of the schema is in :mod:`nemo_bard.recipes.config`. A value is checked once,
by its model: the runtime objects built from a section do not check it again.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NoiseType = Literal["stratified_blocks", "uniform_sample"]
Reduction = Literal["sample_mean", "token_mean"]


class Section(BaseModel):
    """A config section: extra keys are refused, assignments re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NoiseSettings(Section):
    """``bard.noise``, the noise prior.

    ``stratified_blocks`` (PBM, §5): u_i ~ U(0,1) clamped to [min_rate, max_rate], t_i = (u_i + i) / N over
    the sample's N response blocks, shuffled across blocks; each token of block i is masked with prob. t_i.
    ``uniform_sample`` (SWD, §8): one rate t ~ U(min_rate, max_rate) per sample; at least one token masked.
    """

    type: NoiseType = "stratified_blocks"
    min_rate: float = Field(0.001, ge=0.0, le=1.0)
    max_rate: float = Field(1.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> "NoiseSettings":
        if self.min_rate > self.max_rate:
            raise ValueError(f"min_rate={self.min_rate} exceeds max_rate={self.max_rate}")
        return self


class LossSettings(Section):
    """``bard.loss``: ``sample_mean`` (per-sample mean, summed, over the global sample count of the optimizer
    step) or ``token_mean``; ``min_t`` clamps t inside the 1/t weight; response padding is weighted by
    ``pad_weight``; ``fp32_upcast`` computes the cross-entropy in fp32."""

    reduction: Reduction = "sample_mean"
    min_t: float | None = Field(None, gt=0.0, le=1.0)
    pad_weight: float = Field(0.5, ge=0.0)
    fp32_upcast: bool = True


__all__ = ["LossSettings", "NoiseSettings", "NoiseType", "Reduction", "Section"]
