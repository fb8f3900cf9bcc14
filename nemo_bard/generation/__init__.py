"""Block-diffusion decoding (one decoding loop on a static-shape engine, remasking strategies) and the AR baseline."""

from nemo_bard.generation.ar import AR_ENGINES, ar_generate
from nemo_bard.generation.cache import StaticKVCache
from nemo_bard.generation.decode import block_diffusion_generate
from nemo_bard.generation.engine import DecodeEngine
from nemo_bard.generation.output import GenerationOutput
from nemo_bard.generation.points import ENGINES, EngineError
from nemo_bard.generation.sampling import REMASKING_STRATEGIES, sample_tokens, select_commits, step_schedule
from nemo_bard.generation.session import ARSession, BlockDiffusionSession, DecodeSession, RowRequest

__all__ = [
    "AR_ENGINES",
    "ENGINES",
    "REMASKING_STRATEGIES",
    "ARSession",
    "BlockDiffusionSession",
    "DecodeEngine",
    "DecodeSession",
    "EngineError",
    "GenerationOutput",
    "RowRequest",
    "StaticKVCache",
    "ar_generate",
    "block_diffusion_generate",
    "sample_tokens",
    "select_commits",
    "step_schedule",
]
