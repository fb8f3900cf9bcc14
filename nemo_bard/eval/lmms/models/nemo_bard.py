"""lmms-eval model class ``nemo_bard`` (imports lmms-eval; only the harness imports this module)."""

from __future__ import annotations

from lmms_eval.api.model import lmms

from nemo_bard.eval.lmms.core import BardLmmsModel

try:  # the decorator registry of lmms-eval <= 0.5; harmless where the manifest registry is used
    from lmms_eval.api.registry import register_model
except ImportError:  # pragma: no cover - depends on the installed lmms-eval
    register_model = None


class NemoBard(BardLmmsModel, lmms):
    """BARD block-diffusion (or AR Qwen3-VL) checkpoint; model args in :class:`BardLmmsModel`."""

    is_simple = True


if register_model is not None:
    NemoBard = register_model("nemo_bard")(NemoBard)
