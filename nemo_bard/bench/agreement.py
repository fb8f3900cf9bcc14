"""Decoder numerics: the tokens one ``bard_vl`` model decodes in bf16 vs fp32, per engine.

    python -m nemo_bard.bench.agreement --model DIR [--data DATASET] [--rows 8] [--max-new-tokens 32]
        [--engine eager,static] [--threshold 0.9] [--batch-size 8] [--json OUT]

The same prompts are decoded greedily with the model loaded in fp32 and in bf16, at the model's block size with
``denoising_steps = block size`` and the given confidence threshold.

* Without ``--data``: ``nemo_bard.bench.decode``'s synthetic images and questions, ``--max-new-tokens`` each (eos
  ignored, so every row has the same length). On an off-task model most of these tokens follow no trained
  answer: confidences are near-ties and disagreement says little.
* With ``--data`` (a chat dataset: ``save_to_disk`` directory or JSONL, e.g. the demo's ``digits/test``): the
  first ``--rows`` prompts of the task the model was trained on, eos honoured: the answers as a user gets them.
  Also reported: exact match with the dataset's reference in each precision.

Reported per engine: rows whose answers are identical, and ``token_agreement``: the fraction of equal tokens
over each row's positions up to the longer of its two answers (eos included; the padding after both ends is not
counted, so two answers that stop at different places disagree there).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import nemo_bard.models.modeling_bard_vl  # noqa: F401  (registers bard_vl with the Auto classes)
from nemo_bard.bench.decode import prompt_batch
from nemo_bard.errors import run_reported
from nemo_bard.eval.evaluation import load_samples, stop_ids
from nemo_bard.eval.metrics import exact_match
from nemo_bard.generation import block_diffusion_generate
from nemo_bard.generation.inputs import build_inputs


def answer_agreement(a: Any, la: Any, b: Any, lb: Any) -> tuple[int, float]:
    """``(identical rows, token agreement)`` of two batches of answers ``[rows, T]`` with lengths ``[rows]``
    (tokens compared up to the longer answer of each row; positions past both answers are not counted)."""
    width = max(a.shape[1], b.shape[1])
    a, b = (torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1) for t in (a, b))
    span = torch.maximum(la, lb)
    counted = torch.arange(width)[None] < span[:, None]
    equal = (a == b) & counted
    same_rows = int((equal.sum(-1) == span).sum())
    return same_rows, float(equal.sum()) / max(int(counted.sum()), 1)


def _batches(processor: Any, data: str | None, rows: int, batch_size: int) -> tuple[list[dict], list[str] | None]:
    """Encoded prompt batches and, with ``data``, the references."""
    if data is None:
        return [prompt_batch(processor, rows)], None
    samples = load_samples(data, limit=rows)
    batches = [build_inputs(processor, [s.prompt for s in samples[i:i + batch_size]],
                            where=[s.where for s in samples[i:i + batch_size]])
               for i in range(0, len(samples), batch_size)]
    return batches, [s.reference for s in samples]


def agreement(model_dir: str, rows: int = 8, max_new_tokens: int = 32, engines: tuple[str, ...] = ("eager", "static"),
              threshold: float = 0.9, device: str | None = None, data: str | None = None,
              batch_size: int = 8) -> dict:
    """fp32 vs bf16 decoding of ``model_dir`` on ``rows`` prompts; a dict per engine plus the setting."""

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    processor = AutoProcessor.from_pretrained(model_dir)
    batches, references = _batches(processor, data, rows, batch_size)
    outputs: dict[tuple, tuple] = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        b = int(model.config.block_size)
        stops = [] if data is None else stop_ids(model, processor.tokenizer)
        for engine in engines:
            seqs, lens = [], []
            for enc in batches:
                batch = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in enc.items()}
                out = block_diffusion_generate(model, **batch, engine=engine, max_new_tokens=max_new_tokens,
                                               block_size=b, denoising_steps=b, confidence_threshold=threshold,
                                               eos_token_id=stops)
                seqs += list(out.sequences.cpu())
                lens += out.lengths.cpu().tolist()
            width = max(s.shape[0] for s in seqs)
            padded = torch.stack([torch.nn.functional.pad(s, (0, width - s.shape[0]), value=-1) for s in seqs])
            outputs[dtype, engine] = padded, torch.tensor(lens)
        del model
    def exact(seqs: Any, lengths: Any) -> float:  # exact match of the decoded answers with the references
        texts = processor.batch_decode([s[:n].tolist() for s, n in zip(seqs, lengths)], skip_special_tokens=True)
        return round(sum(exact_match(t.strip(), r) for t, r in zip(texts, references)) / len(texts), 5)

    report: dict[str, Any] = {"model": str(model_dir), "device": device, "data": data, "rows": len(lens),
                              "max_new_tokens": max_new_tokens, "threshold": threshold, "eos": data is not None}
    for engine in engines:
        (a, la), (b, lb) = outputs[torch.float32, engine], outputs[torch.bfloat16, engine]
        same, agree = answer_agreement(a, la, b, lb)
        report[engine] = {"same_sequences": same, "token_agreement": round(agree, 5)}
        if references is not None:
            report[engine].update(exact_match_fp32=exact(a, la), exact_match_bf16=exact(b, lb))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nemo_bard.bench.agreement", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="bard_vl checkpoint directory")
    ap.add_argument("--data", default=None, help="chat dataset of the model's task (eos honoured); default: synthetic")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8, help="rows per generation call with --data")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--engine", default="eager,static")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        print(f"nemo_bard.bench.agreement: error: --model {args.model}: no config.json", file=sys.stderr)
        return 2
    if args.data is not None and not Path(args.data).exists():
        print(f"nemo_bard.bench.agreement: error: --data {args.data}: no such file or directory", file=sys.stderr)
        return 2
    engines = tuple(e.strip() for e in args.engine.split(",") if e.strip())

    def run() -> int:  # a bad dataset row is one line naming it (nemo_bard.errors), not a traceback
        report = agreement(args.model, args.rows, args.max_new_tokens, engines, args.threshold, args.device,
                           args.data, args.batch_size)
        text = json.dumps(report, indent=2)
        print(text)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text + "\n")
        return 0

    return run_reported("nemo_bard.bench.agreement", run)


if __name__ == "__main__":
    sys.exit(main())
