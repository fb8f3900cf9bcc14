"""The ``bard_vl`` model: config, model class and registration with transformers and NeMo AutoModel."""

from __future__ import annotations

from nemo_bard.models.configuration_bard_vl import BARD_ARCHITECTURE, DEFAULT_MASK_TOKEN_ID, BardVLConfig
from nemo_bard.models.modeling_bard_vl import BardVLForConditionalGeneration

# Architecture names a bard_vl config.json may carry; all resolve to the same class.
ARCHITECTURE_ALIASES = (BARD_ARCHITECTURE, "BardQwen3VLForConditionalGeneration")
_registered = False


def register() -> None:
    """Register ``bard_vl`` with transformers' Auto classes and NeMo AutoModel's model registry (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, Qwen3VLProcessor

    from nemo_automodel._transformers.registry import register_architecture

    AutoConfig.register("bard_vl", BardVLConfig, exist_ok=True)
    AutoModelForImageTextToText.register(BardVLConfig, BardVLForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(BardVLConfig, Qwen3VLProcessor, exist_ok=True)
    for name in ARCHITECTURE_ALIASES:
        register_architecture(name, BardVLForConditionalGeneration, exist_ok=True)
    _registered = True


__all__ = [
    "ARCHITECTURE_ALIASES",
    "BARD_ARCHITECTURE",
    "DEFAULT_MASK_TOKEN_ID",
    "BardVLConfig",
    "BardVLForConditionalGeneration",
    "register",
]
