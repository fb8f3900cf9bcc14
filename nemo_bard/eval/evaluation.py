"""Evaluate a ``bard_vl`` (block diffusion) or AR Qwen3-VL checkpoint on a chat dataset with reference answers.

The reference of a row is its ``answer`` column when present, else the text of its last assistant
turn; a row whose reference is empty (an ``answer`` of ``""``, an assistant turn without text) is skipped
and counted, never scored against the empty string (:class:`EvalSamples`, ``skipped_empty_reference`` in
the result rows, a warning and the CLI's sample line). The prompt is the conversation before that
turn, rendered with the processor's chat template (``add_generation_prompt=True``) and batched with
left padding. Predictions are decoded
with special tokens skipped and stripped, then scored with :mod:`nemo_bard.eval.metrics`.

A ``bard_vl`` model is evaluated at a list of decoding points ``(block size, denoising steps,
threshold[, strategy])``; an AR model (``model_type: qwen3_vl``, or any model with ``force_ar``)
through :func:`nemo_bard.generation.ar_generate`. Speed numbers per point:

* ``tokens_per_second`` = response tokens (up to and including eos) / summed wall time of the
  generation calls (prefill included; a prefill shared by the points of one block size is measured once per
  batch and counted for each; prompt building and scoring excluded);
* ``tokens_per_forward`` (TPF) = response tokens / per-row decoding forwards, i.e. the tokens a
  sequence gains per forward as if decoded alone (independent of the batch size; exactly 1.0
  for AR, 1.0 for block diffusion at threshold 1.0 with S = B);
* ``num_forwards`` = batched decoding forwards summed over batches (prefill excluded; one batched
  forward counts once); ``row_forwards`` = the same counted per sequence;
  ``tokens_per_batch_forward`` = response tokens / ``num_forwards``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen3VLForConditionalGeneration

import nemo_bard.models.modeling_bard_vl  # noqa: F401  (registers bard_vl with the Auto classes)
from nemo_bard.data.media import VideoSampling
from nemo_bard.eval.metrics import aggregate, score
from nemo_bard.eval.samples import EvalSample, load_samples
from nemo_bard.generation import ar_generate, block_diffusion_generate
from nemo_bard.generation.decode import stop_ids as model_stop_ids
from nemo_bard.generation.defaults import read_decoding_defaults
from nemo_bard.generation.inputs import build_inputs
from nemo_bard.generation.points import DecodePoint, check_engine, default_points, parse_points
from nemo_bard.generation.session import SharedPrefill
from nemo_bard.models.loading import resolve_device_dtype
from nemo_bard.models.verify import verify_model_dir

logger = logging.getLogger(__name__)



# ----------------------------------------------------------------------------------------- model


@dataclass
class LoadedModel:
    """A model ready for evaluation."""

    model: torch.nn.Module
    processor: Any
    kind: str  # "bard" or "ar"
    path: str
    name: str
    engine: str = "static"  # decoding engine (static, compiled, eager; hf = Hugging Face generate, AR only)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)


def model_type(model_dir: str | Path) -> str | None:
    """``model_type`` of a checkpoint directory's config.json."""
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; --model must be a Hugging Face checkpoint directory")
    return json.loads(cfg.read_text()).get("model_type")


def load_model(
    model_dir: str | Path,
    *,
    force_ar: bool = False,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    name: str | None = None,
    engine: str = "static",
) -> LoadedModel:
    """Load a checkpoint and its processor; ``bard_vl`` -> block diffusion, otherwise (or ``force_ar``) AR.

    ``dtype`` defaults to bfloat16 on CUDA and float32 on CPU. With ``force_ar`` a ``bard_vl``
    directory is loaded into the causal Qwen3-VL class (its weights decoded autoregressively).
    """

    path = Path(model_dir)
    mtype = model_type(path)
    verify_model_dir(path, what="--model checkpoint")  # a truncated or damaged weight file, named before loading
    device, dtype = resolve_device_dtype(device, dtype)
    kind = "bard" if mtype == "bard_vl" and not force_ar else "ar"
    if kind == "bard":
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    else:
        if mtype not in ("qwen3_vl", "bard_vl"):
            logger.warning("%s has model_type %r; loading it as a causal Qwen3-VL for the AR baseline", path, mtype)
        model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    if engine == "hf" and kind == "bard":
        raise ValueError(f"--engine hf (Hugging Face generate) decodes AR models only; {path} is a bard_vl model: use "
                         "static, compiled or eager")
    return LoadedModel(model, processor, kind, str(path), name or path.name,
                       engine if engine == "hf" else check_engine(engine))


