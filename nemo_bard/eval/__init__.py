"""Evaluation of BARD (block diffusion) and AR Qwen3-VL checkpoints on chat datasets with reference answers.

    python -m nemo_bard.eval --model DIR --data DIR [--points 4:4:1.0,16:16:0.9] [--out-dir DIR]

Python API: :func:`evaluate` (one model, several decoding points -> result rows) and
:func:`write_report` (rows of any number of models -> one JSON / markdown table / plot).
:func:`nemo_bard.eval.tune.tune` (``--tune``) picks and stores a model's decoding point against its AR model.
The lmms-eval model plugin lives in :mod:`nemo_bard.eval.lmms`.
"""

from nemo_bard.eval.evaluate import (
    DecodePoint,
    EvalSample,
    LoadedModel,
    build_inputs,
    default_points,
    evaluate,
    evaluate_point,
    load_model,
    load_samples,
    parse_points,
)
from nemo_bard.eval.metrics import aggregate, char_accuracy, exact_match, levenshtein, position_accuracy, score
from nemo_bard.eval.report import markdown_table, plot, write_report
from nemo_bard.eval.tune import TuneError, TuneResult

__all__ = [
    "DecodePoint",
    "EvalSample",
    "LoadedModel",
    "aggregate",
    "build_inputs",
    "char_accuracy",
    "default_points",
    "evaluate",
    "evaluate_point",
    "exact_match",
    "levenshtein",
    "load_model",
    "load_samples",
    "markdown_table",
    "parse_points",
    "plot",
    "position_accuracy",
    "score",
    "TuneError",
    "TuneResult",
    "write_report",
]
