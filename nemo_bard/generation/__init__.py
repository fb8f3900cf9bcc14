"""Block-diffusion decoding (static-shape engine, eager reference, remasking strategies) and the AR baseline."""

from nemo_bard.generation.ar import AR_ENGINES, ar_generate
from nemo_bard.generation.cache import BlockKVCache, StaticKVCache
from nemo_bard.generation.decode import block_diffusion_generate, run_session
from nemo_bard.generation.engine import DecodeEngine, DecodeSession
from nemo_bard.generation.points import ENGINES, EngineError
from nemo_bard.generation.output import GenerationOutput
from nemo_bard.generation.sampling import REMASKING_STRATEGIES, sample_tokens, select_commits, step_schedule

__all__ = [
    "AR_ENGINES",
    "ENGINES",
    "REMASKING_STRATEGIES",
    "BlockKVCache",
    "DecodeEngine",
    "DecodeSession",
    "EngineError",
    "GenerationOutput",
    "StaticKVCache",
    "ar_generate",
    "block_diffusion_generate",
    "run_session",
    "sample_tokens",
    "select_commits",
    "step_schedule",
]
