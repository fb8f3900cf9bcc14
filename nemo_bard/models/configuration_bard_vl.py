"""Configuration of the block-diffusion Qwen3-VL (``model_type: bard_vl``)."""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig, Qwen3VLConfig
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig, Qwen3VLVisionConfig

from nemo_bard.models.constants import BARD_ARCHITECTURE, DEFAULT_BLOCK_SIZE, DEFAULT_MASK_TOKEN_ID, MODEL_TYPE


@strict
class BardVLTextConfig(Qwen3VLTextConfig):
    """The Qwen3-VL text config under its own class, so the bard_vl text decoder is built from it.

    Same fields and ``model_type`` (``qwen3_vl_text``) as Qwen3-VL: a saved ``config.json`` does not change.
    """


@strict
class BardVLConfig(Qwen3VLConfig):
    """A Qwen3-VL config plus the two BARD fields.

    Args (beyond :class:`~transformers.Qwen3VLConfig`):
        mask_token_id: id of the mask token written into noisy positions (151671 for the Qwen3 vocabulary).
        block_size: block size the checkpoint was trained with (decoding default).
    """

    model_type = MODEL_TYPE
    sub_configs = {"vision_config": Qwen3VLVisionConfig, "text_config": BardVLTextConfig}

    mask_token_id: int = DEFAULT_MASK_TOKEN_ID
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self, **kwargs: Any) -> None:
        if isinstance(self.text_config, PreTrainedConfig) and not isinstance(self.text_config, BardVLTextConfig):
            self.text_config = self.text_config.to_dict()  # a plain Qwen3-VL text config: rebuild it as ours
        super().__post_init__(**kwargs)
        if self.block_size < 1:
            raise ValueError(f"bard_vl config: block_size must be >= 1, got {self.block_size}")
        vocab = self.text_config.vocab_size
        if not 0 <= self.mask_token_id < vocab:
            raise ValueError(
                f"bard_vl config: mask_token_id={self.mask_token_id} is outside the embedding (vocab_size={vocab})"
            )

    @classmethod
    def from_qwen3_vl(cls, config: Qwen3VLConfig | dict, **overrides: Any) -> "BardVLConfig":
        """Build a ``bard_vl`` config from a Qwen3-VL config (object or dict) with the same architecture."""
        data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        for key in ("model_type", "architectures", "transformers_version", "auto_map"):
            data.pop(key, None)
        data.update(overrides)
        out = cls(**data)
        out.architectures = [BARD_ARCHITECTURE]
        return out


AutoConfig.register(MODEL_TYPE, BardVLConfig, exist_ok=True)

__all__ = ["BARD_ARCHITECTURE", "DEFAULT_MASK_TOKEN_ID", "BardVLConfig", "BardVLTextConfig"]
