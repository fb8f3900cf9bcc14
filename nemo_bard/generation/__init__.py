"""Block-diffusion decoding (KV cache, remasking strategies) and the autoregressive baseline."""

from nemo_bard.generation.ar import ar_generate
from nemo_bard.generation.cache import BlockKVCache
from nemo_bard.generation.decode import block_diffusion_generate
from nemo_bard.generation.output import GenerationOutput
from nemo_bard.generation.sampling import REMASKING_STRATEGIES, sample_tokens, select_commits, step_schedule

__all__ = [
    "REMASKING_STRATEGIES",
    "BlockKVCache",
    "GenerationOutput",
    "ar_generate",
    "block_diffusion_generate",
    "sample_tokens",
    "select_commits",
    "step_schedule",
]
