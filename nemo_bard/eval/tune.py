"""Pick a model's decoding point on a dev split, measured against its AR model, and store it in the model directory.

    python -m nemo_bard.eval --tune --model DIR --data DEV --ar-model AR [--tolerance 1.0]
        [--objective decode_tokens_per_second|tokens_per_forward] [--points GRID] [--dry-run]

:func:`tune` evaluates the AR model on every dev row, then a grid of decoding points of the ``bard_vl`` model at
its own block size (:func:`default_grid`: static at S = B, B/2, B/4; dynamic at S = B and tau 0.95 ... 0.5)
and keeps the fastest point (by ``objective``) whose exact match is at least AR's minus ``tolerance`` percentage
points (:func:`choose`). Decode speed is ranked by each point's forwards times the decode time per forward pooled
over all points (:func:`pool_decode_speed`: same shapes, same cost per forward), which a busy machine disturbs far
less than each point's own timing; ties go to the more accurate, then the more careful point.

Compute is saved by successive halving: every point first decodes the first slice of the rows; a point whose
paired interval of (exact match - AR's) on that slice lies wholly below ``-tolerance`` is dropped (95 % jointly
over the grid, :func:`drop_z`); the others decode the remaining rows fastest first, and the first one that stays
within the tolerance on all rows ends the search (slower points are not needed). Speeds are timed on the first
slice at ``batch_size``; the remaining rows (AR's too) count for exact match only and run at ``rest_batch_size``
(a row's greedy answer does not depend on its batch), which on a small batch size is several times cheaper.
Prompts are built by the processor once and reused by every point, and on the first slice the points of a group
decode each batch from one prompt prefill (:func:`~nemo_bard.eval.evaluation.evaluate_points`). The chosen point
is written to ``DIR/generation_config.json`` (:func:`nemo_bard.generation.defaults.write_decoding_point`; the
previous file is kept as ``generation_config.json.bak``) and the evidence to ``DIR/decoding_point.json``;
``generate``, ``eval``, the lmms-eval model and ``serve`` then use it as their default. With ``dry_run`` nothing is written.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable, Sequence

from transformers import AutoTokenizer

from nemo_bard.data.datasets import DataError
from nemo_bard.data.media import VideoSampling
from nemo_bard.errors import UserError
from nemo_bard.eval.evaluation import (
    build_inputs, evaluate_point, evaluate_points, generate_batch, load_model, load_samples,
)
from nemo_bard.eval.metrics import Z95, aggregate, mean_and_interval, tolerance_problem
from nemo_bard.generation.defaults import EVIDENCE_FILE, GENERATION_CONFIG, check_writable, write_decoding_point
from nemo_bard.generation.points import DecodePoint, parse_points
from nemo_bard.models.paths import read_model_config, tokenizer_vocab

OBJECTIVES = ("decode_tokens_per_second", "tokens_per_forward")
DEFAULT_THRESHOLDS = (0.95, 0.9, 0.8, 0.7, 0.5)
MIN_FIRST_SLICE = 64


class TuneError(UserError):
    """Bad tuning input, or no point within the tolerance; one line naming the file, flag or field and the fix."""


@dataclass
class TuneResult:
    """What :func:`tune` found.

    ``point``: the chosen decoding point (None when no point met the tolerance); ``ar``: the AR row;
    ``candidates``: one row per grid point with ``status`` (chosen, within tolerance, below tolerance, dropped
    after the first slice, not needed) and ``delta`` / ``delta_ci95`` (exact match minus AR's on the same rows,
    paired 95 % interval); ``written``: paths written (empty on a dry run or without a point); ``evidence``: the
    sidecar's content; ``wall_time``: seconds for the whole search, model loading included.
    """

    point: DecodePoint | None
    ar: dict
    candidates: list[dict]
    chosen: dict | None
    tolerance: float
    objective: str
    message: str
    evidence: dict
    wall_time: float
    written: dict[str, Path] = field(default_factory=dict)

    def table(self) -> str:
        return tune_table(self.ar, self.candidates, self.objective)


# ------------------------------------------------------------------------------------------ pure parts


def default_grid(block_size: int, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> list[DecodePoint]:
    """Static at S = B, B/2, B/4 (B/S tokens per forward) and dynamic at S = B with each tau (pass ``points`` for
    dynamic points at fewer steps: on the demo model S = B/2 matched S = B within 0.1 points of exact match and
    4 % tokens per forward)."""
    b = int(block_size)
    steps = list(dict.fromkeys(s for s in (b, b // 2, b // 4) if s >= 1))
    return [DecodePoint(b, s, 1.0, "static") for s in steps] + [DecodePoint(b, b, float(t), "dynamic")
                                                                 for t in thresholds]


def drop_z(points: int, level: float = 0.95) -> float:
    """Normal quantile of a two-sided ``level`` interval held jointly by ``points`` intervals (Bonferroni), so
    that among many points on a small first slice one unlucky slice rarely drops a good point."""
    return NormalDist().inv_cdf(1 - (1 - level) / (2 * max(1, points)))


def paired_difference(row: dict, ar: dict, n: int | None = None, z: float = Z95) -> tuple[float, tuple[float, float]]:
    """Mean of (exact match - AR's exact match) over the first ``n`` rows both decoded, and its normal interval
    (95 % by default; paired: the two decoders answer the same prompts)."""
    a = [p["exact_match"] for p in row["predictions"]]
    b = [p["exact_match"] for p in ar["predictions"]]
    n = min(len(a), len(b)) if n is None else n
    mean, lo, hi = mean_and_interval([x - y for x, y in zip(a[:n], b[:n])], z)
    return mean, (lo, hi)


def within_tolerance(row: dict, ar: dict, tolerance: float) -> bool:
    """Exact match at least AR's minus ``tolerance`` percentage points (both on all rows)."""
    return row["accuracy"] >= ar["accuracy"] - tolerance / 100.0 - 1e-12


def speed(row: dict, objective: str) -> float:
    """The value ``objective`` ranks a row by: ``pooled_decode_tokens_per_second`` when the row has one (see
    :func:`pool_decode_speed`), else the row's own ``objective``; -inf when missing."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    value = row.get("pooled_" + objective, row.get(objective))
    return -math.inf if value is None or math.isnan(value) else float(value)


def _careful(row: dict) -> tuple[float, float]:
    return (row.get("threshold") or 1.0, row.get("denoising_steps") or 0)


def choose(rows: Sequence[dict], ar: dict, tolerance: float, objective: str = OBJECTIVES[0]) -> dict | None:
    """The row with the highest :func:`speed` among those evaluated on all of AR's rows and within ``tolerance``
    points of AR's exact match; ties go to the more accurate, then the more careful (higher tau, more steps)
    point. None when no row qualifies."""
    ok = [r for r in rows if r.get("n") == ar["n"] and speed(r, objective) > -math.inf
          and within_tolerance(r, ar, tolerance)]
    return max(ok, key=lambda r: (speed(r, objective), r["accuracy"], *_careful(r)), default=None)


def speed_bound(point: DecodePoint) -> float:
    """The most tokens per forward ``point`` can reach: B/S for the static strategy (exactly B/S per step), no
    bound (inf) for the dynamic one. Points whose bound cannot beat a point already within the tolerance are
    not run."""
    if point.remasking_strategy == "low_confidence_static":
        return point.block_size / (point.denoising_steps or point.block_size)
    return math.inf


def _bound_value(row: dict, objective: str) -> float:
    """A row's speed in the units the search bounds: tokens per batched forward (what the pooled decode rate ranks
    by; a static point makes at most B/S times the batch size) or tokens per forward per sequence (at most B/S)."""
    return row["tokens_per_forward"] if objective == "tokens_per_forward" else row["tokens_per_batch_forward"]


def pool_decode_speed(rows: Sequence[dict]) -> float | None:
    """Give every row ``pooled_decode_tokens_per_second`` = its response tokens / (its batched forwards x the decode
    seconds per batched forward pooled over ``rows``); returns that pooled time.

    All points of one model at one block size and batch size run forwards of the same shape, so one forward costs
    the same whatever tau or S decided to commit; pooling the timing of every point makes the ranking far steadier
    than each point's own few seconds of timing on a busy machine (which is still reported)."""
    timed = [r for r in rows if r.get("prefill_time") is not None and r.get("num_forwards")]
    forwards = sum(r["num_forwards"] for r in timed)
    if not forwards:
        return None
    per_forward = sum(r["wall_time"] - r["prefill_time"] for r in timed) / forwards
    for r in rows:
        if r.get("num_forwards") and per_forward > 0:
            r["pooled_decode_tokens_per_second"] = r["response_tokens"] / (r["num_forwards"] * per_forward)
    return per_forward


