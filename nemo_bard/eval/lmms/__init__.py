"""lmms-eval model plugin: evaluate a ``bard_vl`` checkpoint with lmms-eval at any decoding setting.

    pip install lmms-eval          # optional; not a nemo-bard dependency
    lmms-eval --model nemo_bard \\
        --model_args pretrained=DIR,block_size=32,denoising_steps=32,confidence_threshold=0.9,max_new_tokens=256 \\
        --tasks mmstar --batch_size 1

Registration: the ``lmms_eval.models`` entry point ``nemo_bard = nemo_bard.eval.lmms:lmms_eval_manifest``
(lmms-eval >= 0.6 reads this group), or, without installing entry points, the deprecated
``LMMS_EVAL_PLUGINS=nemo_bard.eval.lmms`` (lmms-eval then imports ``nemo_bard.eval.lmms.models`` and its
``AVAILABLE_MODELS``). The harness class is ``nemo_bard.eval.lmms.models.nemo_bard.NemoBard``; its logic
is :class:`nemo_bard.eval.lmms.core.BardLmmsModel`, usable without lmms-eval installed.
"""

from __future__ import annotations

MODEL_ID = "nemo_bard"
CLASS_PATH = "nemo_bard.eval.lmms.models.nemo_bard.NemoBard"


def lmms_eval_manifest():
    """Entry point payload for lmms-eval's ``lmms_eval.models`` group (a ``ModelManifest``)."""
    # optional dependency (the [lmms-eval] extra), read only by lmms-eval itself
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH, aliases=("bard_vl",))


def __getattr__(name: str):
    # Lazy: `from nemo_bard.eval.lmms import BardLmmsModel` without importing torch/transformers at package import.
    if name == "BardLmmsModel":
        from nemo_bard.eval.lmms.core import BardLmmsModel

        return BardLmmsModel
    raise AttributeError(name)


__all__ = ["CLASS_PATH", "MODEL_ID", "BardLmmsModel", "lmms_eval_manifest"]