def model_default_points(model_dir: str | Path, block_size: int) -> list[DecodePoint]:
    """Points evaluated when none are given: tau 1.0 (one token per forward) and the model directory's stored
    point (``generation_config.json``, e.g. from ``--tune``), else tau 0.9, at the checkpoint's block size."""
    stored = read_decoding_defaults(model_dir).point(block_size)
    if stored is None:
        return default_points(block_size)
    first = default_points(block_size)[0]
    same = (stored.denoising_steps, stored.threshold, stored.remasking_strategy) == (
        first.denoising_steps, first.threshold, first.remasking_strategy)
    return [stored] if same else [first, stored]


# ----------------------------------------------------------------------------------- generation


def stop_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """Stop ids: the model's eos (generation config, else config) plus the tokenizer's eos."""
    return model_stop_ids(model, tokenizer)


def generate_batch(
    loaded: LoadedModel,
    inputs: dict[str, torch.Tensor],
    point: DecodePoint,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    shared_prefill: SharedPrefill | None = None,
):
    """One generation call for a batch at ``point`` (greedy unless ``temperature > 0``; AR is always greedy).
    ``shared_prefill``: block diffusion only, see :func:`~nemo_bard.generation.block_diffusion_generate`."""
    pad = getattr(loaded.tokenizer, "pad_token_id", None)
    stops = stop_ids(loaded.model, loaded.tokenizer)
    if point.is_ar:
        if loaded.kind != "ar":
            raise ValueError(f"{loaded.path} is a bard_vl model; load it with force_ar=True for AR decoding")
        return ar_generate(loaded.model, **inputs, max_new_tokens=max_new_tokens, eos_token_id=stops,
                           pad_token_id=pad, engine=loaded.engine)
    if loaded.kind != "bard":
        raise ValueError(f"{loaded.path} is an AR model; block-diffusion point {point.label} needs a bard_vl model")
    if loaded.engine == "hf":
        raise ValueError("--engine hf (Hugging Face generate) decodes AR models only; use static, compiled or eager")
    return block_diffusion_generate(
        loaded.model, **inputs, max_new_tokens=max_new_tokens, block_size=point.block_size,
        denoising_steps=point.denoising_steps or point.block_size, remasking_strategy=point.remasking_strategy,
        confidence_threshold=1.0 if point.threshold is None else point.threshold, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, eos_token_id=stops, pad_token_id=pad, engine=loaded.engine,
        shared_prefill=shared_prefill,
    )


