"""nemo-bard: BARD block-diffusion vision-language models as a NeMo AutoModel plugin.

Importing this package registers ``model_type: bard_vl`` with transformers'
``AutoConfig`` / ``AutoModelForImageTextToText`` / ``AutoProcessor`` and with
NeMo AutoModel's model registry, so both ``from_pretrained`` routes load a
``bard_vl`` directory.
"""

from nemo_bard.models import BardVLConfig, BardVLForConditionalGeneration, register

__version__ = "0.1.0"

register()

__all__ = ["BardVLConfig", "BardVLForConditionalGeneration", "__version__"]
