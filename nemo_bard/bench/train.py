"""Training-step benchmark at real shapes: NeMo's AR SFT step vs the BARD PBM step on the same samples.

    python -m nemo_bard.bench.train [--preset qwen3vl_2b|qwen3vl_4b|qwen3vl_8b|tiny] [--batch-size 4]
        [--prompt-tokens 4096] [--response-tokens 1024] [--block-size 32] [--max-length N] [--iters 3]
        [--variants ar,bard_dense,bard_flex,ar_ac,bard_dense_ac,bard_flex_ac] [--peak-tflops T]
        [--isolate] [--json OUT] [--markdown OUT]

The model is a randomly initialised Qwen3-VL of a real shape built directly on the device
(:mod:`nemo_bard.bench.presets`: an AR model and its ``bard_vl`` view share the weights; nothing is
downloaded). Default: ``qwen3vl_2b``, batch 4, one 224x224 image and a 4096-token prompt (image tokens
included) plus a 1024-token response per row, B = 32, on a GPU; the ``tiny`` preset with 96 + 64 tokens on
a CPU (seconds). Every variant takes the same batch and AdamW (lr 0: the full optimizer work, unchanged
weights, so every variant sees the same model and the first-step losses are comparable):

* ``ar``: the step NeMo AutoModel's VLM SFT recipe runs: transformers' Qwen3-VL with its own 2-D padding
  mask (it builds the causal mask and mRoPE positions itself), full ``[B, L, V]`` logits and NeMo's
  ``MaskedCrossEntropy`` on the shifted response labels;
* ``bard_dense``: the BARD layout ``[prompt | clean | noisy]``, the dense ``[B,1,L,L]`` block mask built on
  the device, logits only at masked positions, the 1/t-weighted loss: the PBM recipe's own ``prepare_step`` and
  ``forward_loss`` (``BardPBMRecipe.for_model``);
* ``bard_flex``: the same with the text attention in FlexAttention mode and a ``BlockMask`` built on the
  device with a compiled ``create_block_mask`` (GPU only: FlexAttention has no CPU backward);
* ``*_ac``: the same with NeMo AutoModel's activation checkpointing (what ``distributed.activation_checkpointing:
  true`` applies on one device: attention and MLP of every block recompute in backward).

Reported per variant (median of ``--iters`` timed steps after one warm-up step): step time; **tokens/s**,
where a token is one real token of the training data (prompt incl. image placeholder tokens, plus response
incl. ``<|im_end|>``; padding excluded), the same count for every variant; ``positions/s`` (non-padding
positions the text decoder forwards: P+R for AR, P+2R for BARD); **MFU** = 6 N tokens / (step time x peak
bf16 FLOP/s) with N the model's distinct parameters (vision tower and embeddings included; attention FLOPs
not counted), peak from a table (H100/H200/A100/B200) or ``--peak-tflops``; ``mfu_positions`` the same with
positions; peak memory (CUDA ``max_memory_allocated``); and ratios against AR (same activation-checkpointing
setting) and flex against dense. A variant that runs out of memory is reported as such. Variants run in this
process one after another (memory freed and the peak reset in between; the activation-checkpointed ones
last); ``--isolate`` runs each in its own process (on a CPU, peak RSS above a load-only baseline).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from nemo_bard.bench.presets import build_preset, num_parameters
from nemo_bard.data.collate import bard_collate_fn
from nemo_bard.integrations.nemo import (
    MaskedCrossEntropy,  # NeMo's VLM SFT loss
    apply_activation_checkpointing,
    checkpointed_modules,
)
from nemo_bard.models.loading import resolve_device_dtype
from nemo_bard.models.modeling_bard_vl import text_attn_implementation
from nemo_bard.recipes.pbm import BardPBMRecipe
from nemo_bard.tiny import build_processor, build_tokenizer  # the processor of every preset

VARIANTS = ("ar", "bard_dense", "bard_flex", "ar_ac", "bard_dense_ac", "bard_flex_ac")
DEFAULT_VARIANTS = "ar,bard_dense,bard_flex,bard_dense_ac,bard_flex_ac"
FLEX_ATTENTION = {"text_config": "flex_attention", "vision_config": "sdpa", "": "sdpa"}
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by device-name fragment (first match wins).
PEAK_BF16_TFLOPS = (("H200", 989.4), ("GH200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
                    ("H100", 989.4), ("H800", 989.4), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1))
SIZES = {"tiny": (96, 64), "default": (4096, 1024)}  # (prompt, response) tokens when not given


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a device from :data:`PEAK_BF16_TFLOPS` (None when unknown)."""
    return next((t for key, t in PEAK_BF16_TFLOPS if key in device_name), None)


