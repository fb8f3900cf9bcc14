"""Decoder numerics: the tokens one ``bard_vl`` model decodes in bf16 vs fp32, per engine.

    python -m nemo_bard.bench.agreement --model DIR [--rows 8] [--max-new-tokens 32] [--engine eager,static]
        [--threshold 0.9] [--json OUT]

The same prompts (``nemo_bard.bench.decode``'s synthetic images and questions) are decoded greedily with the
model loaded in fp32 and in bf16, ``--max-new-tokens`` each (eos ignored), at the model's block size with
``denoising_steps = block size`` and the given confidence threshold. Reported per engine: how many rows decode
to identical sequences and the fraction of identical tokens. A trained model is meaningful here; on random
weights the confidences are near-ties and low agreement says little.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def agreement(model_dir: str, rows: int = 8, max_new_tokens: int = 32, engines: tuple[str, ...] = ("eager", "static"),
              threshold: float = 0.9, device: str | None = None) -> dict:
    """fp32 vs bf16 decoding of ``model_dir`` on ``rows`` prompts; a dict per engine plus the setting."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import nemo_bard  # noqa: F401  (registers bard_vl)
    from nemo_bard.bench.decode import prompt_batch
    from nemo_bard.generation import block_diffusion_generate

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    enc = {k: v.to(device) for k, v in prompt_batch(AutoProcessor.from_pretrained(model_dir), rows).items()}
    tokens = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        batch = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in enc.items()}
        b = int(model.config.block_size)
        for engine in engines:
            out = block_diffusion_generate(model, **batch, engine=engine, max_new_tokens=max_new_tokens, block_size=b,
                                           denoising_steps=b, confidence_threshold=threshold, eos_token_id=[])
            tokens[dtype, engine] = out.sequences.cpu()
        del model
    report = {"model": str(model_dir), "device": device, "rows": rows, "max_new_tokens": max_new_tokens,
              "threshold": threshold}
    for engine in engines:
        a, b = tokens[torch.float32, engine], tokens[torch.bfloat16, engine]
        same = a.shape == b.shape
        report[engine] = {"same_sequences": int((a == b).all(-1).sum()) if same else 0,
                          "token_agreement": float((a == b).float().mean()) if same else 0.0}
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nemo_bard.bench.agreement", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="bard_vl checkpoint directory")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--engine", default="eager,static")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        print(f"nemo_bard.bench.agreement: error: --model {args.model}: no config.json", file=sys.stderr)
        return 2
    engines = tuple(e.strip() for e in args.engine.split(",") if e.strip())
    report = agreement(args.model, args.rows, args.max_new_tokens, engines, args.threshold, args.device)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
