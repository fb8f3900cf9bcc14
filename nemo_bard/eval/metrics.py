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

import math
from typing import Iterable

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


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


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default); ``(nan, nan)`` for ``n == 0``."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def mean_and_interval(values: list[float], z: float = Z95) -> tuple[float, float, float]:
    """Mean and its normal-approximation interval, not clipped (sample standard deviation; one value: width 0;
    no values: nan). For paired differences, which lie in [-1, 1]."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = z * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def mean_interval(values: list[float], z: float = Z95) -> tuple[float, float]:
    """Normal-approximation interval of a mean (sample standard deviation), clipped to [0, 1]."""
    n = len(values)
    if n < 2:
        return (float("nan"), float("nan")) if n == 0 else (values[0], values[0])
    _, lo, hi = mean_and_interval(values, z)
    return max(0.0, lo), min(1.0, hi)


def tolerance_problem(tolerance: float, flag: str) -> str | None:
    """Why ``tolerance`` (exact-match points a decoding point may lose against AR, given as ``flag``) is unusable,
    or None when it is a finite number >= 0."""
    if math.isfinite(tolerance) and tolerance >= 0:
        return None
    return f"{flag} must be a number of exact-match points >= 0, got {tolerance}"


def aggregate(scores: Iterable[dict[str, float]]) -> dict[str, float | tuple[float, float]]:
    """Mean of each per-sample metric (``accuracy`` is the mean exact match) and its 95 % interval.

    ``accuracy_ci95`` is the Wilson interval of the exact-match proportion; ``char_accuracy_ci95`` and
    ``position_accuracy_ci95`` are normal intervals of the per-sample means. NaN for no samples.
    """
    scores = list(scores)
    n = len(scores)
    mean = (lambda k: sum(s[k] for s in scores) / n) if n else (lambda k: float("nan"))
    return {
        "accuracy": mean("exact_match"),
        "char_accuracy": mean("char_accuracy"),
        "position_accuracy": mean("position_accuracy"),
        "accuracy_ci95": wilson_interval(sum(s["exact_match"] for s in scores), n),
        "char_accuracy_ci95": mean_interval([s["char_accuracy"] for s in scores]),
        "position_accuracy_ci95": mean_interval([s["position_accuracy"] for s in scores]),
    }
