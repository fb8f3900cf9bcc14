"""Where the time of one decoding forward goes: kernels per forward and GPU-busy time, with and without graphs.

    python -m nemo_bard.bench.profile [--preset qwen3vl_2b] [--batch 1] [--point 32:4:0.9] [--max-new-tokens 64]
        [--engine static] [--top 15] [--json OUT]

Decodes the same prompts twice with ``--engine`` (after an untimed warm-up): once as it runs normally (CUDA
graphs on a GPU) and once with graphs off under ``torch.profiler``, and reports per decoding forward the wall
time with graphs, the number of GPU kernels, the summed kernel time and the launch-bound wall time without
graphs, plus the ``--top`` kernels by total time. Many small kernels per forward (each a few microseconds even
when replayed from a graph) is what operator fusion (``--engine compiled``) removes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

from nemo_bard.bench.decode import load_models, prompt_batch
from nemo_bard.generation import block_diffusion_generate
from nemo_bard.generation.engine import DecodeEngine
from nemo_bard.generation.points import parse_points
from nemo_bard.models.loading import resolve_device_dtype


def profile(preset: str | None = "qwen3vl_2b", batch: int = 1, point: str = "32:4:0.9", max_new_tokens: int = 64,
            engine: str = "static", top: int = 15, device: str | None = None, dtype: str | None = None) -> dict:
    """Profile ``engine`` on ``preset`` (default: the tiny test models); returns the report."""

    (p,) = parse_points(point)
    dev, dt = resolve_device_dtype(device, dtype)
    with tempfile.TemporaryDirectory(prefix="bard_profile_") as tmp:
        args = argparse.Namespace(preset=preset, model=None, ar_model=None)
        _, model, processor, description = load_models(args, dev, dt, p.block_size, Path(tmp))
    enc = {k: (v.to(dev, dt) if v.is_floating_point() else v.to(dev)) for k, v in prompt_batch(processor, batch).items()}
    kw = dict(max_new_tokens=max_new_tokens, block_size=p.block_size, denoising_steps=p.denoising_steps,
              remasking_strategy=p.remasking_strategy, confidence_threshold=p.threshold, eos_token_id=[], engine=engine)

    def decode() -> Any:
        return block_diffusion_generate(model, **kw, **enc)

    decode()  # warm-up: compilation, graph capture
    graphed = decode()
    kw["engine"] = DecodeEngine(model, engine, cuda_graphs=False)  # the same engine, graphs off
    unprofiled = decode()  # warm-up without graphs, and the wall time of a forward without them
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        out = decode()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    forwards = max(out.decode_forwards, 1)
    busy_ms = sum(e.device_time for e in kernels) / 1e3
    table = prof.key_averages().table(sort_by="cuda_time_total" if kernels else "cpu_time_total", row_limit=top)
    return {
        "models": description, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(dt).removeprefix("torch."), "engine": engine, "batch": batch, "point": p.label,
        "decode_forwards": out.decode_forwards, "ms_per_forward_graphs": graphed.ms_per_forward,
        "ms_per_forward_no_graphs": unprofiled.ms_per_forward,
        "kernels_per_forward": round(len(kernels) / forwards, 1),
        "kernel_ms_per_forward": round(busy_ms / forwards, 3),
        "top_kernels": table,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nemo_bard.bench.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="qwen3vl_2b, qwen3vl_4b, qwen3vl_8b (default: tiny test models)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--point", default="32:4:0.9", help="BLOCK:STEPS:THRESHOLD")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--engine", default="static", choices=("static", "compiled"))
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    report = profile(args.preset, args.batch, args.point, args.max_new_tokens, args.engine, args.top, args.device,
                     args.dtype)
    print(report.pop("top_kernels") if not args.json else report["top_kernels"])
    print(json.dumps({k: v for k, v in report.items() if k != "top_kernels"}, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
