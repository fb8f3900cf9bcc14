"""Doc hooks of the lmms-eval chat task written by :mod:`nemo_bard.eval.lmms.task`.

The task directory's ``utils.py`` re-exports these (lmms-eval's ``!function utils.<name>`` resolves
next to the task YAML), so the logic lives here, in the package, and is tested like any module.
"""

from __future__ import annotations

from typing import Any

from nemo_bard.data.media import load_image
from nemo_bard.eval.metrics import char_accuracy, exact_match


def doc_to_visual(doc: dict) -> list[Any]:
    """Images as PIL images, then videos as paths (files or frame directories)."""
    return [load_image(path) for path in doc["images"]] + list(doc.get("videos", []))


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question, with the task's optional pre/post prompt."""
    kw = lmms_eval_specific_kwargs or {}
    return kw.get("pre_prompt", "") + doc["question"] + kw.get("post_prompt", "")


def doc_to_target(doc: dict) -> str:
    return doc["answer"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match and char accuracy, as :mod:`nemo_bard.eval.metrics` scores them."""
    pred = results[0] if results else ""
    return {"exact_match": exact_match(pred, doc["answer"]), "char_accuracy": char_accuracy(pred, doc["answer"])}
