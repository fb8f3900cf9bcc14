"""The ``bard_vl`` model: config and model class on top of transformers' Qwen3-VL (no NeMo).

The classes load lazily (``from nemo_bard.models import BardVLForConditionalGeneration`` imports the
Qwen3-VL modeling stack then, not before); :func:`register` makes transformers' Auto classes know
``bard_vl`` (see :mod:`nemo_bard.models.registration`).
"""

from __future__ import annotations

import importlib
from typing import Any

from nemo_bard.models.registration import (
    ARCHITECTURE_ALIASES,
    BARD_ARCHITECTURE,
    DEFAULT_MASK_TOKEN_ID,
    MODEL_TYPE,
    register,
)

_LAZY = {
    "BardVLConfig": "nemo_bard.models.configuration_bard_vl",
    "BardVLTextConfig": "nemo_bard.models.configuration_bard_vl",
    "BardVLForConditionalGeneration": "nemo_bard.models.modeling_bard_vl",
    "BardVLTextModel": "nemo_bard.models.modeling_bard_vl",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ARCHITECTURE_ALIASES",
    "BARD_ARCHITECTURE",
    "DEFAULT_MASK_TOKEN_ID",
    "MODEL_TYPE",
    "BardVLConfig",
    "BardVLForConditionalGeneration",
    "BardVLTextConfig",
    "BardVLTextModel",
    "register",
]
