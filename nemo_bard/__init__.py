"""nemo-bard: BARD block-diffusion vision-language models as a NeMo AutoModel plugin.

``import nemo_bard`` imports neither torch nor transformers (the command-line front ends answer user errors
in about a second). ``nemo_bard.BardVLForConditionalGeneration`` / ``nemo_bard.BardVLConfig`` load the model
classes on first access, which registers ``model_type: bard_vl`` with transformers' Auto classes (see
:mod:`nemo_bard.models`). NeMo AutoModel's model registry finds the training class through the
``nemo_automodel.architectures`` entry point.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("BardVLConfig", "BardVLForConditionalGeneration"):
        from nemo_bard import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BardVLConfig", "BardVLForConditionalGeneration", "__version__"]
