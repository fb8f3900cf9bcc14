"""Model table for lmms-eval's (deprecated) ``LMMS_EVAL_PLUGINS=nemo_bard.eval.lmms`` mechanism.

lmms-eval resolves ``{plugin}.models.{name}.{class}``, i.e. ``nemo_bard.eval.lmms.models.nemo_bard.NemoBard``.
"""

AVAILABLE_MODELS = {"nemo_bard": "NemoBard"}
