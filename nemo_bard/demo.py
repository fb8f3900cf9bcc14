"""Offline end-to-end demo: AR VLM -> PBM -> SWD (+ its control) -> accuracy-at-speed report, on 2 CPU cores.

    python -m nemo_bard.demo [--out outputs/demo] [--quick] [--task odd_count|read] [--threads N] [--layers N]
        [--engine static|compiled|eager] [--eval-only]

1. builds a ~1M-parameter random-init Qwen3-VL (``nemo_bard.tiny --preset demo``: 2 text layers, or ``--layers``)
   and a digit-image task from scikit-learn's bundled scans (``nemo_bard.data.digits``, split by source scan).
   The default task, ``odd_count``, answers with the number of odd digits counted so far (mod 10) at each
   digit: each answer token is the previous one plus one or zero, so the tokens depend on each other
   (``read``, the digits themselves, can be written all at once). The AR model first learns to read the same
   images (``--read-steps``), then the task;
2. trains it autoregressively with NeMo AutoModel's own ``FinetuneRecipeForVLM``
   (``automodel finetune --config conf/demo_ar.yaml``): the "pretrained AR VLM";
3. converts it to ``bard_vl`` (``nemo_bard.convert``);
4. runs PBM 4 -> 8 -> 16 in one run (``automodel finetune --config conf/bard_demo.yaml``): B4, SWD's anchor,
   for 1,200 steps (near where its accuracy stops rising), B8 and B16 for 200 each;
5. runs SWD: the B16 export as student, the B4 export as anchor (``... conf/bard_demo.yaml stage=swd``);
6. runs the control: the same SWD run without the distillation term (``kd.kd_weight=0``): same student,
   steps, data order, noise, optimizer and seed, so what SWD gains over it is distillation, not training;
7. tunes the SWD student's decoding point against the AR model on a dev split (held-out scans, never a test
   row; ``nemo_bard.eval.tune``, as ``python -m nemo_bard.eval --tune``): the fastest point within
   ``--tune-tolerance`` points of AR's exact match is written to the student's ``generation_config.json``, or
   nothing when no point is; ``<out>/report/tune.{json,md}``;
8. evaluates AR, every PBM stage, SWD (also at its tuned point) and the control on the held-out test scans
   (``nemo_bard.eval``) and writes ``<out>/report/results.{json,md,png}`` plus ``comparisons.{json,md}`` (paired
   differences in exact match, with 95 % intervals, on the same rows).

Every stage is an ordinary CLI run over the normal configs (the commands are printed), so the demo
is a thin script over the product. Every stage and the evaluation use ``--threads`` torch threads (default
``$OMP_NUM_THREADS``, else 1): another thread count takes another floating-point path and trains other models.
``--quick`` is the CI-sized variant (seconds per stage; it checks the plumbing, not accuracy).
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

from nemo_bard.eval.metrics import mean_and_interval, tolerance_problem

CONF = Path(__file__).resolve().parent / "conf"  # package data (conf/ in a clone links here)
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


def default_threads() -> int:
    """The demo's torch threads per process when ``--threads`` is not given: ``$OMP_NUM_THREADS``, else 1."""
    try:
        return max(int(os.environ.get("OMP_NUM_THREADS", "1")), 1)
    except ValueError:  # e.g. a nested OpenMP list such as "4,2"
        return 1


def _use_threads(threads: int) -> None:
    """This process evaluates with ``threads`` torch threads (each stage's process gets them from ``_run``)."""
    import torch

    torch.set_num_threads(threads)