def merge_rows(first: dict, rest: dict) -> dict:
    """One row for a point decoded on two consecutive slices of the samples: exact match (and the predictions)
    over both slices; speeds, tokens per forward and times from the first, the timed slice (the rest may run at
    another batch size, see :func:`tune`), which ``speed_rows`` counts."""
    out = dict(first)
    out["n"] = first["n"] + rest["n"]
    out["speed_rows"] = first.get("speed_rows", first["n"])
    out["predictions"] = first["predictions"] + rest["predictions"]
    out.update(aggregate(out["predictions"]))
    return out


def points_text(x: float) -> str:
    """``1 point``, ``0.5 points``, ``3 points``."""
    return f"{x:g} point" + ("" if x == 1 else "s")


def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _speed(x: float | None, digits: int = 0) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def tune_table(ar: dict, candidates: Sequence[dict], objective: str = OBJECTIVES[0]) -> str:
    """Markdown table: AR, then every point with its rows, exact match [95 % interval], the paired difference to
    AR [95 % interval] in points, tokens per forward, decode tokens/s (its own timing, and pooled: the value the
    search ranks by), pooled ×AR and status."""
    lines = ["| point | rows | exact match % [95 % CI] | Δ vs AR, points [95 % CI] | TPF | decode tokens/s | "
             "pooled decode tokens/s | ×AR | status |", "|---|---:|---|---|---:|---:|---:|---:|---|"]
    ref = ar.get("decode_tokens_per_second")

    def line(label: str, r: dict, delta: str, status: str) -> str:
        ci = r["accuracy_ci95"]
        pooled = r.get("pooled_decode_tokens_per_second", r.get("decode_tokens_per_second"))
        rel = "–" if not ref or pooled is None else f"{pooled / ref:.2f}×"
        return (f"| {label} | {r['n']} | {_pct(r['accuracy'])} [{_pct(ci[0])}, {_pct(ci[1])}] | {delta} | "
                f"{r['tokens_per_forward']:.2f} | {_speed(r.get('decode_tokens_per_second'))} | "
                f"{_speed(r.get('pooled_decode_tokens_per_second'))} | {rel} | {status} |")

    lines.append(line("AR", ar, "–", "reference"))
    for r in candidates:
        if "n" not in r:
            lines.append(f"| {r['point']} | 0 | – | – | – | – | – | – | {r['status']} |")
            continue
        d, (lo, hi) = r["delta"], r["delta_ci95"]
        delta = f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]" if not math.isnan(d) else "–"
        lines.append(line(r["point"], r, delta, r["status"]))
    return "\n".join(lines) + "\n"