def _single_token_words(tokenizer) -> list[str]:
    """Words that are exactly one token with their leading space (so a prompt of n of them is n tokens)."""
    vocab = tokenizer.get_vocab()
    words = [tokenizer.convert_tokens_to_string([t]) for t in vocab if t.startswith("Ġ") and t[1:].isascii()
             and t[1:].isalpha()]
    return sorted(words) or [" a"]


def _rows(n: int, prompt_words: int, response_words: int, words: list[str], seed: int) -> list[dict]:
    rng, rnd = np.random.default_rng(seed), random.Random(seed)
    rows = []
    for _ in range(n):
        img = Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
        prompt = "".join(rnd.choice(words) for _ in range(prompt_words))
        answer = "".join(rnd.choice(words) for _ in range(response_words))
        rows.append({"conversation": [
            {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]})
    return rows


def processor_batch(processor, batch_size: int, prompt_tokens: int, response_tokens: int, seed: int = 0) -> dict:
    """A collated batch (``bard_collate_fn``) of rows with one 224x224 image, exactly ``prompt_tokens`` prompt
    tokens (chat template and image placeholders included) and ``response_tokens`` response tokens (incl.
    ``<|im_end|>``) each, when the lengths leave room for the template."""
    words = _single_token_words(processor.tokenizer)
    probe = bard_collate_fn(_rows(1, 1, 1, words, seed), processor)  # template + image overhead of 1 + 1 words
    p_words = max(prompt_tokens - int(probe["prefix_lens"][0]) + 1, 1)
    r_words = max(response_tokens - int(probe["response_lens"][0]) + 1, 1)
    return bard_collate_fn(_rows(batch_size, p_words, r_words, words, seed), processor)


def ar_inputs(pre: dict, pad_id: int) -> dict:
    """NeMo's VLM SFT batch: ``[prompt | response]`` right-padded, 2-D padding mask, shifted response labels."""
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


class Bench:
    """The models, the batch and the step of every variant, in one process."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device, self.dtype = resolve_device_dtype(args.device, "auto")  # bf16 on CUDA, fp32 on CPU
        t0 = time.perf_counter()
        self.ar, self.bard, self.processor = build_preset(args.preset, self.device, self.dtype, args.block_size)
        self.build_s = time.perf_counter() - t0
        self.num_params = num_parameters(self.bard)
        for model in (self.ar, self.bard):
            model.train()
            model.config.use_cache = False
        self.pre = processor_batch(self.processor, args.batch_size, args.prompt_tokens, args.response_tokens)
        self.ac_applied, self.ac_modules = False, None

    # ----------------------------------------------------------------------------- steps
    def ar_step(self) -> tuple[Callable[[], torch.Tensor], dict]:
        batch = {k: v.to(self.device) for k, v in ar_inputs(self.pre, self.processor.tokenizer.pad_token_id).items()}
        labels = batch.pop("labels")
        n_labels = int((labels != -100).sum())
        loss_fn = MaskedCrossEntropy()

        def step() -> torch.Tensor:
            logits = self.ar(**batch).logits  # [B, L, V]
            return loss_fn(logits=logits, labels=labels, num_label_tokens=n_labels)

        positions = int(batch["attention_mask"].sum())
        return step, {"seq_len": int(batch["input_ids"].shape[1]), "positions": positions}

    def bard_step(self, backend: str) -> tuple[Callable[[], torch.Tensor], dict]:
        """The PBM recipe's own step pieces (``prepare_step``: layout, noise, mask; ``forward_loss``)."""
        self.bard.set_attn_implementation(FLEX_ATTENTION if backend == "flex" else "sdpa")
        want = "flex_attention" if backend == "flex" else "sdpa"
        if text_attn_implementation(self.bard) != want:
            raise RuntimeError(f"text attention is {text_attn_implementation(self.bard)}, expected {want}")
        bard = {"block_size": self.args.block_size, "max_length": self.args.max_length, "mask_backend": backend,
                "flex_compile": self.device.type == "cuda"}
        recipe = BardPBMRecipe.for_model(self.bard, self.processor, bard, device=self.device)
        (built,), denominator = recipe.prepare_step([self.pre], step=0)

        def step() -> torch.Tensor:
            return recipe.forward_loss(self.bard, built, denominator, is_train=True)[0]

        positions = int((built.prefix_lens + 2 * built.resp_lens).sum())
        return step, {"seq_len": built.seq_len, "positions": positions, "loss_positions": built.num_loss_tokens,
                      "dropped": built.num_dropped}

    def apply_activation_checkpointing(self) -> None:
        if not self.ac_applied:
            self.ar = apply_activation_checkpointing(self.ar)
            self.bard = apply_activation_checkpointing(self.bard)
            self.ac_modules = checkpointed_modules(self.bard)
            self.ac_applied = True

    # ------------------------------------------------------------------------- a variant
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _free(self) -> None:
        for model in (self.ar, self.bard):
            model.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def run(self, variant: str) -> dict:
        """Warm-up + ``iters`` timed optimizer steps of one variant; a dict of its measurements."""
        if variant.endswith("_ac"):
            self.apply_activation_checkpointing()
        self._free()
        base = variant.removesuffix("_ac")
        model = self.ar if base == "ar" else self.bard
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # full optimizer work, unchanged weights
        result: dict[str, Any] = {"variant": variant, "activation_checkpointing": variant.endswith("_ac"),
                                  "num_parameters": self.num_params, "build_s": round(self.build_s, 2)}
        try:
            step, info = self.ar_step() if base == "ar" else self.bard_step(base.split("_")[1])
            result.update(info)

            def one() -> tuple[float, float]:
                self._sync()
                t = time.perf_counter()
                loss = step()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                self._sync()
                return time.perf_counter() - t, float(loss.detach())

            warm_s, result["loss"] = one()  # warm-up (and FlexAttention compilation on a GPU)
            times = [one()[0] for _ in range(self.args.iters)]
            result.update(warmup_s=round(warm_s, 4), step_s=statistics.median(times),
                          step_s_all=[round(t, 4) for t in times])
            if self.device.type == "cuda":
                result["peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
            if self.ac_applied:
                result["checkpointed_modules"] = self.ac_modules
        except torch.OutOfMemoryError as exc:
            result["error"] = f"out of memory: {str(exc).splitlines()[0]}"
        finally:
            del opt
            self._free()
        return result


def _derive(report: dict, peak: float | None) -> None:
    """Tokens/s, MFU and the ratios, in place."""
    tokens, n = report["tokens"], report["num_parameters"]
    rows = report["variants"]
    for r in rows.values():
        if "step_s" not in r:
            continue
        r["tokens_per_s"] = tokens / r["step_s"]
        r["positions_per_s"] = r["positions"] / r["step_s"]
        r["mfu"] = 6 * n * tokens / r["step_s"] / (peak * 1e12) if peak else None
        r["mfu_positions"] = 6 * n * r["positions"] / r["step_s"] / (peak * 1e12) if peak else None
    for name, r in rows.items():
        ac = "_ac" if name.endswith("_ac") else ""
        ar, dense = rows.get("ar" + ac, {}), rows.get("bard_dense" + ac, {})
        if "step_s" in r and "step_s" in ar:
            r["time_vs_ar"] = r["step_s"] / ar["step_s"]
            if r.get("peak_gb") and ar.get("peak_gb"):
                r["memory_vs_ar"] = r["peak_gb"] / ar["peak_gb"]
        if name.startswith("bard_flex") and "step_s" in r and "step_s" in dense:
            r["time_vs_dense"] = r["step_s"] / dense["step_s"]
            if r.get("peak_gb") and dense.get("peak_gb"):
                r["memory_vs_dense"] = r["peak_gb"] / dense["peak_gb"]


def markdown(report: dict) -> str:
    """The report as a markdown table."""
    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    lines = [f"Training step, {report['preset']} ({report['num_parameters'] / 1e9:.2f} B parameters, random), "
             f"{report['device']}, {report['dtype']}; batch {report['batch_size']}, prompt {report['prompt_tokens']} + "
             f"response {report['response_tokens']} tokens per row (mean), B {report['block_size']}; "
             f"{report['tokens']} data tokens per step; median of {report['iters']} steps.", "",
             "| variant | seq len | step s | × AR | × dense | tokens/s | MFU | MFU (positions) | peak GB | mem × AR | loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["variants"].items():
        if "step_s" not in r:
            lines.append(f"| {name} | {r.get('seq_len', '–')} | {r.get('error', 'skipped')} |||||||||")
            continue
        mfu = None if r.get("mfu") is None else 100 * r["mfu"]
        mfu_p = None if r.get("mfu_positions") is None else 100 * r["mfu_positions"]
        lines.append(
            f"| {name} | {r['seq_len']} | {r['step_s']:.3f} | {f(r.get('time_vs_ar'), '.2f')} | "
            f"{f(r.get('time_vs_dense'), '.2f')} | {r['tokens_per_s']:,.0f} | {f(mfu, '.1f')}{'' if mfu is None else ' %'} | "
            f"{f(mfu_p, '.1f')}{'' if mfu_p is None else ' %'} | {f(r.get('peak_gb'), '.1f')} | "
            f"{f(r.get('memory_vs_ar'), '.2f')} | {r['loss']:.4f} |")
    for note in report["notes"].values():
        lines.append(f"\n{note}")
    return "\n".join(lines) + "\n"


def _isolated(args: argparse.Namespace, variant: str) -> dict:
    """Run one variant (or ``baseline``: build only) in a fresh process; its JSON result."""
    argv = [sys.executable, "-m", "nemo_bard.bench.train", "--preset", args.preset, "--batch-size",
            str(args.batch_size), "--prompt-tokens", str(args.prompt_tokens), "--response-tokens",
            str(args.response_tokens), "--block-size", str(args.block_size), "--iters", str(args.iters),
            "--_worker", variant] + (["--max-length", str(args.max_length)] if args.max_length else [])
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"variant": variant, "error": f"process failed: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(line[7:])


def _worker(args: argparse.Namespace) -> dict:
    bench = Bench(args)
    result = {"variant": "baseline"} if args._worker == "baseline" else bench.run(args._worker)
    result.update(num_parameters=bench.num_params, build_s=round(bench.build_s, 2),
                  peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
    return result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m nemo_bard.bench.train", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="qwen3vl_2b | qwen3vl_4b | qwen3vl_8b | tiny "
                    "(default: qwen3vl_2b on a GPU, tiny on a CPU)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=None, help="per row, image tokens included (4096; tiny: 96)")
    ap.add_argument("--response-tokens", type=int, default=None, help="per row, incl. <|im_end|> (1024; tiny: 64)")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=None, help="bard.max_length: cut responses so P + 2R fits")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated from {', '.join(VARIANTS)}")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU (default: table)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--isolate", action="store_true", help="each variant in its own process")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    cuda = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
    args.preset = args.preset or ("qwen3vl_2b" if cuda else "tiny")
    sizes = SIZES["tiny" if args.preset == "tiny" else "default"]
    args.prompt_tokens = args.prompt_tokens or sizes[0]
    args.response_tokens = args.response_tokens or sizes[1]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"nemo_bard.bench.train: --variants {bad[0]!r} is not one of {', '.join(VARIANTS)}")
    if args._worker:
        print("RESULT " + json.dumps(_worker(args)), flush=True)
        return {}
    notes = {}
    if not cuda and any("flex" in v for v in variants):
        variants = [v for v in variants if "flex" not in v]
        notes["bard_flex"] = "bard_flex: skipped (FlexAttention has no backward on a CPU; run on a GPU)"
    variants = sorted(variants, key=lambda v: (v.endswith("_ac"), VARIANTS.index(v)))  # checkpointing last
    device_name = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"
    peak = args.peak_tflops or (peak_tflops(device_name) if cuda else None)
    if cuda and peak is None:
        notes["mfu"] = f"MFU: no peak FLOP/s known for {device_name}; pass --peak-tflops"
    bench = None if args.isolate else Bench(args)
    results = {}
    for v in variants:
        results[v] = _isolated(args, v) if args.isolate else bench.run(v)
        print(f"[bench.train] {v}: " + json.dumps({k: results[v].get(k) for k in ("step_s", "peak_gb", "loss", "error")}),
              flush=True)
    memory = "cuda max_memory_allocated" if cuda else None
    if args.isolate and not cuda:  # peak RSS of each variant's process above a build-only process
        base = _isolated(args, "baseline").get("peak_rss_gb", 0.0)
        for r in results.values():
            if "peak_rss_gb" in r:
                r["peak_gb"] = r["peak_rss_gb"] - base
        memory = "peak RSS above a build-only process"

    pre = bench.pre if bench is not None else processor_batch(
        build_processor(build_tokenizer()), args.batch_size, args.prompt_tokens, args.response_tokens)
    first = next((r for r in results.values() if "num_parameters" in r), {})
    report = {
        "device": device_name, "dtype": "bfloat16" if cuda else "float32", "preset": args.preset,
        "num_parameters": bench.num_params if bench is not None else first.get("num_parameters", 0),
        "build_s": bench.build_s if bench is not None else first.get("build_s"),
        "batch_size": args.batch_size, "block_size": args.block_size, "max_length": args.max_length,
        "prompt_tokens": float(pre["prefix_lens"].float().mean()),
        "response_tokens": float(pre["response_lens"].float().mean()),
        "tokens": int((pre["prefix_lens"] + pre["response_lens"]).sum()), "iters": args.iters,
        "token_definition": "one real token of the training data: prompt (image placeholder tokens included) + "
                            "response (incl. <|im_end|>), padding excluded; the same count for every variant",
        "mfu_definition": "6 * num_parameters * tokens / (step_s * peak bf16 FLOP/s); mfu_positions counts the "
                          "positions the text decoder forwards (AR: P+R, BARD: P+2R) instead of tokens",
        "peak_tflops": peak, "memory_measure": memory, "isolated": args.isolate,
        "variants": results, "notes": notes,
    }
    _derive(report, peak)
    text = json.dumps(report, indent=2)
    table = markdown(report)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)
    if not args.json:
        print(text)
    return report


if __name__ == "__main__":
    main()
