"""Training-step benchmark: BARD PBM step vs an autoregressive SFT step on the same batch.

    python -m nemo_bard.bench.train [--model BARD_DIR] [--batch-size 4] [--prompt-tokens 256]
                                    [--response-tokens 256] [--block-size 32] [--iters 5] [--json OUT]

Both steps use the same weights, the same samples (images + prompt + response) and AdamW:

* ``ar``: NeMo AutoModel's VLM SFT step shape: one causal forward over ``[prompt | response]``
  with full ``[B, L, V]`` logits and ``MaskedCrossEntropy`` on the shifted response labels;
* ``bard_dense``: the BARD layout ``[prompt | clean | noisy]`` (twice the response), the dense
  ``[B,1,L,L]`` block mask, logits only at masked positions, the 1/t-weighted loss;
* ``bard_flex``: the same with a FlexAttention ``BlockMask`` (text attention in flex mode; GPU only,
  since FlexAttention has no CPU backward).

Each variant runs in its own process (so peak memory is its own: CUDA peak allocated on GPU,
peak RSS above a load-only baseline on CPU) and the script prints time and memory ratios
against ``ar`` as JSON, measured side by side in one run. Without ``--model`` it builds the
tiny offline model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = ("baseline", "ar", "bard_dense", "bard_flex")


def _tiny_model(tmp: Path) -> Path:
    from nemo_bard.convert import convert
    from nemo_bard.tiny import write_tiny_model

    return convert(write_tiny_model(tmp / "ar", preset="demo"), tmp / "bard", block_size=32)


def _processor_batch(processor, batch_size: int, prompt_tokens: int, response_tokens: int, seed: int = 0):
    """A batch of image + text prompts and responses of fixed token lengths (prompt length incl. image tokens)."""
    import numpy as np
    from PIL import Image

    from nemo_bard.data.collate import bard_collate_fn

    rng = np.random.default_rng(seed)
    tok = processor.tokenizer
    words = [w for w in tok.get_vocab() if w.isalpha()][:200] or ["a"]
    rows = []
    for _ in range(batch_size):
        img = Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))  # 49 visual tokens
        prompt = " ".join(rng.choice(words, max(prompt_tokens - 70, 1)))
        answer = " ".join(rng.choice(words, response_tokens))
        rows.append({"conversation": [
            {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]})
    return bard_collate_fn(rows, processor)


def _ar_inputs(pre: dict, pad_id: int) -> dict:
    """[prompt | response] right-padded, with NeMo-style shifted labels on the response."""
    n = pre["prefix_ids"].shape[0]
    lens = pre["prefix_lens"] + pre["response_lens"]
    length = int(lens.max())
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    mm = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        p, r = int(pre["prefix_lens"][i]), int(pre["response_lens"][i])
        ids[i, :p] = pre["prefix_ids"][i, :p]
        ids[i, p : p + r] = pre["response_ids"][i, :r]
        mm[i, :p] = pre["mm_token_type_ids"][i, :p]
        labels[i, p - 1 : p + r - 1] = pre["response_ids"][i, :r]
    attn = (torch.arange(length)[None] < lens[:, None]).long()
    return {"input_ids": ids, "attention_mask": attn, "mm_token_type_ids": mm, "labels": labels,
            "pixel_values": pre["pixel_values"], "image_grid_thw": pre["image_grid_thw"]}


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(variant: str, model_dir: str, args: argparse.Namespace) -> dict:
    """Time ``args.iters`` optimizer steps of one variant (after one warm-up step) in this process."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import nemo_bard  # noqa: F401
    from nemo_automodel.components.loss.masked_ce import MaskedCrossEntropy
    from nemo_bard.data.layout import MODEL_INPUT_KEYS, BlockLayout
    from nemo_bard.loss.denoise import MaskedDenoisingLoss, num_loss_samples

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as in training on CPU (nemo_bard.integrations.cpu)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attn = {"text_config": "flex_attention", "vision_config": "sdpa", "": "sdpa"} if variant == "bard_flex" else "sdpa"
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn).to(device)
    processor = AutoProcessor.from_pretrained(model_dir)
    pre = _processor_batch(processor, args.batch_size, args.prompt_tokens, args.response_tokens)
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    if variant == "baseline":
        return {"variant": variant, "peak_mb": _peak_memory_mb()}
    if variant == "ar":
        batch = {k: v.to(device) for k, v in _ar_inputs(pre, processor.tokenizer.pad_token_id).items()}
        ce = MaskedCrossEntropy()
        pos, _ = model.rope_positions(batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"],
                                      batch["image_grid_thw"])
        mask = torch.tril(torch.ones(batch["input_ids"].shape[1], batch["input_ids"].shape[1], dtype=torch.bool,
                                     device=device))[None, None] & batch["attention_mask"].bool()[:, None, None, :]
        tokens = int(batch["attention_mask"].sum())

        def step() -> torch.Tensor:
            out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos,
                        mm_token_type_ids=batch["mm_token_type_ids"], pixel_values=batch["pixel_values"],
                        image_grid_thw=batch["image_grid_thw"])
            n = int((batch["labels"] != -100).sum())
            return ce(out.logits, batch["labels"], num_label_tokens=n)
    else:
        layout = BlockLayout(args.block_size, model.config.mask_token_id, im_end,
                             mask_backend="flex" if variant == "bard_flex" else "dense",
                             flex_compile=device.type == "cuda")
        built = layout.build(pre, list(range(args.batch_size)), model.rope_positions)
        inputs = {k: (built[k].to(device) if isinstance(built[k], torch.Tensor) else built[k])
                  for k in MODEL_INPUT_KEYS if k in built}
        lm = built["loss_mask"].to(device)
        loss_fn = MaskedDenoisingLoss()
        tokens = int((built["attention_mask"].sum(-1) > 1).sum()) if variant == "bard_dense" else int(lm.numel())

        def step() -> torch.Tensor:
            out = model(**inputs, logits_mask=lm)
            return loss_fn(out.logits, built["targets"].to(device)[lm], built["loss_weights"].to(device)[lm],
                           lm.nonzero()[:, 0], lm.shape[0], float(num_loss_samples(lm))).loss

    def one() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    one()  # warm-up (and Flex compilation on GPU)
    times = [one() for _ in range(args.iters)]
    return {"variant": variant, "step_s": sorted(times)[len(times) // 2], "peak_mb": _peak_memory_mb(),
            "seq_len": int(inputs["input_ids"].shape[1]) if variant != "ar" else int(batch["input_ids"].shape[1]),
            "tokens": tokens}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m nemo_bard.bench.train", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="bard_vl checkpoint dir (default: tiny offline model)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--response-tokens", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--variants", default="ar,bard_dense,bard_flex")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        print("RESULT " + json.dumps(run_variant(args._worker, args.model, args)), flush=True)
        return {}
    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model or str(_tiny_model(Path(tmp.name)))
    base = [sys.executable, "-m", "nemo_bard.bench.train", "--model", model_dir, "--batch-size", str(args.batch_size),
            "--prompt-tokens", str(args.prompt_tokens), "--response-tokens", str(args.response_tokens),
            "--block-size", str(args.block_size), "--iters", str(args.iters)]
    results, notes = {}, {}
    variants = args.variants.split(",")
    if "bard_flex" in variants and not torch.cuda.is_available():
        variants.remove("bard_flex")
        notes["bard_flex"] = "skipped: FlexAttention has no backward on CPU (run on a GPU)"
    for variant in ("baseline", *variants):
        proc = subprocess.run([*base, "--_worker", variant], capture_output=True, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(line[7:])
    base_mb = 0.0 if torch.cuda.is_available() else results["baseline"]["peak_mb"]
    ar = results["ar"]
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "batch_size": args.batch_size, "prompt_tokens": args.prompt_tokens, "response_tokens": args.response_tokens,
        "block_size": args.block_size, "model": args.model or "tiny (demo preset)",
        "memory_measure": "cuda max_memory_allocated" if torch.cuda.is_available() else "peak RSS above load-only baseline",
        "variants": {k: v for k, v in results.items() if k != "baseline"},
        "notes": notes,
    }
    for k, v in report["variants"].items():
        v["time_vs_ar"] = v["step_s"] / ar["step_s"]
        v["memory_vs_ar"] = (v["peak_mb"] - base_mb) / max(ar["peak_mb"] - base_mb, 1e-6)
    if "bard_flex" in results and "bard_dense" in results:
        report["flex_vs_dense_time"] = results["bard_flex"]["step_s"] / results["bard_dense"]["step_s"]
        report["flex_vs_dense_memory"] = (results["bard_flex"]["peak_mb"] - base_mb) / max(
            results["bard_dense"]["peak_mb"] - base_mb, 1e-6)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
