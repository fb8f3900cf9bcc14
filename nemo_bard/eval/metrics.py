"""Answer metrics for evaluation against reference strings.

Both strings are compared after :func:`normalize` (surrounding whitespace stripped, inner
whitespace runs collapsed to one space); nothing else is changed (case and punctuation count).

* **exact match**: 1.0 when the normalized prediction equals the normalized reference, else 0.0.
* **char accuracy**: ``1 - levenshtein(pred, ref) / max(len(pred), len(ref))`` over characters,
  i.e. one minus the normalized edit distance; 1.0 for two empty strings. It lies in [0, 1],
  penalises substitutions, insertions and deletions alike, and does not collapse to 0 when the
  prediction is shifted by one character (unlike position-wise comparison).
* **position accuracy**: the fraction of positions ``i < max(len(pred), len(ref))`` where
  ``pred[i] == ref[i]`` (missing or extra characters count as wrong). For fixed-length answers
  (e.g. digit strings of the right length) this is the per-digit accuracy.
"""

from __future__ import annotations

from typing import Iterable


def normalize(text: str) -> str:
    """Strip and collapse whitespace."""
    return " ".join(str(text).split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized strings are equal, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def char_accuracy(prediction: str, reference: str) -> float:
    """``1 - levenshtein / max(len)`` of the normalized strings (1.0 when both are empty)."""
    p, r = normalize(prediction), normalize(reference)
    longest = max(len(p), len(r))
    return 1.0 if longest == 0 else 1.0 - levenshtein(p, r) / longest


def position_accuracy(prediction: str, reference: str) -> float:
    """Fraction of aligned positions with equal characters, over ``max(len)`` (1.0 when both are empty)."""
    p, r = normalize(prediction), normalize(reference)
    longest = max(len(p), len(r))
    return 1.0 if longest == 0 else sum(a == b for a, b in zip(p, r)) / longest


def score(prediction: str, reference: str) -> dict[str, float]:
    """All per-sample metrics of one prediction."""
    return {
        "exact_match": exact_match(prediction, reference),
        "char_accuracy": char_accuracy(prediction, reference),
        "position_accuracy": position_accuracy(prediction, reference),
    }


def aggregate(scores: Iterable[dict[str, float]]) -> dict[str, float]:
    """Mean of each per-sample metric (``accuracy`` is the mean exact match); NaN for no samples."""
    scores = list(scores)
    n = len(scores)
    mean = (lambda k: sum(s[k] for s in scores) / n) if n else (lambda k: float("nan"))
    return {
        "accuracy": mean("exact_match"),
        "char_accuracy": mean("char_accuracy"),
        "position_accuracy": mean("position_accuracy"),
    }