class _Tally:
    """One decoding point's running counts over the batches of an evaluation."""

    def __init__(self, loaded: LoadedModel, point: DecodePoint) -> None:
        self.loaded, self.point, self.name = loaded, point, f"{loaded.name} {point.label}"
        self.predictions: list[dict] = []
        self.tokens = self.forwards = self.row_forwards = 0
        self.gen_time, self.eval_time = 0.0, 0.0
        self.prefill_time: float | None = 0.0

    def add(self, batch: list, out: Any, seconds: float, shared_seconds: float = 0.0) -> None:
        """Count a batch's output; ``shared_seconds``: the prefill it reused (measured once for the batch), counted
        in its prefill and generation time as if it had run it."""
        texts = self.loaded.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
        self.tokens += int(out.lengths.sum())
        self.forwards += int(out.num_forwards)
        self.row_forwards += int(out.row_forwards.sum())
        self.gen_time += float(out.wall_time) + shared_seconds
        self.prefill_time = (None if self.prefill_time is None or out.prefill_time is None
                             else self.prefill_time + out.prefill_time + shared_seconds)
        for s, text in zip(batch, texts):
            text = text.strip()
            self.predictions.append({"row": s.row, "reference": s.reference, "prediction": text,
                                     **score(text, s.reference)})
        self.eval_time += seconds + shared_seconds

    def row(self, batch_size: int, max_new_tokens: int) -> dict:
        loaded, point = self.loaded, self.point
        tokens, forwards, row_forwards = self.tokens, self.forwards, self.row_forwards
        gen_time, prefill_time = self.gen_time, self.prefill_time
        return {
            "name": self.name,
            "model": loaded.name,
            "model_dir": loaded.path,
            "kind": "ar" if point.is_ar else "bard",
            "block_size": point.block_size,
            "denoising_steps": None if point.is_ar else (point.denoising_steps or point.block_size),
            "threshold": None if point.is_ar else (1.0 if point.threshold is None else point.threshold),
            "remasking_strategy": point.remasking_strategy,
            "n": len(self.predictions),
            **aggregate(self.predictions),
            "tokens_per_forward": tokens / row_forwards if row_forwards else float("nan"),
            "tokens_per_second": tokens / gen_time if gen_time > 0 else float("nan"),
            "num_forwards": forwards,
            "row_forwards": row_forwards,
            "tokens_per_batch_forward": tokens / forwards if forwards else float("nan"),
            "decode_tokens_per_second": (tokens / (gen_time - prefill_time) if prefill_time is not None
                                         and gen_time > prefill_time else None),
            "response_tokens": tokens,
            "wall_time": gen_time,
            "prefill_time": prefill_time,
            "eval_time": self.eval_time,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "engine": loaded.engine,
            "device": str(loaded.model.device),
            "dtype": str(loaded.model.dtype).removeprefix("torch."),
            "predictions": self.predictions,
        }


def evaluate_points(
    loaded: LoadedModel,
    samples: list[EvalSample],
    points: Sequence[DecodePoint],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool | Callable[[str, int, int], None] = True,
    sampling: VideoSampling | None = None,
    inputs_cache: dict | None = None,
) -> list[dict]:
    """Evaluate several decoding points on the same rows, batch by batch; returns one result row per point (see
    :func:`evaluate`), in ``points`` order.

    Each batch's prompts are built once; block-diffusion points of one block size decode from one prompt prefill
    per batch (a :class:`~nemo_bard.generation.session.SharedPrefill`: the same tokens as prefilling for each);
    its measured time is counted in each such point's prefill and generation time. ``sampling``: video frame
    sampling (default: the processor's). ``inputs_cache``: a dict shared by calls on the same model and samples;
    each batch's processor outputs are built once and reused by later calls.
    """
    tallies = [_Tally(loaded, p) for p in points]
    per_block = Counter(p.block_size for p in points if not p.is_ar)
    sharing = [b for b, count in per_block.items() if count > 1]  # a lone point has nobody to share a prefill with
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    report = progress if callable(progress) else None
    desc = tallies[0].name if len(tallies) == 1 else f"{loaded.name} ({len(tallies)} points)"
    for batch in tqdm(batches, desc=desc, unit="batch", disable=report is not None or not progress, leave=False):
        t0 = time.perf_counter()
        key = tuple((s.where, s.row) for s in batch)
        inputs = None if inputs_cache is None else inputs_cache.get(key)
        if inputs is None:
            inputs = build_inputs(loaded.processor, [s.prompt for s in batch], sampling, [s.where for s in batch])
            if inputs_cache is not None:
                inputs_cache[key] = inputs
        built = time.perf_counter() - t0
        shared = {b: SharedPrefill() for b in sharing}  # this batch's, by block size
        for tally in tallies:
            t1 = time.perf_counter()
            prefill = None if tally.point.is_ar else shared.get(tally.point.block_size)
            reused = prefill.seconds if prefill is not None and prefill.filled else 0.0
            out = generate_batch(loaded, inputs, tally.point, max_new_tokens, shared_prefill=prefill)
            tally.add(batch, out, built + time.perf_counter() - t1, reused)
            if report is not None:
                report(tally.name, len(tally.predictions), len(samples))
    return [t.row(batch_size, max_new_tokens) for t in tallies]


