"""Evaluate BARD / AR Qwen3-VL checkpoints on a chat dataset with reference answers.

    python -m nemo_bard.eval --model DIR [--model DIR2 ...] --data DATA [--root-dir DIR] [--limit N]
        [--points 4:4:1.0,16:16:0.9,...] [--batch-size 8] [--max-new-tokens 64]
        [--out-dir DIR] [--name LABEL ...] [--ar] [--video-fps 2] [--video-max-frames N]

A ``bard_vl`` model is evaluated at every point ``BLOCK:STEPS:THRESHOLD[:static|dynamic]``
(strategy default: static when THRESHOLD >= 1.0, else dynamic; default points: the checkpoint's
block size at 1.0 and at the point its directory stores (``--tune``), else 0.9); a ``qwen3_vl`` model (or any model with ``--ar``) with the AR
baseline. All rows land in one results.json / results.md / results.png under ``--out-dir``,
with tokens/s relative to the AR row when there is one.

    python -m nemo_bard.eval --tune --model DIR --data DEV --ar-model AR [--tolerance 1.0]
        [--objective decode_tokens_per_second|tokens_per_forward] [--points GRID] [--dry-run]

``--tune`` picks the fastest decoding point of the bard_vl model whose exact match on the dev split is within
``--tolerance`` percentage points of the AR model's and stores it in ``DIR/generation_config.json``
(:mod:`nemo_bard.eval.tune`); ``generate``, ``eval``, the lmms-eval model and ``serve`` then default to it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    # this front end imports its modules where they are needed: a bad argument is answered in ~0.3 s
    from nemo_bard.generation.points import AR_ENGINES

    ap = argparse.ArgumentParser(prog="python -m nemo_bard.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="checkpoint directory (repeatable)")
    ap.add_argument("--data", required=True, help="save_to_disk directory, .jsonl file or directory of .jsonl")
    ap.add_argument("--root-dir", default=None,
                    help="base of relative image paths (default: the dataset dir, or its parent)")
    ap.add_argument("--split", default=None, help="split name when --data holds a DatasetDict")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N rows")
    ap.add_argument("--points", default=None,
                    help="comma-separated BLOCK:STEPS:THRESHOLD[:static|dynamic] (with --tune: the grid searched)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out-dir", default="eval_results", help="where results.{json,md,png} go (default ./eval_results)")
    ap.add_argument("--name", action="append", default=None, help="label per --model (default: directory name)")
    ap.add_argument("--ar", action="store_true", help="decode every --model with the AR baseline (causal Qwen3-VL)")
    ap.add_argument("--reference", default=None, help="row name the ×AR columns divide by (default: the fastest AR row)")
    ap.add_argument("--title", default=None, help="title of the table and plot")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    ap.add_argument("--dtype", default="auto", help="float32 / bfloat16 / auto (bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (1 gives stable timings on a small, shared CPU)")
    ap.add_argument("--engine", default="static", choices=AR_ENGINES,
                    help="decoding engine: static (default), compiled, eager (transformers' layers), "
                         "hf (Hugging Face generate; AR models only)")
    ap.add_argument("--video-fps", type=float, default=None,
                    help="video frames sampled per second (default: the processor's, 2); video files need PyAV")
    ap.add_argument("--video-max-frames", type=int, default=None,
                    help="most frames per video (default: the processor's)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up call")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    tune = ap.add_argument_group("--tune: choose the model's decoding point against its AR model")
    tune.add_argument("--tune", action="store_true",
                      help="search a grid of decoding points (--points, default: static S = B, B/2, B/4 and dynamic "
                           "S = B at tau 0.95, 0.9, 0.8, 0.7, 0.5) on --data and store the choice in --model")
    tune.add_argument("--ar-model", default=None, help="the AR model to measure against (same tokenizer)")
    tune.add_argument("--tolerance", type=float, default=1.0,
                      help="exact-match percentage points the point may lose against AR (default 1.0)")
    tune.add_argument("--objective", default="decode_tokens_per_second",
                      choices=("decode_tokens_per_second", "tokens_per_forward"), help="what 'fastest' means")
    tune.add_argument("--first-slice", type=int, default=None,
                      help="rows every point decodes first (default: a quarter, at least 64)")
    tune.add_argument("--rest-batch-size", type=int, default=None,
                      help="batch size of the rows after the first slice, which count for exact match only "
                           "(default: the larger of --batch-size and 8); speeds are timed on the first slice")
    tune.add_argument("--dry-run", action="store_true", help="print the choice, write nothing to --model")
    return ap


def run_tune(args: argparse.Namespace) -> int:
    """``--tune``: one model, one AR model; prints the table and the choice (exit 2 when no point qualifies)."""
    from nemo_bard.data.datasets import DataError
    from nemo_bard.data.media import VideoDecoderMissing
    from nemo_bard.errors import UserError
    from nemo_bard.eval.report import write_report
    from nemo_bard.eval.tune import tune
    from nemo_bard.models.verify import CheckpointCorrupt

    try:
        if len(args.model) != 1:
            raise UserError(f"--tune takes one --model (the bard_vl model to tune), got {len(args.model)}")
        if not args.ar_model:
            raise UserError("--tune needs --ar-model: the AR model whose exact match the chosen point must keep")
        result = tune(args.model[0], args.data, args.ar_model, tolerance=args.tolerance, objective=args.objective,
                      points=args.points, dry_run=args.dry_run, first_slice=args.first_slice, root_dir=args.root_dir,
                      split=args.split, limit=args.limit, batch_size=args.batch_size,
                      rest_batch_size=args.rest_batch_size, max_new_tokens=args.max_new_tokens, device=args.device,
                      dtype=args.dtype, engine=args.engine,
                      progress=not args.no_progress)
    except (UserError, DataError, VideoDecoderMissing, CheckpointCorrupt, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.table(), end="")
    if args.out_dir and not args.dry_run:  # the points that ran (a point left out has no row)
        paths = write_report([result.ar, *(r for r in result.candidates if "n" in r)], args.out_dir,
                             title="--tune candidates")
        print(f"json: {paths['json']}")
    print(f"tuning took {result.wall_time:.1f} s")
    if result.point is None:
        print(f"error: {result.message}", file=sys.stderr)
        return 2
    print(result.message)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch  # ~3.5 s: only when --threads asks for it

        torch.set_num_threads(args.threads)
    if args.tune:
        return run_tune(args)
    for flag in ("ar_model", "dry_run", "first_slice", "rest_batch_size"):
        if getattr(args, flag):
            print(f"error: --{flag.replace('_', '-')} goes with --tune", file=sys.stderr)
            return 2
    # rows, points and model paths are checked before the evaluation stack (torch, transformers: ~8 s) is imported
    from nemo_bard.data.datasets import DataError
    from nemo_bard.data.media import VideoDecoderMissing
    from nemo_bard.eval.samples import load_samples
    from nemo_bard.generation.points import parse_points
    from nemo_bard.models.paths import ModelPathError, read_model_config
    from nemo_bard.models.verify import CheckpointCorrupt

    names = args.name or []
    if len(names) > len(args.model):
        print(f"error: {len(names)} --name for {len(args.model)} --model", file=sys.stderr)
        return 2
    try:
        points = parse_points(args.points)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if "://" not in str(args.data) and not os.path.exists(args.data):
        print(f"error: --data {args.data} not found; pass a save_to_disk directory, a .jsonl file or a directory of "
              ".jsonl files", file=sys.stderr)
        return 2
    try:
        samples = load_samples(args.data, args.root_dir, args.limit, args.split)
        note = samples.skipped_note()
        if not samples:
            print(f"error: no rows to evaluate in {args.data}" + (f": {note}" if note else ""), file=sys.stderr)
            return 2
        for model_dir in args.model:
            read_model_config(model_dir, "--model", "pass a model directory (bard_vl or Qwen3-VL)")
        print(f"{len(samples)} samples from {args.data}" + (f" ({note})" if note else ""))
        from nemo_bard.eval.evaluation import evaluate
        from nemo_bard.eval.report import markdown_table, write_report

        rows = []
        for i, model_dir in enumerate(args.model):
            rows += evaluate(
                model_dir, samples, points, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                name=names[i] if i < len(names) else None, force_ar=args.ar, device=args.device, dtype=args.dtype,
                warmup=not args.no_warmup, progress=not args.no_progress, video_fps=args.video_fps,
                video_max_frames=args.video_max_frames, engine=args.engine,
            )
    except (DataError, VideoDecoderMissing, CheckpointCorrupt, ModelPathError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = write_report(rows, args.out_dir, reference=args.reference, title=args.title)
    print(markdown_table(rows, args.reference), end="")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