def _run(cmd: list[str], log: Path, label: str, total_steps: int, every: float = PROGRESS_EVERY_S,
         threads: int | None = None) -> float:
    """Run one stage as a subprocess (output to ``log``, a progress line every few seconds, ``threads`` torch threads
    when given); returns its wall time."""
    print("  $ " + " ".join(cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
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


SWD_NAME, CONTROL_NAME = "SWD B16 (B4 anchor)", "Control B16 (SWD without KD)"
TUNED_NAME = "SWD B16 (point tuned on dev)"
CONTROL_RUN = "bard_swd_demo_control"  # run_name of the control (SWD recipe, kd.kd_weight=0)
MAX_NEW_TOKENS = 16  # an answer is at most 12 digits and <|im_end|>: one block of 16


def _models(out: Path) -> tuple[Path, Path, Path, Path]:
    """The AR model, the PBM stage exports directory, the SWD student and the control of a demo directory."""
    return ((out / "ar_sft" / "LATEST" / "model" / "consolidated").resolve(), out / "bard_pbm_demo" / "stages",
            out / "bard_swd_demo" / "student_b16", out / CONTROL_RUN / "student_b16")


def paired_difference(a: list[dict], b: list[dict], key: str = "exact_match") -> dict:
    """``a - b`` of a per-sample metric over the same rows: mean, 95 % normal interval of the paired
    differences, and how many rows only ``a`` (``a_only``) or only ``b`` (``b_only``) got right."""
    by_row = {p["row"]: p[key] for p in b}
    if len(by_row) != len(a) or any(p["row"] not in by_row for p in a):
        raise ValueError("paired_difference needs predictions of the same rows")
    d = [p[key] - by_row[p["row"]] for p in a]
    mean, lo, hi = mean_and_interval(d)
    return {"diff": mean, "ci95": [lo, hi], "n": len(d),
            "a_only": sum(1 for x in d if x > 0), "b_only": sum(1 for x in d if x < 0)}


def comparisons(rows: list[dict], tau: float) -> list[dict]:
    """The method's claims as paired exact-match differences between rows of this evaluation."""
    by = {(r["model"], r.get("threshold")): r for r in rows}
    ar = next((r for r in rows if r["kind"] == "ar"), None)
    pairs = []
    for t in (1.0, tau):
        pairs += [(f"PBM B16 - PBM B4, τ {t:g} (large blocks lose?)", ("PBM stage B16", t), ("PBM stage B4", t)),
                  (f"PBM B8 - PBM B4, τ {t:g}", ("PBM stage B8", t), ("PBM stage B4", t)),
                  (f"SWD B16 - PBM B16, τ {t:g} (SWD recovers?)", (SWD_NAME, t), ("PBM stage B16", t)),
                  (f"Control B16 - PBM B16, τ {t:g} (training further)", (CONTROL_NAME, t), ("PBM stage B16", t)),
                  (f"SWD B16 - Control B16, τ {t:g} (distillation itself)", (SWD_NAME, t), (CONTROL_NAME, t))]
    if ar is not None:
        by[("AR", None)] = ar
        pairs = [(f"PBM B4 - AR, τ {t:g} (conversion cost)", ("PBM stage B4", t), ("AR", None))
                 for t in (1.0, tau)] + pairs
        tuned = next((r for r in rows if r["model"] == TUNED_NAME), None)
        if tuned is not None:
            by[(TUNED_NAME, None)] = tuned
            pairs.append(("SWD B16 at its tuned point - AR", (TUNED_NAME, None), ("AR", None)))
    return [{"comparison": label, "a": by[ka]["name"], "b": by[kb]["name"],
             **paired_difference(by[ka]["predictions"], by[kb]["predictions"])}
            for label, ka, kb in pairs if ka in by and kb in by]


def comparisons_markdown(comps: list[dict]) -> str:
    """A markdown table of :func:`comparisons` (points of exact match)."""
    header = "| comparison (a - b, same rows) | exact match a - b (points) | 95 % interval | only a right | only b right |"
    lines = [header, "|---|---:|---|---:|---:|"]
    for c in comps:
        lo, hi = c["ci95"]
        lines.append(f"| {c['comparison']} | {100 * c['diff']:+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] | "
                     f"{c['a_only']} | {c['b_only']} |")
    return "\n".join(lines) + "\n"


def ensure_dev_split(out: Path, rows: int) -> Path:
    """``<out>/digits/dev``: written with the demo's own digits settings when missing (a demo directory made
    before the dev split existed); returns its path."""
    from nemo_bard.data.digits import write_digits_dataset

    digits = out / "digits"
    if (digits / "dev").exists():
        return digits / "dev"
    cfg = json.loads((digits / "digits_config.json").read_text())
    tmp = out / "digits_dev.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_digits_dataset(tmp, train=0, test=cfg["test"], dev=rows, seed=cfg["seed"], min_digits=cfg["min_digits"],
                         max_digits=cfg["max_digits"], scale=cfg["scale"], fmt=cfg["format"], task=cfg["task"])
    for image in (tmp / "images").glob("dev_*.png"):
        image.replace(digits / "images" / image.name)
    (tmp / "dev").replace(digits / "dev")
    shutil.rmtree(tmp)
    return digits / "dev"


def _tune(out: Path, tolerance: float, engine: str) -> dict:
    """Step 7: ``eval --tune`` of the SWD student on the dev split; writes ``<out>/report/tune.{json,md}`` and
    returns ``{"point": spec or None, "message": ..., "wall_s": ...}``."""
    from nemo_bard.eval.tune import points_text, tune

    ar_dir, _, swd_dir, _ = _models(out)
    print(f"  $ python -m nemo_bard.eval --tune --model {swd_dir} --data {out / 'digits' / 'dev'} --root-dir "
          f"{out / 'digits'} --ar-model {ar_dir} --tolerance {tolerance:g} --batch-size 1 "
          f"--max-new-tokens {MAX_NEW_TOKENS}", flush=True)
    result = tune(swd_dir, out / "digits" / "dev", ar_dir, tolerance=tolerance, root_dir=out / "digits",
                  batch_size=1, max_new_tokens=MAX_NEW_TOKENS, engine=engine, progress=False,
                  log=lambda msg: print(f"  [tune] {msg}", flush=True))
    print(f"  [tune] {result.message}", flush=True)
    p = result.point
    spec = None if p is None else p.spec
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    summary = {"point": spec, "label": None if p is None else p.label, "tolerance_points": tolerance,
               "message": result.message, "wall_s": round(result.wall_time, 1), "evidence": result.evidence}
    (report / "tune.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (report / "tune.md").write_text(
        f"Decoding point of the SWD student, tuned on {result.evidence['rows']} dev rows (not the test rows) "
        f"against AR, tolerance {points_text(tolerance)}: {result.message}\n\n" + result.table())
    return summary


def _evaluate(out: Path, tau: float, engine: str, every: float, title: str,
              tuned: str | None = None) -> tuple[list[dict], dict]:
    """The evaluation: AR, every PBM stage, SWD (and at its ``tuned`` point) and the control on the held-out
    rows; writes ``<out>/report`` (results.* from nemo_bard.eval, comparisons.{json,md})."""
    from nemo_bard.eval import evaluate, load_samples, write_report

    ar_dir, stages, swd_dir, control_dir = _models(out)
    # batch size 1: per-request decoding latency, the setting of the paper's speed claim
    samples = load_samples(out / "digits" / "test", out / "digits")
    common = dict(max_new_tokens=MAX_NEW_TOKENS, progress=EvalProgress(every), batch_size=1)
    runs = [  # (name, model, decoding points)
        ("AR (NeMo SFT)", ar_dir, ["ar"]),
        ("PBM stage B4", stages / "b4", ["4:4:1.0", f"4:4:{tau}"]),
        ("PBM stage B8", stages / "b8", ["8:8:1.0", f"8:8:{tau}"]),
        ("PBM stage B16", stages / "b16", ["16:16:1.0", f"16:16:{tau}"]),
        (SWD_NAME, swd_dir, ["16:16:1.0", f"16:16:{tau}"]),
        (CONTROL_NAME, control_dir, ["16:16:1.0", f"16:16:{tau}"]),
    ] + ([(TUNED_NAME, swd_dir, [tuned])] if tuned else [])
    rows = []
    for name, model_dir, points in runs:
        rows += evaluate(model_dir, samples, points, name=name, engine=engine, **common)
    paths = write_report(rows, out / "report", title=title)
    comps = comparisons(rows, tau)
    paths["comparisons"] = out / "report" / "comparisons.json"
    paths["comparisons"].write_text(json.dumps(comps, indent=2) + "\n")
    table = comparisons_markdown(comps)
    (out / "report" / "comparisons.md").write_text(table)
    with open(paths["markdown"], "a", encoding="utf-8") as f:
        f.write("\nPaired differences in exact match on the same held-out rows:\n\n" + table)
        if (out / "report" / "tune.md").is_file():
            f.write("\n" + (out / "report" / "tune.md").read_text())
        cost = _tuning_cost(out, next((r for r in rows if r["model"] == TUNED_NAME), None))
        if cost:
            f.write(f"\n{cost}\n")
    return rows, paths


def _tuning_cost(out: Path, tuned_row: dict | None) -> str | None:
    """Tuning's wall time against one full evaluation of the point it chose (both from this run), recorded in
    ``report/tune.json`` as ``cost_vs_one_evaluation``; None without a tuned point."""
    tune_json = out / "report" / "tune.json"
    if tuned_row is None or not tune_json.is_file():
        return None
    summary = json.loads(tune_json.read_text())
    one = tuned_row["eval_time"]
    summary["cost_vs_one_evaluation"] = {"tuning_s": summary["wall_s"], "evaluation_s": round(one, 3),
                                         "evaluation_rows": tuned_row["n"], "ratio": round(summary["wall_s"] / one, 2)}
    tune_json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return (f"Tuning took {summary['wall_s']:.1f} s (both models loaded, every point it ran): "
            f"{summary['wall_s'] / one:.1f}x one full evaluation of the point it chose ({one:.1f} s on the "
            f"{tuned_row['n']} test rows at batch 1, prompts built by the processor included).")


def _title(task: str) -> str:
    what = {"read": "digits OCR", "odd_count": "counting odd digits"}.get(task, task)
    return f"nemo-bard offline demo: {what}, 2 CPU cores"


def evaluate_existing(out: Path, tau: float, engine: str, every: float = PROGRESS_EVERY_S,
                      tolerance: float = 1.0, dev_rows: int = 1000) -> dict:
    """``--eval-only``: tuning and evaluation again on a finished demo directory (its dev split is written first
    if it has none); the report and ``run.json`` are rewritten."""
    missing = [p for p in (*_models(out), out / "digits" / "test") if not p.exists()]
    if missing:
        raise SystemExit(f"nemo_bard.demo: --eval-only needs a finished demo in {out} ({missing[0]} is missing); "
                         "run it without --eval-only first")
    print(f"[eval] evaluate {out} again (engine {engine}, threshold {tau})", flush=True)
    run_json = out / "report" / "run.json"
    meta = json.loads(run_json.read_text()) if run_json.is_file() else {"times_s": {}}
    ensure_dev_split(out, dev_rows)
    tuned = _tune(out, tolerance, engine)
    meta["times_s"]["tune"] = tuned["wall_s"]
    t = time.perf_counter()
    rows, paths = _evaluate(out, tau, engine, every, _title(meta.get("task", "odd_count")), tuned["point"])
    meta["times_s"]["eval"] = round(time.perf_counter() - t, 1)
    meta.update(engine=engine, threshold=tau, eval_only=True, tuned_point=tuned["point"],
                tune_tolerance=tolerance)
    run_json.write_text(json.dumps(meta, indent=2) + "\n")
    print(paths["markdown"].read_text())
    print(f"report: {paths['markdown']}  plot: {paths['plot']}")
    return {"rows": rows, "paths": paths, "meta": meta}


def main(argv: list[str] | None = None) -> dict:
    from nemo_bard.data.digits import TASKS
    from nemo_bard.generation.points import ENGINES

    ap = argparse.ArgumentParser(prog="python -m nemo_bard.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/demo", help="output directory (replaced if it exists)")
    ap.add_argument("--quick", action="store_true", help="CI-sized run: a few steps per stage, small data")
    ap.add_argument("--task", default="odd_count", choices=list(TASKS),
                    help="odd_count (default): answer tokens depend on each other; read: the digits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--read-steps", type=int, default=None,
                    help="AR pretraining steps on reading the same images before the task (default 300; 0: none)")
    ap.add_argument("--ar-steps", type=int, default=None, help="AR SFT steps on the task")
    ap.add_argument("--pbm-steps", default=None,
                    help="steps of the B4,B8,B16 stages (default 1200,200,200: B4, the anchor, to near convergence)")
    ap.add_argument("--swd-steps", type=int, default=None, help="steps of SWD and of its control")
    ap.add_argument("--train-rows", type=int, default=None)
    ap.add_argument("--test-rows", type=int, default=None)
    ap.add_argument("--dev-rows", type=int, default=None, help="dev rows for tuning the decoding point (default 1000)")
    ap.add_argument("--threshold", type=float, default=0.9, help="confidence threshold of the fast setting")
    ap.add_argument("--tune-tolerance", type=float, default=1.0,
                    help="points of exact match below AR the tuned decoding point may lose (default 1.0)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of every stage's process and of the evaluation (default: $OMP_NUM_THREADS, "
                         "else 1); the trained models depend on it, and docs/benchmarks.md's runs use 1")
    ap.add_argument("--layers", type=int, default=None,
                    help="text decoder layers of the tiny model (default 2); in docs/benchmarks.md's run with 4, large "
                         "blocks no longer lost on odd_count and the SWD student beat AR")
    ap.add_argument("--engine", default="static", choices=ENGINES,
                    help="decoding engine of the evaluation (default static)")
    ap.add_argument("--progress-every", type=float, default=PROGRESS_EVERY_S,
                    help="seconds between console progress lines of a stage (default 10)")
    ap.add_argument("--eval-only", action="store_true",
                    help="only re-run the evaluation on the models of an existing --out (e.g. with another --engine)")
    args = ap.parse_args(argv)
    # checked before hours of training: tuning runs after it
    problem = tolerance_problem(args.tune_tolerance, "--tune-tolerance")
    if problem:
        ap.error(problem)
    for flag in ("dev_rows", "threads", "layers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    threads = args.threads or default_threads()
    _use_threads(threads)
    if args.eval_only:
        return evaluate_existing(Path(args.out).resolve(), args.threshold, args.engine, args.progress_every,
                                 args.tune_tolerance, args.dev_rows or 1000)
    if not (CONF / "bard_demo.yaml").is_file():
        raise SystemExit(f"nemo_bard.demo: config directory {CONF} not found; run from a source checkout "
                         "(pip install -e .)")

    q = args.quick
    ar_steps = args.ar_steps or (6 if q else 600)
    pbm = [int(s) for s in (args.pbm_steps or ("2,2,2" if q else "1200,200,200")).split(",")]
    swd_steps = args.swd_steps or (3 if q else 200)
    train_rows, test_rows = args.train_rows or (64 if q else 2000), args.test_rows or (16 if q else 1000)
    dev_rows = args.dev_rows or (8 if q else 1000)
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    read_steps = 0 if args.task == "read" else (args.read_steps if args.read_steps is not None else (4 if q else 300))
    stage_count, stage_no = 8 + bool(read_steps), iter(range(1, 10))

    def n() -> str:
        return f"{next(stage_no)}/{stage_count}"

    def stage(cmd: list[str], label: str, steps: int) -> float:  # log <out>/logs/<label>.log, the demo's threads
        return _run(cmd, out / "logs" / f"{label}.log", label, steps, args.progress_every, threads)

    from nemo_bard.data.digits import main as digits_main
    from nemo_bard.tiny import PRESETS, write_tiny_model

    layers = args.layers or PRESETS["demo"].layers
    print(f"[{n()}] tiny Qwen3-VL ({layers} text layers) + {args.task} task -> {out} ({threads} torch thread(s) "
          "per process)", flush=True)
    t = time.perf_counter()
    write_tiny_model(out / "ar_init", preset="demo", seed=args.seed, layers=layers)
    digits_main([str(out / "digits"), "--task", args.task, "--train", str(train_rows), "--test", str(test_rows),
                 "--dev", str(dev_rows), "--seed", str(args.seed)])
    if read_steps:  # the same images with the read answers (train split only)
        digits_main([str(out / "digits_read"), "--task", "read", "--train", str(train_rows), "--test", "0",
                     "--seed", str(args.seed)])
    times["setup"] = time.perf_counter() - t

    root = f"paths.run_root={out}"
    ar_init = []
    if read_steps:
        print(f"[{n()}] AR pretraining: reading the digits ({read_steps} steps)", flush=True)
        times["ar_read"] = stage(_automodel("--config", str(CONF / "demo_ar.yaml"), root,
                                            f"checkpoint.checkpoint_dir={out / 'ar_read'}",
                                            f"paths.data={out / 'digits_read' / 'train'}",
                                            f"paths.data_root={out / 'digits_read'}",
                                            f"step_scheduler.max_steps={read_steps}",
                                            f"lr_scheduler.lr_warmup_steps={min(50, read_steps - 1)}"),
                                 "ar_read", read_steps)
        ar_init = [f"paths.init={out / 'ar_read' / 'LATEST' / 'model' / 'consolidated'}"]
    print(f"[{n()}] AR SFT on the {args.task} task with NeMo's FinetuneRecipeForVLM ({ar_steps} steps)", flush=True)
    times["ar_sft"] = stage(_automodel("--config", str(CONF / "demo_ar.yaml"), root, *ar_init,
                                       f"step_scheduler.max_steps={ar_steps}",
                                       f"lr_scheduler.lr_warmup_steps={min(50, ar_steps - 1)}"),
                            "ar_sft", ar_steps)
    ar_dir = _models(out)[0]
    ar_loss = _last_losses(out / "ar_sft" / "training.jsonl")
    if not q and ar_loss > 1.0:
        print(f"  warning: AR training loss is still {ar_loss:.2f} (~ln 10 means guessing); the AR model has "
              "not broken out of the plateau -- rerun with another --seed or more --ar-steps", flush=True)

    print(f"[{n()}] convert AR -> bard_vl", flush=True)
    from nemo_bard.convert import convert

    convert(ar_dir, out / "bard_init", block_size=4)

    total = sum(pbm)
    schedule = "[" + ",".join(f"{{block_size:{b},steps:{n}}}" for b, n in zip((4, 8, 16), pbm)) + "]"
    print(f"[{n()}] PBM 4 -> 8 -> 16 ({'+'.join(map(str, pbm))} steps)", flush=True)
    times["pbm"] = stage(_automodel("--config", str(CONF / "bard_demo.yaml"), root, f"step_scheduler.max_steps={total}",
                                    f"block_merge.schedule={schedule}",
                                    f"lr_scheduler.lr_warmup_steps={min(20, min(pbm) - 1)}"),
                         "pbm", total)

    # SWD and its control: the same command but for the distillation weight (and the run directory)
    swd = ("--config", str(CONF / "bard_demo.yaml"), "stage=swd", root, f"step_scheduler.max_steps={swd_steps}",
           f"lr_scheduler.lr_warmup_steps={min(20, swd_steps - 1)}")
    print(f"[{n()}] SWD B16 <- B4 anchor ({swd_steps} steps)", flush=True)
    times["swd"] = stage(_automodel(*swd), "swd", swd_steps)
    print(f"[{n()}] control: B16 trained as SWD without the KD term ({swd_steps} steps)", flush=True)
    times["control"] = stage(_automodel(*swd, f"run_name={CONTROL_RUN}", "kd.kd_weight=0"),
                             "control", swd_steps)

    print(f"[{n()}] tune the SWD student's decoding point on {dev_rows} dev rows against AR", flush=True)
    t = time.perf_counter()
    tuned = _tune(out, args.tune_tolerance, args.engine)
    times["tune"] = time.perf_counter() - t

    print(f"[{n()}] evaluate on {test_rows} held-out samples", flush=True)
    t = time.perf_counter()
    rows, paths = _evaluate(out, args.threshold, args.engine, args.progress_every, _title(args.task),
                            tuned["point"])
    times["eval"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_all
    meta = {"times_s": {k: round(v, 1) for k, v in times.items()}, "ar_final_loss": ar_loss, "task": args.task,
            "read_steps": read_steps, "ar_steps": ar_steps, "pbm_steps": pbm, "swd_steps": swd_steps,
            "control_steps": swd_steps,
            "anchor": "PBM stage B4", "train_rows": train_rows, "test_rows": test_rows, "seed": args.seed,
            "quick": q, "engine": args.engine, "threshold": args.threshold, "dev_rows": dev_rows,
            "tuned_point": tuned["point"], "tune_tolerance": args.tune_tolerance, "threads": threads,
            "layers": layers}
    (out / "report" / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(paths["markdown"].read_text())
    print(f"report: {paths['markdown']}  plot: {paths['plot']}")
    print("stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    return {"rows": rows, "paths": paths, "meta": meta}


if __name__ == "__main__":
    main()