def _summary(row: dict) -> dict:
    keys = ("n", "accuracy", "accuracy_ci95", "char_accuracy", "tokens_per_forward", "tokens_per_second",
            "decode_tokens_per_second", "pooled_decode_tokens_per_second", "num_forwards", "wall_time",
            "prefill_time", "response_tokens")
    out = {k: row.get(k) for k in keys}
    for k in ("point", "status", "delta", "delta_ci95", "block_size", "denoising_steps", "threshold",
              "remasking_strategy"):
        if k in row:
            out[k] = row[k]
    return out


# ---------------------------------------------------------------------------------------------- checks


def check_same_tokenizer(model_dir: str | Path, ar_dir: str | Path) -> None:
    """Raise :class:`TuneError` unless every token of the AR model's tokenizer has the same id in the BARD
    model's (which may add tokens, e.g. its mask token); compares ``tokenizer.json``, else the loaded tokenizers."""
    model_dir, ar_dir = Path(model_dir), Path(ar_dir)
    ours, theirs = tokenizer_vocab(model_dir), tokenizer_vocab(ar_dir)
    if ours is None or theirs is None:
        ours = AutoTokenizer.from_pretrained(model_dir).get_vocab()
        theirs = AutoTokenizer.from_pretrained(ar_dir).get_vocab()
    for tok, i in sorted(theirs.items(), key=lambda kv: kv[1]):
        if ours.get(tok) != i:
            here = "is missing" if tok not in ours else f"is id {ours[tok]}"
            raise TuneError(
                f"--ar-model {ar_dir}: its tokenizer differs from --model {model_dir}'s (token {tok!r} is id {i} in "
                f"{ar_dir / 'tokenizer.json'} but {here} in {model_dir / 'tokenizer.json'}); pass the AR model the "
                "BARD model was converted from")


