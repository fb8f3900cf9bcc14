"""nemo-bard: BARD block-diffusion vision-language models as a NeMo AutoModel plugin.

Importing this package registers ``model_type: bard_vl`` with transformers' ``AutoConfig`` /
``AutoModelForImageTextToText`` / ``AutoProcessor`` lazily: nothing heavy is imported here, and each
registry learns ``bard_vl`` when transformers loads it (see :mod:`nemo_bard.models.registration`).
NeMo AutoModel's model registry finds the training class through the ``nemo_automodel.architectures``
entry point. ``BardVLConfig`` and ``BardVLForConditionalGeneration`` load on first access.
"""

from __future__ import annotations

from typing import Any

from nemo_bard.models.registration import register

__version__ = "0.1.0"

register()


def __getattr__(name: str) -> Any:
    if name in ("BardVLConfig", "BardVLForConditionalGeneration"):
        from nemo_bard import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BardVLConfig", "BardVLForConditionalGeneration", "__version__", "register"]
