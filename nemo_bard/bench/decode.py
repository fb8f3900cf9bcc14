"""Decoding speed: BARD block diffusion vs the AR baseline, every engine side by side in one process.

    python -m nemo_bard.bench.decode [--model BARD_DIR --ar-model AR_DIR | --preset qwen3vl_2b]
        [--engine eager,static,compiled] [--batch-sizes 1 8] [--points 16:4:0.9,32:4:0.9]
        [--max-new-tokens 128] [--repeats 3] [--ignore-eos] [--json OUT]

Both models decode the same prompts (synthetic images + text, built offline). For each batch size:

* AR rows: Hugging Face ``generate`` (``engine=hf``, also the reference tokens) and the AR baseline on each
  selected engine (one-token causal steps on the same static cache and graphs as block diffusion);
* BARD rows: every decoding point ``BLOCK:STEPS:THRESHOLD[:static|dynamic]`` on every selected engine; the
  eager engine (transformers' own layers) always runs once to give the reference tokens.

Each cell gets one untimed warm-up (compilation, graph capture), then ``--repeats`` runs interleaved across
engines; the median is reported. Every row carries ``engine``, ``ms_per_forward`` (after the prefill),
``tokens_per_second`` (prefill included), ``decode_tokens_per_second``, ``tokens_per_forward`` (per row)
and ``tokens_match_eager``; ``x_ar`` / ``decode_x_ar`` divide by the fastest AR row of the same batch size
in this run. ``--preset`` builds a randomly initialised model of a real Qwen3-VL shape directly on the
device (AR copy + its ``bard_vl`` view, shared weights; tiny offline tokenizer); with random weights
confidences are tiny, so tokens per forward are forced by ``STEPS`` (B/S). Without ``--model``/``--preset``
the tiny test model is used (mechanics only).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

import nemo_bard.models.modeling_bard_vl  # noqa: F401  (registers bard_vl with the Auto classes)
from nemo_bard.bench.presets import build_preset, num_parameters
from nemo_bard.convert import convert
from nemo_bard.generation import ar_generate, block_diffusion_generate
from nemo_bard.generation.inputs import build_inputs, user_conversation
from nemo_bard.generation.points import ENGINES, parse_points
from nemo_bard.models.loading import resolve_device_dtype
from nemo_bard.tiny import write_tiny_model

logger = logging.getLogger(__name__)

PROMPTS = [
    ("Read the digits.", 1),
    ("Describe the image.", 1),
    ("What is the number? 12 + 7 =", 0),
    ("What is written? Answer the question.", 1),
    ("Count the red and blue squares.", 2),
    ("Please give a short answer: what color is the cat?", 0),
    ("Describe the top left of the picture.", 1),
    ("hello", 0),
]


def synthetic_image(seed: int, size: int = 64):
    """A deterministic picture of coloured squares and a number (no files, no network)."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = (int(v) for v in rng.integers(0, size - 16, 2))
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw.text((4, size // 2), str(int(rng.integers(10, 99))), fill=(0, 0, 0))
    return img


def prompt_batch(processor, batch_size: int) -> dict:
    """The benchmark's prompts for one batch (cycled), tokenised with left padding."""
    items = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    return build_inputs(processor, [user_conversation(text, [synthetic_image(10 * i + j) for j in range(n)])
                                    for i, (text, n) in enumerate(items)])


def tiny_models(root: Path, block_size: int) -> tuple[Path, Path]:
    """Write the tiny random AR Qwen3-VL and its bard_vl conversion under ``root``."""
    ar = write_tiny_model(root / "ar", preset="test", seed=0)
    return convert(ar, root / "bard", block_size=block_size), ar


def _row(model: str, engine: str, batch_size: int, out, ref, **extra) -> dict:
    if isinstance(out, str):  # the engine failed on this cell: say so, keep the other rows
        return {"model": model, "engine": engine, "batch_size": batch_size, **extra, "error": out}
    decode_tps = out.response_tokens / out.decode_time if out.decode_time else None
    return {
        "model": model, "engine": engine, "batch_size": batch_size, **extra,
        "response_tokens": out.response_tokens, "num_forwards": out.num_forwards,
        "decode_forwards": out.decode_forwards, "tokens_per_forward": round(out.tokens_per_forward, 4),
        "tokens_per_batch_forward": round(out.tokens_per_batch_forward, 4),
        "wall_time": round(out.wall_time, 5),
        "prefill_time": None if out.prefill_time is None else round(out.prefill_time, 5),
        "ms_per_forward": round(out.ms_per_forward, 4), "tokens_per_second": round(out.tokens_per_second, 2),
        "decode_tokens_per_second": None if decode_tps is None else round(decode_tps, 2),
        "tokens_match_eager": bool(out.sequences.shape == ref.sequences.shape
                                   and bool((out.sequences == ref.sequences).all())),
    }


def _median_runs(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, Any]:
    """Warm each engine up once, then run them interleaved ``repeats`` times; the median-wall run of each (an
    engine that fails gets its one-line error instead)."""
    failed: dict[str, str] = {}
    for name, fn in fns.items():
        try:
            fn()
        except Exception as exc:  # noqa: BLE001  reported in the table; the other engines still run
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            logger.warning("bench.decode: engine %s failed: %s", name, failed[name])
    runs: dict[str, list] = {name: [] for name in fns if name not in failed}
    for _ in range(repeats):
        for name in runs:
            runs[name].append(fns[name]())
    return {**{name: sorted(r, key=lambda o: o.wall_time)[len(r) // 2] for name, r in runs.items()}, **failed}


def load_models(args: argparse.Namespace, device, dtype, block_size: int, tmp: Path):
    """``(ar, bard, processor, description)`` from --preset, --model/--ar-model, or the tiny test model."""
    if args.preset:
        ar, bard, processor = build_preset(args.preset, device, dtype, block_size)
        return ar, bard, processor, f"preset {args.preset} ({num_parameters(bard) / 1e9:.2f} B parameters, random)"
    if args.model is None or args.ar_model is None:
        args.model, args.ar_model = tiny_models(tmp, block_size)
    processor = AutoProcessor.from_pretrained(args.model)
    bard = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype).to(device).eval()
    ar = AutoModelForImageTextToText.from_pretrained(args.ar_model, dtype=dtype).to(device).eval()
    return ar, bard, processor, f"{args.model} vs {args.ar_model}"


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark; returns the report (also printed as a table by :func:`main`)."""
    points = parse_points(args.points)
    if not points or any(p.is_ar for p in points):
        raise SystemExit("nemo_bard.bench.decode: --points lists block-diffusion points BLOCK:STEPS:THRESHOLD")
    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    tmp = tempfile.TemporaryDirectory(prefix="bard_bench_")
    ar, bard, processor, description = load_models(args, device, dtype, points[0].block_size, Path(tmp.name))
    eos = {"eos_token_id": []} if args.ignore_eos else {}
    fast = [e for e in engines if e != "eager"]

    rows = []

    def report() -> dict:
        return {
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else f"cpu ({torch.get_num_threads()} threads)"),
            "dtype": str(dtype).replace("torch.", ""), "models": description, "engines": engines,
            "max_new_tokens": args.max_new_tokens, "ignore_eos": args.ignore_eos, "repeats": args.repeats,
            "results": rows,
        }

    for batch in args.batch_sizes:
        enc = {k: v.to(device) for k, v in prompt_batch(processor, batch).items()}
        for key in ("pixel_values", "pixel_values_videos"):
            if key in enc:
                enc[key] = enc[key].to(dtype)
        ar_fns = {e: (lambda e=e: ar_generate(ar, **enc, max_new_tokens=args.max_new_tokens, engine=e, **eos))
                  for e in ["hf", *fast]}
        best = _median_runs(ar_fns, args.repeats)
        ar_rows = [_row("ar", e, batch, out, best["hf"]) for e, out in best.items()]
        measured = [r for r in ar_rows if "error" not in r]
        fastest = max(r["tokens_per_second"] for r in measured)
        fastest_decode = max((r["decode_tokens_per_second"] or 0.0) for r in measured)

        def add(row: dict) -> None:  # with its ratios to the fastest AR row of this batch size
            if "error" not in row:
                row["x_ar"] = round(row["tokens_per_second"] / fastest, 3)
                row["decode_x_ar"] = (round(row["decode_tokens_per_second"] / fastest_decode, 3)
                                      if row["decode_tokens_per_second"] and fastest_decode else None)
            rows.append(row)

        for row in ar_rows:
            add(row)
        for point in points:
            kw = dict(max_new_tokens=args.max_new_tokens, block_size=point.block_size,
                      denoising_steps=point.denoising_steps, remasking_strategy=point.remasking_strategy,
                      confidence_threshold=point.threshold, **eos)
            fns = {e: (lambda e=e: block_diffusion_generate(bard, **enc, engine=e, **kw)) for e in ["eager", *fast]}
            if "eager" in engines:
                best = _median_runs(fns, args.repeats)
            else:  # the eager decoder runs once, for the reference tokens only
                best = {"eager": fns["eager"](), **_median_runs({e: fns[e] for e in fast}, args.repeats)}
            for e in engines:
                add(_row("bard", e, batch, best[e], best["eager"], point=point.label, block_size=point.block_size,
                         denoising_steps=point.denoising_steps, threshold=point.threshold,
                         strategy=point.remasking_strategy))
            if args.json:  # what is measured so far survives a run cut short by a time limit
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(report(), indent=2) + "\n")
    tmp.cleanup()
    return report()


def markdown(report: dict) -> str:
    """The report's rows as a markdown table."""
    head = ("| batch | model | engine | point | TPF | ms/forward | prefill ms | tokens/s | decode tokens/s | x AR "
            "| decode x AR | same tokens as eager |\n|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n")
    lines = []
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['batch_size']} | {r['model']} | {r['engine']} | {r.get('point', 'AR')} | "
                         f"failed: {r['error'].replace('|', '/')} | | | | | | | |")
            continue
        dec = "–" if r["decode_tokens_per_second"] is None else f"{r['decode_tokens_per_second']:.1f}"
        dx = "–" if r.get("decode_x_ar") is None else f"{r['decode_x_ar']:.2f}"
        pre = "–" if r["prefill_time"] is None else f"{1000 * r['prefill_time']:.1f}"
        lines.append(f"| {r['batch_size']} | {r['model']} | {r['engine']} | {r.get('point', 'AR')} | "
                     f"{r['tokens_per_forward']:.2f} | {r['ms_per_forward']:.2f} | {pre} | "
                     f"{r['tokens_per_second']:.1f} | {dec} | {r['x_ar']:.2f} | {dx} | "
                     f"{'yes' if r['tokens_match_eager'] else 'NO'} |")
    return head + "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m nemo_bard.bench.decode", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="bard_vl checkpoint directory")
    ap.add_argument("--ar-model", "--ar_model", default=None, help="autoregressive Qwen3-VL directory (the baseline)")
    ap.add_argument("--preset", default=None, help="qwen3vl_2b | qwen3vl_4b | qwen3vl_8b | tiny: random real-shape models")
    ap.add_argument("--engine", default=None,
                    help="comma-separated engines (eager, static, compiled); default: all on GPU, eager,static on CPU")
    ap.add_argument("--batch-sizes", "--batch_sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--points", default="16:4:0.9,32:4:0.9", help="BLOCK:STEPS:THRESHOLD[:static|dynamic],...")
    ap.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ignore-eos", "--ignore_eos", action="store_true", help="decode the full budget (equal lengths)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="also write the report to this file")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    err = None
    if args.preset and (args.model or args.ar_model):
        err = "--preset builds its own models; drop --model/--ar-model"
    for flag, path in (("--model", args.model), ("--ar-model", args.ar_model)):
        if path is not None and not (Path(path) / "config.json").is_file():
            err = f"{flag} {path}: no config.json (not a checkpoint directory)"
    if args.engine is None:
        args.engine = ",".join(ENGINES[::-1]) if torch.cuda.is_available() else "eager,static"
    bad = [e for e in args.engine.split(",") if e.strip() and e.strip() not in ENGINES]
    if bad:
        err = f"--engine {bad[0]!r} is not one of {', '.join(ENGINES)}"
    if err:
        print(f"nemo_bard.bench.decode: error: {err}", file=sys.stderr)
        return 2
    try:
        report = run(args)
    except ValueError as exc:
        print(f"nemo_bard.bench.decode: error: {exc}", file=sys.stderr)
        return 2
    print(markdown(report))
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
        print(f"report: {args.json}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