def _check_model(path: str | Path, flag: str, want_bard: bool) -> dict:
    cfg = read_model_config(path, flag, "pass a local model directory")
    if cfg is None:
        raise TuneError(f"{flag} {path}: no such directory; pass a local model directory")
    if want_bard and cfg.get("model_type") != "bard_vl":
        raise TuneError(f"{flag} {path}: {Path(path) / 'config.json'} model_type is {cfg.get('model_type')!r}, not "
                        "'bard_vl'; --tune picks a block-diffusion decoding point: pass the bard_vl model as --model "
                        "and its AR model as --ar-model")
    return cfg


def check_inputs(model_dir: str | Path, ar_model_dir: str | Path, tolerance: float, objective: str,
                 dry_run: bool) -> dict:
    """Everything that can be checked before a model loads; returns the BARD model's config.json."""
    if objective not in OBJECTIVES:
        raise TuneError(f"--objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    problem = tolerance_problem(tolerance, "--tolerance")
    if problem:
        raise TuneError(problem)
    cfg = _check_model(model_dir, "--model", True)
    _check_model(ar_model_dir, "--ar-model", False)
    check_same_tokenizer(model_dir, ar_model_dir)
    if not dry_run:
        check_writable(model_dir)
    return cfg


def _load_dev(data: Any, root_dir: Any, split: str | None, limit: int | None) -> tuple[list, str]:
    fix = ("tuning compares answers with references: give every dev row an 'answer' column or a final assistant "
           "turn with text")
    if isinstance(data, list):
        samples, label = data, "samples"
    else:
        label = str(data)
        try:
            samples = load_samples(data, root_dir, None, split)
        except DataError as exc:
            if "without an assistant" not in str(exc):
                raise
            raise TuneError(f"--data {label}: no reference answers to score against ({exc}); {fix}") from None
    skipped = len(getattr(samples, "skipped_empty", []))
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        why = (f"all {skipped} rows have an empty reference" if skipped else "it has no rows")
        raise TuneError(f"--data {label}: no reference answers to score against ({why}); {fix}")
    return samples, label


# ------------------------------------------------------------------------------------------------ tune


def _log(msg: str) -> None:
    print(f"tune: {msg}", flush=True)


def tune(
    model_dir: str | Path,
    samples: str | Path | list,
    ar_model_dir: str | Path,
    *,
    tolerance: float = 1.0,
    objective: str = OBJECTIVES[0],
    points: str | Sequence[str | DecodePoint] | None = None,
    dry_run: bool = False,
    first_slice: int | None = None,
    root_dir: str | Path | None = None,
    split: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    rest_batch_size: int | None = None,
    max_new_tokens: int = 64,
    device: str | None = None,
    dtype: Any = None,
    engine: str = "static",
    progress: bool = True,
    log: Callable[[str], None] | None = _log,
    data_name: str | None = None,
) -> TuneResult:
    """Choose and store ``model_dir``'s decoding point (see the module docstring).

    Args:
        model_dir: the ``bard_vl`` model directory (written unless ``dry_run``).
        samples: dev rows with reference answers: a dataset path (save_to_disk dir, .jsonl) or loaded
            :class:`~nemo_bard.eval.evaluation.EvalSample` s. Use a split that is not the one you report on.
        ar_model_dir: the AR model it is measured against (same tokenizer).
        tolerance: percentage points of exact match the point may lose against AR.
        objective: ``decode_tokens_per_second`` (default; decode excludes the prompt prefill both pay) or
            ``tokens_per_forward`` (machine-independent).
        points: the grid (``"B:S:tau[:strategy]"`` specs); default :func:`default_grid` at the model's block size.
        first_slice: rows of the first rung (default: a quarter of the rows, at least 64); all rows when it
            covers them.
        batch_size, max_new_tokens, device, dtype, engine: as in :func:`nemo_bard.eval.evaluation`; speeds are
            those of ``batch_size`` (default 8, as ``python -m nemo_bard.eval``; 1: per-request latency), timed
            on the first slice.
        rest_batch_size: batch size of the rows after the first slice, which count for exact match only
            (default: ``max(batch_size, 8)``; a row's greedy answer does not depend on its batch).
        log: receives the progress lines (None: silent).
        data_name: how the evidence names loaded ``samples`` (default: the path, or "samples").

    Returns a :class:`TuneResult`; when no point is within ``tolerance`` its ``point`` is None, its ``message``
    says so and nothing is written. Raises :class:`TuneError` on bad input, before any model loads.
    """
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    cfg = check_inputs(model_dir, ar_model_dir, tolerance, objective, dry_run)
    dev, label = _load_dev(samples, root_dir, split, limit)
    label = data_name or label
    if Path(label).name.lower() in ("test", "test.jsonl"):
        say(f"warning: {label} looks like a test split; tune on a dev split and report on the test split")
    block = int(cfg.get("block_size") or 0)
    grid = parse_points(points) or default_grid(block)
    wrong = [p.label for p in grid if p.is_ar or p.block_size != block]
    if wrong:
        raise TuneError(f"--points {', '.join(wrong)}: --tune searches at the model's block size {block} "
                        f"({Path(model_dir) / 'config.json'}); give BLOCK = {block}")
    grid = list(dict.fromkeys(DecodePoint(p.block_size, p.denoising_steps, 1.0 if p.threshold is None else p.threshold,
                                          p.remasking_strategy.removeprefix("low_confidence_")) for p in grid))
    n = len(dev)
    n1 = min(n, max(MIN_FIRST_SLICE, n // 4) if first_slice is None else max(1, int(first_slice)))
    rest_batch = max(batch_size, 8) if rest_batch_size is None else rest_batch_size
    if rest_batch < 1:
        raise TuneError(f"--rest-batch-size must be at least 1, got {rest_batch}")
    say(f"{n} dev rows from {label}; AR reference, then {len(grid)} points at B{block}"
        + (f" on the first {n1} rows (timed, batch {batch_size}), the rest on the other {n - n1} (exact match "
           f"only, batch {rest_batch})" if n1 < n else ""))

    def run_point(loaded, rows, point, cache, sampling, rest=False):
        return evaluate_point(loaded, rows, point, progress=progress, sampling=sampling, inputs_cache=cache,
                              batch_size=rest_batch if rest else batch_size, max_new_tokens=max_new_tokens)

    def run_all(loaded, point, cache, sampling):  # timed on the first slice, the rest for exact match only
        first = run_point(loaded, dev[:n1], point, cache, sampling)
        return first if n1 == n else merge_rows(first, run_point(loaded, dev[n1:], point, cache, sampling, True))

    def warm(loaded, sampling, point):
        first = dev[:batch_size]
        inputs = build_inputs(loaded.processor, [s.prompt for s in first], sampling, [s.where for s in first])
        generate_batch(loaded, inputs, point, min(max_new_tokens, point.block_size or 4))

    # AR on every row: the reference of the rule and of the pruning
    loaded = load_model(ar_model_dir, force_ar=True, device=device, dtype=dtype, name="AR",
                        engine="static" if engine == "hf" else engine)
    sampling = VideoSampling.from_processor(getattr(loaded.processor, "video_processor", None))
    warm(loaded, sampling, DecodePoint())
    ar = run_all(loaded, DecodePoint(), None, sampling)
    say(f"AR: exact match {_pct(ar['accuracy'])} % on {n} rows, decode {_speed(ar['decode_tokens_per_second'])} "
        f"tokens/s" + (f" (timed on the first {n1} rows)" if n1 < n else ""))
    device_name, dtype_name = ar["device"], ar["dtype"]
    del loaded
    gc.collect()

    loaded = load_model(model_dir, device=device, dtype=dtype, name=Path(model_dir).name, engine=engine)
    sampling = VideoSampling.from_processor(getattr(loaded.processor, "video_processor", None))
    cache: dict = {}
    warm(loaded, sampling, grid[0])
    rows: dict[DecodePoint, dict] = {}
    z_drop = drop_z(len(grid))
    best: float | None = None  # the value (in bound units) of the fastest point within the tolerance so far
    def bound_of(p: DecodePoint) -> float:  # in _bound_value's units
        return speed_bound(p) * (1 if objective == "tokens_per_forward" else batch_size)

    pending = sorted(grid, key=lambda p: -bound_of(p))
    done = 0
    while pending:
        bound = bound_of(pending[0])
        group = [p for p in pending if bound_of(p) == bound]
        pending = pending[len(group):]
        if best is not None and bound <= best:
            for p in [*group, *pending]:
                rows[p] = {"point": p.label, "status": f"not run (at most {speed_bound(p):g} tokens per forward and "
                                                      "sequence: slower than the chosen point)"}
            break
        first = evaluate_points(loaded, dev[:n1], group, progress=progress, sampling=sampling, inputs_cache=cache,
                                batch_size=batch_size, max_new_tokens=max_new_tokens)  # first rung, one prefill
        for point, r in zip(group, first):
            done += 1
            r["point"] = point.label
            r["delta"], r["delta_ci95"] = paired_difference(r, ar, n1)
            rows[point] = r
            say(f"[{done}/{len(grid)}] {point.label}: exact match {_pct(r['accuracy'])} % ({100 * r['delta']:+.1f} vs "
                f"AR) on {n1} rows, TPF {r['tokens_per_forward']:.2f}, decode "
                f"{_speed(r['decode_tokens_per_second'])} tokens/s")
        survivors = []
        for point in group:
            if n1 < n and paired_difference(rows[point], ar, n1, z_drop)[1][1] < -tolerance / 100.0:
                rows[point]["status"] = f"dropped after {n1} rows"
            else:
                survivors.append(point)
        if n1 < n and len(survivors) < len(group):
            say(f"{len(group) - len(survivors)} dropped: below -{tolerance:g} points vs AR on the first {n1} rows "
                f"(95 % jointly over the {len(grid)} points)")
        pool_decode_speed([r for r in rows.values() if "n" in r])
        survivors.sort(key=lambda p: (speed(rows[p], objective), rows[p]["accuracy"], *_careful(rows[p])),
                       reverse=True)
        for point in survivors:  # the rest of the rows, fastest first, until one is within the tolerance
            r = rows[point]
            if best is not None and _bound_value(r, objective) <= best:
                break
            if n1 < n:
                r = merge_rows(r, run_point(loaded, dev[n1:], point, cache, sampling, True))
                r["point"] = point.label
                rows[point] = r
            r["delta"], r["delta_ci95"] = paired_difference(r, ar)
            ok = within_tolerance(r, ar, tolerance)
            r["status"] = "within tolerance" if ok else "below tolerance"
            if n1 < n:
                say(f"{point.label}: exact match {_pct(r['accuracy'])} % ({100 * r['delta']:+.1f} vs AR) on {n} rows "
                    f"-> {r['status']}")
            if ok:
                best = max(best or 0.0, _bound_value(r, objective))
                if n1 < n:
                    break  # the points left in this group were slower on the first rows
    for r in rows.values():
        r.setdefault("status", "not needed (a faster point qualified)")
    candidates = [rows[p] for p in grid]
    per_forward = pool_decode_speed(candidates)
    chosen = choose(candidates, ar, tolerance, objective)
    if chosen is not None:
        chosen["status"] = "chosen"
    wall = time.perf_counter() - t0
    result_point = next((p for p, r in rows.items() if r is chosen), None)
    evidence = {
        "point": None if result_point is None else {
            "block_size": result_point.block_size, "denoising_steps": result_point.denoising_steps,
            "remasking_strategy": result_point.remasking_strategy, "confidence_threshold": result_point.threshold},
        "dataset": str(Path(label).resolve()) if data_name is None and Path(label).exists() else label, "rows": n, "first_slice_rows": n1, "tolerance_points": tolerance, "objective": objective,
        "model": str(Path(model_dir).resolve()), "ar_model": str(Path(ar_model_dir).resolve()),
        "ar": _summary(ar), "chosen": None if chosen is None else _summary(chosen),
        "candidates": [_summary(r) for r in candidates],
        "device": device_name, "dtype": dtype_name, "engine": engine, "batch_size": batch_size,
        "rest_batch_size": rest_batch if n1 < n else None, "speed_rows": n1,
        "max_new_tokens": max_new_tokens, "pooled_decode_seconds_per_forward": per_forward,
        "tuning_wall_time_s": wall,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    result = TuneResult(result_point, ar, candidates, chosen, tolerance, objective, "", evidence, wall)
    if chosen is None:
        top = max((r for r in candidates if "n" in r), key=lambda r: (r["n"], r["accuracy"]))
        result.message = (
            f"no decoding point is within {points_text(tolerance)} of AR's exact match {_pct(ar['accuracy'])} % on {label} "
            f"(best: {top['point']} at {_pct(top['accuracy'])} % on {top['n']} rows); nothing was written to "
            f"{Path(model_dir) / GENERATION_CONFIG}: raise --tolerance or train the model further")
        return result
    what = (f"{result_point.label}: exact match {_pct(chosen['accuracy'])} % vs AR {_pct(ar['accuracy'])} % on {n} "
            f"rows, decode {_speed(chosen['decode_tokens_per_second'])} tokens/s (AR "
            f"{_speed(ar['decode_tokens_per_second'])}), TPF {chosen['tokens_per_forward']:.2f}")
    if dry_run:
        result.message = f"chose {what}; --dry-run: nothing written"
    else:
        result.written = write_decoding_point(model_dir, result_point, evidence)
        result.message = (f"chose {what}; wrote {result.written['config']}"
                          + (f" (previous: {result.written['backup'].name})" if "backup" in result.written else "")
                          + f" and {EVIDENCE_FILE}")
    return result
