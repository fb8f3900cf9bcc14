"""Answer one prompt with a BARD (``bard_vl``) checkpoint by block-diffusion decoding.

    python -m nemo_bard.generate --model DIR [--image PATH ...] [--video PATH ...] --prompt TEXT
        [--video-fps 2] [--video-max-frames N] [--system TEXT]
        [--block-size 32] [--denoising-steps 32] [--confidence-threshold 0.9]
        [--remasking-strategy low_confidence_dynamic] [--temperature 0] [--max-new-tokens 1024]
        [--stream] [--stats-json FILE] [--device cuda|cpu] [--dtype auto] [--seed N]
        [--engine static|compiled|eager] [--verify]

Images are read with PIL. A video is a file (mp4, webm, mkv, ...; decoding needs PyAV:
``pip install 'nemo-bard[video]'``) or a directory of frame images (sorted by name); its frames are
sampled like Qwen3-VL does (``--video-fps`` frames per second within the processor's min/max frame
count). On a GPU the default is bf16, on CPU fp32.
Every option also accepts its underscore spelling (``--block_size``).

Arguments and the checkpoint's files (config.json, every safetensors header; ``--verify``: also the sha256 its
export recorded) are checked before torch or transformers is imported, so a bad argument is one line in about a
second.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from nemo_bard.data.media import VideoDecoderMissing, VideoSampling, require_video_decoder
from nemo_bard.errors import DEBUG_ENV, UserError, report
from nemo_bard.generation.defaults import DefaultsError, read_decoding_defaults
from nemo_bard.generation.points import ENGINES, REMASKING_STRATEGIES
from nemo_bard.models.constants import DEFAULT_BLOCK_SIZE
from nemo_bard.models.loading import DTYPES, resolve_device_dtype
from nemo_bard.models.paths import ModelPathError, read_model_config
from nemo_bard.models.verify import verify_model_dir

# decoding engines and remasking strategies, checked against nemo_bard.generation.points after the cheap checks
# (importing the generation package imports torch); tests/test_generate_cli.py keeps these lists equal to it
ENGINE_NAMES = ("static", "compiled", "eager")
STRATEGY_NAMES = ("low_confidence_dynamic", "low_confidence_static")


class UsageError(UserError):
    """A user-fixable problem; printed as one line and exit code 2."""


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add ``--a-b`` together with its underscore spelling ``--a_b``."""
    spellings = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
    parser.add_argument(*spellings, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (imports neither torch nor the generation package)."""
    ap = argparse.ArgumentParser(prog="python -m nemo_bard.generate", description=__doc__.splitlines()[0])
    _flag(ap, "model", required=True, help="bard_vl checkpoint directory")
    _flag(ap, "image", action="append", default=[], help="image file (repeatable)")
    _flag(ap, "video", action="append", default=[], help="video file or directory of frames (repeatable)")
    _flag(ap, "video-fps", type=float, default=None,
          help="frames sampled per second, also the frame rate of a frame directory (default: the processor's, 2)")
    _flag(ap, "video-max-frames", type=int, default=None, help="most frames per video (default: the processor's)")
    _flag(ap, "prompt", required=True, help="user text")
    _flag(ap, "system", default=None, help="optional system message")
    _flag(ap, "block-size", type=int, default=None, help="block size B (default: the checkpoint's)")
    _flag(ap, "denoising-steps", type=int, default=None,
          help="max denoising steps per block S (default: the model directory's, else B)")
    _flag(ap, "confidence-threshold", type=float, default=None,
          help="tau of the dynamic strategy (default: the model directory's, else 0.9)")
    _flag(ap, "remasking-strategy", default=None, metavar="|".join(STRATEGY_NAMES),
          help="default: the model directory's, else static at tau >= 1 and dynamic below")
    _flag(ap, "temperature", type=float, default=0.0, help="0 = greedy (default); finite, >= 0")
    _flag(ap, "top-k", type=int, default=None, help="sample among the k most likely tokens (0 = off)")
    _flag(ap, "top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    _flag(ap, "max-new-tokens", type=int, default=1024)
    _flag(ap, "stream", action="store_true", help="print the answer block by block as blocks commit")
    _flag(ap, "stats-json", default=None, help="write decoding statistics to this JSON file")
    _flag(ap, "device", default=None, help="cuda or cpu (default: cuda when available)")
    _flag(ap, "dtype", default="auto", choices=DTYPES, help="auto = bfloat16 on GPU, float32 on CPU")
    _flag(ap, "seed", type=int, default=None)
    _flag(ap, "engine", default="static", metavar="|".join(ENGINE_NAMES),
          help="decoding engine: static (default; CUDA graphs on GPU), compiled (+ torch.compile), eager "
               "(transformers' own layers, no graphs)")
    _flag(ap, "verify", action="store_true",
          help="also check the weight files' sha256 against the one their export recorded (~1 s per GB)")
    _flag(ap, "debug", action="store_true", help="show tracebacks of errors")
    return ap


def check_model_dir(path: str, checksums: bool = False) -> dict:
    """The checkpoint's config.json as a dict; raises :class:`UsageError` unless it is a bard_vl directory whose
    weight files are intact (:func:`~nemo_bard.models.verify.verify_model_dir`; their sha256 with ``checksums``)."""
    try:
        cfg = read_model_config(path, "--model", "pass a bard_vl checkpoint directory")
    except ModelPathError as exc:
        raise UsageError(str(exc)) from None
    if cfg is None:
        raise UsageError(f"--model {path}: no such directory; pass a local bard_vl checkpoint directory")
    if cfg.get("model_type") != "bard_vl":
        raise UsageError(
            f"--model {path}: config.json model_type is {cfg.get('model_type')!r}, not 'bard_vl'; convert an "
            f"autoregressive Qwen3-VL first: python -m nemo_bard.convert --src {path} --dst OUT"
        )
    verify_model_dir(path, checksums=checksums, what="--model checkpoint")
    return cfg


def check_sampling(args: argparse.Namespace) -> None:
    """Sampling flags: ``--temperature`` finite and >= 0, ``--top-p`` in (0, 1], ``--top-k`` >= 0."""
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1] (1 = off), got {args.top_p}")
    if args.top_k is not None and args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")


def check_names(args: argparse.Namespace) -> None:
    """``--engine`` and ``--remasking-strategy`` against the decoder's own lists (imports the generation package)."""
    for flag, value, valid in (("--engine", args.engine, ENGINES),
                               ("--remasking-strategy", args.remasking_strategy, REMASKING_STRATEGIES)):
        if value is not None and value not in valid:
            raise UsageError(f"{flag} {value!r} is not one of {', '.join(valid)}")


def check_args(args: argparse.Namespace) -> dict:
    """Validate paths and numbers before any heavy work; returns the checkpoint config."""
    cfg = check_model_dir(args.model, checksums=args.verify)
    check_sampling(args)
    for flag, paths in (("--image", args.image), ("--video", args.video)):
        for p in paths:
            if not Path(p).exists():
                raise UsageError(f"{flag} {p}: file not found; pass the path of an existing {flag[2:]}")
    if any(Path(p).is_file() for p in args.video):
        try:
            require_video_decoder()
        except VideoDecoderMissing as exc:
            raise UsageError(f"--video: {exc}; or pass a directory of frame images") from None
    if args.video_fps is not None and args.video_fps <= 0:
        raise UsageError(f"--video-fps must be > 0, got {args.video_fps}")
    for flag, value in (("--block-size", args.block_size), ("--denoising-steps", args.denoising_steps),
                        ("--max-new-tokens", args.max_new_tokens), ("--video-max-frames", args.video_max_frames)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.confidence_threshold is not None and not 0.0 <= args.confidence_threshold <= 1.0:
        raise UsageError(f"--confidence-threshold must be in [0, 1], got {args.confidence_threshold}")
    recorded = cfg.get("block_size")
    if args.block_size is not None and recorded is not None and args.block_size != recorded:
        print(
            f"nemo_bard.generate: warning: --block-size {args.block_size} differs from the checkpoint's block_size "
            f"{recorded} (config.json); decoding with {args.block_size} may lose accuracy",
            file=sys.stderr,
        )
    return cfg


def apply_model_defaults(args: argparse.Namespace, cfg: dict) -> None:
    """Fill the decoding flags left unset from the model directory's ``generation_config.json`` (its stored point,
    e.g. from ``python -m nemo_bard.eval --tune``), else S = B, tau 0.9; an explicit flag wins, field by field."""
    try:
        stored = read_decoding_defaults(args.model)
    except DefaultsError as exc:
        raise UsageError(str(exc)) from None

    block = int(args.block_size or cfg.get("block_size") or DEFAULT_BLOCK_SIZE)
    args.denoising_steps, args.remasking_strategy, args.confidence_threshold = stored.resolve(
        block, args.denoising_steps, args.remasking_strategy, args.confidence_threshold)


def run(args: argparse.Namespace) -> dict:
    """Load, decode, print; returns the statistics dict."""
    # the model stack (torch, transformers: ~8 s) loads once the arguments and files are checked
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import nemo_bard.models.modeling_bard_vl  # noqa: F401  (registers bard_vl with the Auto classes)
    from nemo_bard.generation import block_diffusion_generate
    from nemo_bard.generation.inputs import build_inputs, load_image, load_video, user_conversation

    try:
        device, dtype = resolve_device_dtype(args.device, args.dtype)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    images = [load_image(p) for p in args.image]
    processor = AutoProcessor.from_pretrained(args.model)
    sampling = VideoSampling.from_processor(processor.video_processor, fps=args.video_fps,
                                            max_frames=args.video_max_frames)
    videos = [load_video(p, sampling) for p in args.video]
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype).to(device).eval()
    inputs = build_inputs(processor, [user_conversation(args.prompt, images, videos, args.system)])
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(dtype)

    # see run's imports above
    from transformers import TextStreamer

    tokenizer = processor.tokenizer
    # committed blocks are printed as they arrive (transformers' TextStreamer holds back partial words)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if args.stream else None
    out = block_diffusion_generate(
        model, **inputs, max_new_tokens=args.max_new_tokens, block_size=args.block_size,
        denoising_steps=args.denoising_steps, remasking_strategy=args.remasking_strategy,
        confidence_threshold=args.confidence_threshold, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, streamer=streamer, engine=args.engine,
    )
    answer = tokenizer.decode(out.sequences[0, : out.lengths[0]].tolist(), skip_special_tokens=True)
    if streamer is None:
        print(answer, flush=True)
    block_size = args.block_size or model.config.block_size
    stats = out.stats()
    stats.update(
        answer=answer, model=str(args.model), block_size=block_size,
        denoising_steps=min(args.denoising_steps or block_size, block_size),
        remasking_strategy=args.remasking_strategy, confidence_threshold=args.confidence_threshold,
        temperature=args.temperature, max_new_tokens=args.max_new_tokens, device=str(device),
        dtype=str(dtype).replace("torch.", ""), prompt_tokens=int(inputs["input_ids"].shape[1]),
        video_frame_indices=[list(v.metadata.frames_indices) for v in videos],
    )
    if args.stats_json:
        Path(args.stats_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.stats_json).write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for usage errors, printed as one line)."""
    args = build_parser().parse_args(argv)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    try:
        cfg = check_args(args)  # no torch import up to here
        check_names(args)
        apply_model_defaults(args, cfg)
        from nemo_bard.generation.inputs import InputError

        try:
            run(args)
        except InputError as exc:
            raise UsageError(str(exc)).with_traceback(exc.__traceback__) from None
    except (UserError, KeyboardInterrupt) as exc:
        return report("nemo_bard.generate", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
