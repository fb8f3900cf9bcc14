"""Decoding throughput: AR Qwen3-VL vs BARD block diffusion, side by side in one process.

    python -m nemo_bard.bench.decode --model BARD_DIR --ar-model AR_DIR [--batch-sizes 1 8]
        [--points 4:1.0,4:0.9,8:0.9] [--max-new-tokens 64] [--repeats 3] [--ignore-eos] [--json OUT]

Both models decode the same prompts (synthetic images + text, built offline, tokenised once with the
BARD processor). Every (decoder, batch size) cell gets one warm-up run and the median of ``--repeats``
timed runs; ratios (BARD / AR tokens per second) come from cells of this run only. A point ``B:tau``
is block size B, ``tau`` the dynamic confidence threshold (``--denoising-steps``, default B). Without
``--model``/``--ar-model`` the tiny random test model is written and converted in a temporary
directory (mechanics only: its speeds say nothing about real checkpoints).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

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
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = (int(v) for v in rng.integers(0, size - 16, 2))
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw.text((4, size // 2), str(int(rng.integers(10, 99))), fill=(0, 0, 0))
    return img


def parse_points(text: str) -> list[tuple[int, float]]:
    """``"4:1.0,8:0.9"`` -> ``[(4, 1.0), (8, 0.9)]``."""
    try:
        points = [(int(b), float(t)) for b, t in (p.split(":") for p in text.split(",") if p)]
    except ValueError:
        raise SystemExit(f"--points {text!r}: expected BLOCK:THRESHOLD[,BLOCK:THRESHOLD...], e.g. 4:1.0,4:0.9")
    if not points or any(b < 1 for b, _ in points):
        raise SystemExit(f"--points {text!r}: give at least one point with block size >= 1")
    return points


def _inputs(processor, batch_size: int) -> dict:
    from nemo_bard.generation.inputs import build_inputs

    items = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    images = [[synthetic_image(10 * i + j) for j in range(n)] for i, (_, n) in enumerate(items)]
    return build_inputs(processor, [t for t, _ in items], images)


def _time(fn, repeats: int):
    """One warm-up call, then the run with the median wall time of ``repeats`` calls."""
    fn()
    runs = sorted((fn() for _ in range(repeats)), key=lambda o: o.wall_time)
    return runs[len(runs) // 2]


def _row(decoder: str, bs: int, out, **extra) -> dict:
    return {
        "decoder": decoder, "batch_size": bs, **extra,
        "response_tokens": out.response_tokens, "num_forwards": out.num_forwards,
        "tokens_per_forward": round(out.tokens_per_forward, 4),
        "mean_tokens_per_row_forward": round(out.response_tokens / max(int(out.row_forwards.sum()), 1), 4),
        "wall_time": round(out.wall_time, 4), "tokens_per_second": round(out.tokens_per_second, 2),
    }


def tiny_models(root: Path, block_size: int) -> tuple[Path, Path]:
    """Write the tiny random AR Qwen3-VL and its bard_vl conversion under ``root``."""
    from nemo_bard.convert import convert
    from nemo_bard.tiny import write_tiny_model

    ar = write_tiny_model(root / "ar", preset="test", seed=0)
    return convert(ar, root / "bard", block_size=block_size), ar


def run(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import nemo_bard  # noqa: F401  registers bard_vl
    from nemo_bard.generation import ar_generate, block_diffusion_generate

    points = parse_points(args.points)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32"))
    tmp = None
    if args.model is None or args.ar_model is None:
        tmp = tempfile.TemporaryDirectory(prefix="bard_bench_")
        args.model, args.ar_model = tiny_models(Path(tmp.name), points[0][0])
    processor = AutoProcessor.from_pretrained(args.model)
    bard = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype).to(device).eval()
    ar = AutoModelForImageTextToText.from_pretrained(args.ar_model, dtype=dtype).to(device).eval()
    no_eos = {"eos_token_id": []} if args.ignore_eos else {}

    rows = []
    for bs in args.batch_sizes:
        enc = {k: v.to(device) for k, v in _inputs(processor, bs).items()}
        for key in ("pixel_values", "pixel_values_videos"):
            if key in enc:
                enc[key] = enc[key].to(dtype)
        ar_out = _time(lambda: ar_generate(ar, **enc, max_new_tokens=args.max_new_tokens, **no_eos), args.repeats)
        ar_row = _row("ar", bs, ar_out)
        rows.append(ar_row)
        for block_size, tau in points:
            out = _time(lambda: block_diffusion_generate(
                bard, **enc, max_new_tokens=args.max_new_tokens, block_size=block_size,
                denoising_steps=args.denoising_steps or block_size, remasking_strategy="low_confidence_dynamic",
                confidence_threshold=tau, **no_eos,
            ), args.repeats)
            row = _row("bard", bs, out, block_size=block_size, threshold=tau)
            row["speedup_vs_ar"] = round(row["tokens_per_second"] / ar_row["tokens_per_second"], 3)
            rows.append(row)
    if tmp is not None:
        tmp.cleanup()

    def tps(decoder, bs, **point):
        return next(r["tokens_per_second"] for r in rows if r["decoder"] == decoder and r["batch_size"] == bs
                    and all(r.get(k) == v for k, v in point.items()))

    scaling = {}
    if len(args.batch_sizes) > 1:
        lo, hi = min(args.batch_sizes), max(args.batch_sizes)
        scaling["ar"] = round(tps("ar", hi) / tps("ar", lo), 3)
        for b, t in points:
            point = dict(block_size=b, threshold=t)
            scaling[f"bard B{b} tau{t}"] = round(tps("bard", hi, **point) / tps("bard", lo, **point), 3)
    return {
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "torch_threads": torch.get_num_threads(),
        "model": str(args.model), "ar_model": str(args.ar_model), "tiny_random_models": tmp is not None,
        "max_new_tokens": args.max_new_tokens, "ignore_eos": args.ignore_eos, "repeats": args.repeats,
        "results": rows, f"throughput_bs{max(args.batch_sizes)}_over_bs{min(args.batch_sizes)}": scaling,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nemo_bard.bench.decode", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="bard_vl checkpoint directory")
    ap.add_argument("--ar-model", "--ar_model", default=None, help="autoregressive Qwen3-VL directory (the baseline)")
    ap.add_argument("--batch-sizes", "--batch_sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--points", default="4:1.0,4:0.9,8:0.9", help="BLOCK:THRESHOLD list (dynamic strategy)")
    ap.add_argument("--denoising-steps", "--denoising_steps", type=int, default=None, help="default: block size")
    ap.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ignore-eos", "--ignore_eos", action="store_true", help="decode the full budget (equal lengths)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="also write the report to this file")
    args = ap.parse_args(argv)
    for flag, path in (("--model", args.model), ("--ar-model", args.ar_model)):
        if path is not None and not (Path(path) / "config.json").is_file():
            print(f"nemo_bard.bench.decode: error: {flag} {path}: no config.json (not a checkpoint directory)",
                  file=sys.stderr)
            return 2
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