def evaluate_point(
    loaded: LoadedModel,
    samples: list[EvalSample],
    point: DecodePoint,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool | Callable[[str, int, int], None] = True,
    sampling: VideoSampling | None = None,
    inputs_cache: dict | None = None,
) -> dict:
    """Evaluate one decoding point; returns a result row (see :func:`evaluate` and :func:`evaluate_points`)."""
    return evaluate_points(loaded, samples, [point], batch_size=batch_size, max_new_tokens=max_new_tokens,
                           progress=progress, sampling=sampling, inputs_cache=inputs_cache)[0]


def evaluate(
    model: str | Path | LoadedModel,
    data: str | Path | list[EvalSample],
    points: str | Sequence[str | DecodePoint] | None = None,
    *,
    root_dir: str | Path | None = None,
    split: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    name: str | None = None,
    force_ar: bool = False,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    warmup: bool = True,
    progress: bool | Callable[[str, int, int], None] = True,
    engine: str = "static",
    video_fps: float | None = None,
    video_max_frames: int | None = None,
) -> list[dict]:
    """Evaluate a checkpoint at each decoding point; returns one result row per point (:func:`evaluate_points`:
    the points decode batch by batch, those of one block size from one prompt prefill per batch, whose measured time
    counts in each of their rows).

    Args:
        model: checkpoint directory (or a :class:`LoadedModel`).
        data: chat dataset path (save_to_disk dir, .jsonl) or already loaded samples.
        points: decoding points for a ``bard_vl`` model (``"B:S:tau[:strategy]"``, comma-separated or a
            list); default: the checkpoint's block size at tau 1.0 and at the point its directory stores
            (``generation_config.json``, written by ``--tune``), else tau 0.9. Ignored for AR models.
        root_dir, split, limit: see :func:`load_samples`.
        batch_size, max_new_tokens: generation batch and response budget.
        name: model label in the rows (default: the directory name).
        force_ar: decode with the AR baseline whatever the model type.
        engine: ``static`` (default), ``compiled``, ``eager`` or ``hf`` (Hugging Face ``generate``, AR only).
        warmup: run one untimed call (first batch, one block) before timing, so one-off costs
            (allocator, kernel selection) do not land on the first point.
        video_fps, video_max_frames: video frame sampling (default: the processor's; decoded per batch).

    Row keys: name, model, model_dir, kind ("bard"/"ar"), block_size, denoising_steps, threshold,
    remasking_strategy, n, skipped_empty_reference (rows left out for an empty reference), accuracy (exact
    match), char_accuracy, position_accuracy,
    tokens_per_forward, tokens_per_second, num_forwards, row_forwards, tokens_per_batch_forward,
    response_tokens, wall_time (generation
    seconds), eval_time (seconds incl. prompt building), batch_size, max_new_tokens, device, dtype,
    predictions (per-sample list).
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(
        model, force_ar=force_ar, device=device, dtype=dtype, name=name, engine=engine)
    samples = data if isinstance(data, list) else load_samples(data, root_dir, limit, split)
    skipped = len(getattr(samples, "skipped_empty", []))
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise ValueError(f"no samples to evaluate in {data}")
    if loaded.kind == "ar":
        if points:
            logger.warning("%s is evaluated with the AR baseline; decoding points %s are ignored", loaded.path, points)
        todo = [DecodePoint()]
    else:
        todo = parse_points(points) or model_default_points(loaded.path, int(loaded.model.config.block_size))
    sampling = VideoSampling.from_processor(getattr(loaded.processor, "video_processor", None), fps=video_fps,
                                            max_frames=video_max_frames)
    if warmup:
        first = samples[:batch_size]
        inputs = build_inputs(loaded.processor, [s.prompt for s in first], sampling, [s.where for s in first])
        generate_batch(loaded, inputs, todo[0], min(max_new_tokens, todo[0].block_size or 4))
    # batch by batch: each batch's prompts are built once and its points of one block size share one prefill
    rows = evaluate_points(loaded, samples, todo, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           progress=progress, sampling=sampling)
    for row in rows:
        row["skipped_empty_reference"] = skipped
        logger.info("%s: accuracy %.3f, char %.3f, TPF %.2f, %.1f tok/s", row["name"], row["accuracy"],
                    row["char_accuracy"], row["tokens_per_forward"], row["tokens_per_second"])
    return rows
