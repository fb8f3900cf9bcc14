"""Names and defaults of the ``bard_vl`` model type (standard library only: front ends read them before torch)."""

MODEL_TYPE = "bard_vl"
DEFAULT_MASK_TOKEN_ID = 151671
# the mask token's text (Qwen3 tokenizers have no such token; convert adds it at DEFAULT_MASK_TOKEN_ID)
MASK_TOKEN = "<|mask|>"
DEFAULT_BLOCK_SIZE = 32
BARD_ARCHITECTURE = "BardVLForConditionalGeneration"
# Architecture names a bard_vl config.json may carry; all resolve to the same class.
ARCHITECTURE_ALIASES = (BARD_ARCHITECTURE, "BardQwen3VLForConditionalGeneration")

__all__ = ["ARCHITECTURE_ALIASES", "BARD_ARCHITECTURE", "DEFAULT_BLOCK_SIZE", "DEFAULT_MASK_TOKEN_ID", "MASK_TOKEN",
           "MODEL_TYPE"]
