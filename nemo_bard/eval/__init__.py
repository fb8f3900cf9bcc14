"""Evaluation of BARD (block diffusion) and AR Qwen3-VL checkpoints on chat datasets with reference answers.

    python -m nemo_bard.eval --model DIR --data DIR [--points 4:4:1.0,16:16:0.9] [--out-dir DIR]

Python API: :func:`evaluate` (one model, several decoding points -> result rows) and
:func:`write_report` (rows of any number of models -> one JSON / markdown table / plot).
:func:`nemo_bard.eval.tune.tune` (``--tune``) picks and stores a model's decoding point against its AR model.
The lmms-eval model plugin lives in :mod:`nemo_bard.eval.lmms`.

The names load on first access (PEP 562): ``python -m nemo_bard.eval`` imports this package before it checks its
arguments, and a bad argument is answered without torch and transformers (~6 s on a 2-core CPU).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    **dict.fromkeys(("DecodePoint", "LoadedModel", "build_inputs", "default_points", "evaluate", "evaluate_point",
                     "evaluate_points", "load_model", "parse_points"), "evaluation"),
    **dict.fromkeys(("EvalSample", "EvalSamples", "load_samples"), "samples"),
    **dict.fromkeys(("aggregate", "char_accuracy", "exact_match", "levenshtein", "position_accuracy", "score"),
                    "metrics"),
    **dict.fromkeys(("markdown_table", "plot", "write_report"), "report"),
    **dict.fromkeys(("TuneError", "TuneResult"), "tune"),  # the function: nemo_bard.eval.tune.tune
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_WHERE)
