"""Offline end-to-end demo: AR VLM -> PBM -> SWD -> accuracy-at-speed report, on 2 CPU cores.

    python -m nemo_bard.demo [--out outputs/demo] [--quick] [--engine static|compiled|eager] [--eval-only]

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
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf"
PROGRESS_EVERY_S = 10.0  # console progress lines per stage at least this often
_STEP_LINE = re.compile(r"step (\d+) \|.*?\| loss ([-\d.naif]+)")


def _eta(done: float, total: float, elapsed: float) -> str:
    if done <= 0 or total <= done:
        return "?" if total > done else "0s"
    left = elapsed / done * (total - done)
    return f"{int(left // 60)}m{int(left % 60):02d}s" if left >= 60 else f"{left:.0f}s"


def training_progress(log_text: str, total_steps: int, elapsed: float) -> str:
    """One progress line from a training stage's log: last logged step, its loss, and an ETA."""
    hits = _STEP_LINE.findall(log_text)
    if not hits:
        return f"starting ({elapsed:.0f}s)"
    step, loss = int(hits[-1][0]) + 1, hits[-1][1]
    return f"step {step}/{total_steps} | loss {loss} | {elapsed:.0f}s | ETA {_eta(step, total_steps, elapsed)}"


def _run(cmd: list[str], log: Path, label: str, total_steps: int, every: float = PROGRESS_EVERY_S) -> float:
    """Run one stage as a subprocess (output to ``log``, a progress line every few seconds); returns its wall time."""
    print("  $ " + " ".join(cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            try:
                proc.wait(timeout=every)
            except subprocess.TimeoutExpired:
                elapsed = time.perf_counter() - t
                print(f"  [{label}] {training_progress(log.read_text(errors='replace'), total_steps, elapsed)}",
                      flush=True)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"nemo_bard.demo: stage failed (exit {proc.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - t


class EvalProgress:
    """Prints ``[eval] <setting>: n/N rows | ETA`` at most every few seconds (and when a setting finishes)."""

    def __init__(self, every: float = PROGRESS_EVERY_S) -> None:
        self.every, self.last, self.started = every, time.perf_counter(), {}

    def __call__(self, name: str, done: int, total: int) -> None:
        now = time.perf_counter()
        start = self.started.setdefault(name, now)
        if now - self.last >= self.every or done == total:
            self.last = now
            print(f"  [eval] {name}: {done}/{total} rows | ETA {_eta(done, total, now - start)}", flush=True)


def _automodel(*args: str) -> list[str]:
    return [sys.executable, "-m", "nemo_bard.cli", "finetune", *args]


def _last_losses(jsonl: Path, n: int = 20) -> float:
    recs = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    tail = recs[-n:]
    return sum(r["loss"] for r in tail) / max(len(tail), 1)


def _models(out: Path) -> tuple[Path, Path, Path]:
    """The AR model, the PBM stage exports directory and the SWD student of a demo output directory."""
    return ((out / "ar_sft" / "LATEST" / "model" / "consolidated").resolve(), out / "bard_pbm_demo" / "stages",
            out / "bard_swd_demo" / "student_b16")


def _evaluate(out: Path, tau: float, engine: str, every: float) -> tuple[list[dict], dict]:
    """Step 6: AR (engine and HF generate) and every stage on the held-out scans; writes ``<out>/report``."""
    from nemo_bard.eval import evaluate, load_samples, write_report

    ar_dir, stages, swd_dir = _models(out)
    # batch size 1: per-request decoding latency, the setting of the paper's speed claim
    samples = load_samples(out / "digits" / "test", out / "digits")
    common = dict(max_new_tokens=32, progress=EvalProgress(every), batch_size=1)
    runs = [  # (name, model, points, engine); the AR baseline also through Hugging Face generate
        ("AR (NeMo SFT)", ar_dir, ["ar"], engine),
        ("AR (NeMo SFT), HF generate", ar_dir, ["ar"], "hf"),
        ("PBM stage B4", stages / "b4", ["4:4:1.0", f"4:4:{tau}"], engine),
        ("PBM stage B8", stages / "b8", ["8:8:1.0", f"8:8:{tau}"], engine),
        ("PBM stage B16", stages / "b16", ["16:16:1.0", f"16:16:{tau}"], engine),
        ("SWD B16 (B4 anchor)", swd_dir, ["16:16:1.0", f"16:16:{tau}", "16:16:0.7"], engine),
    ]
    rows = []
    for name, model_dir, points, run_engine in runs:
        rows += evaluate(model_dir, samples, points, name=name, engine=run_engine, **common)
    paths = write_report(rows, out / "report", title="nemo-bard offline demo: digits OCR, 2 CPU cores")
    return rows, paths


def evaluate_existing(out: Path, tau: float, engine: str, every: float = PROGRESS_EVERY_S) -> dict:
    """``--eval-only``: step 6 again on a finished demo directory; the report and ``run.json`` are rewritten."""
    missing = [p for p in (*_models(out), out / "digits" / "test") if not p.exists()]
    if missing:
        raise SystemExit(f"nemo_bard.demo: --eval-only needs a finished demo in {out} ({missing[0]} is missing); "
                         "run it without --eval-only first")
    print(f"[6/6] evaluate {out} again (engine {engine}, threshold {tau})", flush=True)
    t = time.perf_counter()
    rows, paths = _evaluate(out, tau, engine, every)
    run_json = out / "report" / "run.json"
    meta = json.loads(run_json.read_text()) if run_json.is_file() else {"times_s": {}}
    meta["times_s"]["eval"] = round(time.perf_counter() - t, 1)
    meta.update(engine=engine, threshold=tau, eval_only=True)
    run_json.write_text(json.dumps(meta, indent=2) + "\n")
    print(paths["markdown"].read_text())
    print(f"report: {paths['markdown']}  plot: {paths['plot']}")
    return {"rows": rows, "paths": paths, "meta": meta}


def main(argv: list[str] | None = None) -> dict:
    from nemo_bard.generation.points import ENGINES

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
    ap.add_argument("--engine", default="static", choices=ENGINES,
                    help="decoding engine of the evaluation (default static)")
    ap.add_argument("--progress-every", type=float, default=PROGRESS_EVERY_S,
                    help="seconds between console progress lines of a stage (default 10)")
    ap.add_argument("--eval-only", action="store_true",
                    help="only re-run step 6 on the models of an existing --out (e.g. with another --engine)")
    args = ap.parse_args(argv)
    if args.eval_only:
        return evaluate_existing(Path(args.out).resolve(), args.threshold, args.engine, args.progress_every)
    if not (CONF / "bard_demo.yaml").is_file():
        raise SystemExit(f"nemo_bard.demo: config directory {CONF} not found; run from a source checkout "
                         "(pip install -e .)")

    q = args.quick
    ar_steps = args.ar_steps or (6 if q else 1500)
    pbm = [int(s) for s in (args.pbm_steps or ("2,2,2" if q else "400,300,300")).split(",")]
    swd_steps = args.swd_steps or (3 if q else 400)
    train_rows, test_rows = args.train_rows or (64 if q else 2000), args.test_rows or (16 if q else 1000)
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
                                      f"lr_scheduler.lr_warmup_steps={min(50, ar_steps - 1)}"),
                           out / "logs" / "ar_sft.log", "ar_sft", ar_steps, args.progress_every)
    ar_dir = _models(out)[0]
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
                                   f"lr_scheduler.lr_warmup_steps={min(20, min(pbm) - 1)}"),
                        out / "logs" / "pbm.log", "pbm", total, args.progress_every)

    print(f"[5/6] SWD B16 <- B4 ({swd_steps} steps)", flush=True)
    times["swd"] = _run(_automodel("--config", str(CONF / "bard_demo.yaml"), "stage=swd", root,
                                   f"step_scheduler.max_steps={swd_steps}",
                                   f"lr_scheduler.lr_warmup_steps={min(20, swd_steps - 1)}"),
                        out / "logs" / "swd.log", "swd", swd_steps, args.progress_every)

    print(f"[6/6] evaluate on {test_rows} held-out samples", flush=True)
    t = time.perf_counter()
    rows, paths = _evaluate(out, args.threshold, args.engine, args.progress_every)
    times["eval"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_all
    meta = {"times_s": {k: round(v, 1) for k, v in times.items()}, "ar_final_loss": ar_loss,
            "ar_steps": ar_steps, "pbm_steps": pbm, "swd_steps": swd_steps, "train_rows": train_rows,
            "test_rows": test_rows, "seed": args.seed, "quick": q, "engine": args.engine,
            "threshold": args.threshold}
    (out / "report" / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(paths["markdown"].read_text())
    print(f"report: {paths['markdown']}  plot: {paths['plot']}")
    print("stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    return {"rows": rows, "paths": paths, "meta": meta}


if __name__ == "__main__":
    main()
