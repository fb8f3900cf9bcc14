"""Block-diffusion decoding (one decoding loop on a static-shape engine, remasking strategies) and the AR baseline.

The names below load on first access (PEP 562): ``nemo_bard.generation.points`` (decoding points and engine names,
torch-free) is what the command-line front ends check their arguments with, and importing this package must not
cost them torch and transformers (~6 s on a 2-core CPU) before they answer a bad argument.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "AR_ENGINES": "ar", "ar_generate": "ar",
    "StaticKVCache": "cache",
    "block_diffusion_generate": "decode",
    "DecodeEngine": "engine",
    "GenerationOutput": "output",
    "ENGINES": "points", "EngineError": "points",
    "REMASKING_STRATEGIES": "sampling", "sample_tokens": "sampling", "select_commits": "sampling",
    "step_schedule": "sampling",
    "ARSession": "session", "BlockDiffusionSession": "session", "DecodeSession": "session", "RowRequest": "session",
    "SharedPrefill": "session",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_WHERE)
