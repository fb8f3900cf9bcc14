"""The ``bard_vl`` model: config and model class on top of transformers' Qwen3-VL (no NeMo).

Importing the model classes registers ``bard_vl`` with transformers' ``AutoConfig``,
``AutoModelForImageTextToText`` and ``AutoProcessor`` (plain ``register`` calls at the end of
:mod:`~nemo_bard.models.configuration_bard_vl` and :mod:`~nemo_bard.models.modeling_bard_vl`)::

    from nemo_bard.models import BardVLForConditionalGeneration  # now the Auto classes know bard_vl

The classes are attributes loaded on first access (PEP 562): ``import nemo_bard.models`` alone costs nothing,
because the Qwen3-VL modeling stack takes ~4-9 s to import on a 2-core CPU (torch + transformers) and the
command-line front ends answer user errors before that. Every nemo-bard entry point that loads a model imports
the classes itself.
"""

from __future__ import annotations

import importlib
from typing import Any

from nemo_bard.models.constants import ARCHITECTURE_ALIASES, BARD_ARCHITECTURE, DEFAULT_MASK_TOKEN_ID, MODEL_TYPE

_CLASSES = ("BardVLConfig", "BardVLTextConfig", "BardVLForConditionalGeneration", "BardVLTextModel")


def __getattr__(name: str) -> Any:
    if name in _CLASSES:  # the modeling module imports the config module: both register
        return getattr(importlib.import_module("nemo_bard.models.modeling_bard_vl"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ARCHITECTURE_ALIASES", "BARD_ARCHITECTURE", "DEFAULT_MASK_TOKEN_ID", "MODEL_TYPE", *_CLASSES]
