"""Offline end-to-end demo: AR VLM -> PBM -> SWD -> accuracy-at-speed report, on 2 CPU cores.

    python -m nemo_bard.demo [--out outputs/demo] [--quick]

1. builds a ~1M-parameter random-init Qwen3-VL (``nemo_bard.tiny --preset demo``) and the digits-OCR
   task from scikit-learn's bundled scans (``nemo_bard.data.digits``, split by source scan);
2. trains it autoregressively with NeMo AutoModel's own ``FinetuneRecipeForVLM``
   (``automodel finetune --config conf/demo_ar.yaml``): the "pretrained AR VLM";
3. converts it to ``bard_vl`` (``nemo_bard.convert``);
4. runs PBM 4 -> 8 -> 16 in one run (``automodel finetune --config conf/bard_demo.yaml``);
5. runs SWD, B16 student from the PBM export, B4 anchor (``... conf/bard_demo.yaml stage=swd``);
6. evaluates AR and every stage on held-out scans (``nemo_bard.eval``) and writes
   ``<out>/report/results.{json,md,png}``.

Every stage is an ordinary CLI run over the normal configs (the commands are printed), so the demo
is a thin script over the product. ``--quick`` is the CI-sized variant (seconds per stage; it checks
the plumbing, not accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf"


def _run(cmd: list[str], log: Path) -> float:
    """Run one stage as a subprocess (its output goes to ``log``); returns its wall time."""
    print("  $ " + " ".join(cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"nemo_bard.demo: stage failed (exit {proc.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - t


def _automodel(*args: str) -> list[str]:
    return [sys.executable, "-m", "nemo_bard.cli", "finetune", *args]


def _last_losses(jsonl: Path, n: int = 20) -> float:
    recs = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    tail = recs[-n:]
    return sum(r["loss"] for r in tail) / max(len(tail), 1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m nemo_bard.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/demo", help="output directory (replaced if it exists)")
    ap.add_argument("--quick", action="store_true", help="CI-sized run: a few steps per stage, small data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ar-steps", type=int, default=None)
    ap.add_argument("--pbm-steps", default=None, help="steps of the B4,B8,B16 stages, e.g. 400,300,300")
    ap.add_argument("--swd-steps", type=int, default=None)
    ap.add_argument("--train-rows", type=int, default=None)
    ap.add_argument("--test-rows", type=int, default=None)
    ap.add_argument("--threshold", type=float, default=0.9, help="confidence threshold of the fast setting")
    args = ap.parse_args(argv)
    if not (CONF / "bard_demo.yaml").is_file():
        raise SystemExit(f"nemo_bard.demo: config directory {CONF} not found; run from a source checkout "
                         "(pip install -e .)")

    q = args.quick
    ar_steps = args.ar_steps or (6 if q else 1500)
    pbm = [int(s) for s in (args.pbm_steps or ("2,2,2" if q else "400,300,300")).split(",")]
    swd_steps = args.swd_steps or (3 if q else 400)
    train_rows, test_rows = args.train_rows or (64 if q else 2000), args.test_rows or (16 if q else 200)
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    print(f"[1/6] tiny Qwen3-VL + digits task -> {out}", flush=True)
    t = time.perf_counter()
    from nemo_bard.data.digits import main as digits_main
    from nemo_bard.tiny import write_tiny_model

    write_tiny_model(out / "ar_init", preset="demo", seed=args.seed)
    digits_main([str(out / "digits"), "--train", str(train_rows), "--test", str(test_rows), "--seed", str(args.seed)])
    times["setup"] = time.perf_counter() - t

    root = f"paths.run_root={out}"
    print(f"[2/6] AR SFT with NeMo's FinetuneRecipeForVLM ({ar_steps} steps)", flush=True)
    times["ar_sft"] = _run(_automodel("--config", str(CONF / "demo_ar.yaml"), root,
                                      f"step_scheduler.max_steps={ar_steps}",
                                      f"lr_scheduler.lr_warmup_steps={min(50, ar_steps - 1)}"), out / "logs" / "ar_sft.log")
    ar_dir = (out / "ar_sft" / "LATEST" / "model" / "consolidated").resolve()
    ar_loss = _last_losses(out / "ar_sft" / "training.jsonl")
    if not q and ar_loss > 1.0:
        print(f"  warning: AR training loss is still {ar_loss:.2f} (~ln 10 means guessing); the AR model has "
              "not broken out of the plateau -- rerun with another --seed or more --ar-steps", flush=True)

    print("[3/6] convert AR -> bard_vl", flush=True)
    from nemo_bard.convert import convert

    convert(ar_dir, out / "bard_init", block_size=4)

    total = sum(pbm)
    schedule = "[" + ",".join(f"{{block_size:{b},steps:{n}}}" for b, n in zip((4, 8, 16), pbm)) + "]"
    print(f"[4/6] PBM 4 -> 8 -> 16 ({'+'.join(map(str, pbm))} steps)", flush=True)
    times["pbm"] = _run(_automodel("--config", str(CONF / "bard_demo.yaml"), root, f"step_scheduler.max_steps={total}",
                                   f"block_merge.schedule={schedule}",
                                   f"lr_scheduler.lr_warmup_steps={min(20, min(pbm) - 1)}"), out / "logs" / "pbm.log")
    stages = out / "bard_pbm_demo" / "stages"

    print(f"[5/6] SWD B16 <- B4 ({swd_steps} steps)", flush=True)
    times["swd"] = _run(_automodel("--config", str(CONF / "bard_demo.yaml"), "stage=swd", root,
                                   f"step_scheduler.max_steps={swd_steps}",
                                   f"lr_scheduler.lr_warmup_steps={min(20, swd_steps - 1)}"), out / "logs" / "swd.log")
    swd_dir = out / "bard_swd_demo" / "student_b16"

    print(f"[6/6] evaluate on {test_rows} held-out samples", flush=True)
    t = time.perf_counter()
    from nemo_bard.eval import evaluate, write_report

    # batch size 1: per-request decoding latency, the setting of the paper's speed claim
    data = out / "digits" / "test"
    common = dict(root_dir=out / "digits", max_new_tokens=32, progress=sys.stderr.isatty(), batch_size=1)
    tau = args.threshold
    runs = [
        ("AR (NeMo SFT)", ar_dir, ["ar"]),
        ("PBM stage B4", stages / "b4", ["4:4:1.0", f"4:4:{tau}"]),
        ("PBM stage B8", stages / "b8", ["8:8:1.0", f"8:8:{tau}"]),
        ("PBM stage B16", stages / "b16", ["16:16:1.0", f"16:16:{tau}"]),
        ("SWD B16 (B4 anchor)", swd_dir, ["16:16:1.0", f"16:16:{tau}", "16:16:0.7"]),
    ]
    rows = []
    for name, model_dir, points in runs:
        rows += evaluate(model_dir, data, points, name=name, **common)
    paths = write_report(rows, out / "report", title="nemo-bard offline demo: digits OCR, 2 CPU cores")
    times["eval"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_all
    meta = {"times_s": {k: round(v, 1) for k, v in times.items()}, "ar_final_loss": ar_loss,
            "ar_steps": ar_steps, "pbm_steps": pbm, "swd_steps": swd_steps, "train_rows": train_rows,
            "test_rows": test_rows, "seed": args.seed, "quick": q}
    (out / "report" / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(paths["markdown"].read_text())
    print(f"report: {paths['markdown']}  plot: {paths['plot']}")
    print("stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    return {"rows": rows, "paths": paths, "meta": meta}


if __name__ == "__main__":
    main()
