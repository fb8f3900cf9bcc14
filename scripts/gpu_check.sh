#!/usr/bin/env bash
# One prepared check of nemo-bard on one CUDA machine (an H100 or H200), done in under 8 minutes:
#
#   bash scripts/gpu_check.sh [--dry-run] [--out DIR] [--budget SECONDS] [--only STEP,...] [--agreement-model DIR]
#                             [--agreement-data DATASET] [--pack]
#
# Steps, most important first, each under its own timeout and all under one time budget (default 450 s, so
# the run ends before 8 minutes even when steps hit their limits; a step that no longer fits is skipped and
# recorded as such; --budget 570 gives the later steps room within a 10-minute call). If the environment
# step fails (e.g. another transformers than the pinned 5.18 imports), every later step is recorded as skipped:
#   env           record the versions of what imports (torch, transformers, nemo_automodel) and the GPU
#   bench_decode  python -m nemo_bard.bench.decode --preset qwen3vl_2b (AR vs BARD; eager, static, compiled engines)
#   profile       python -m nemo_bard.bench.profile --preset qwen3vl_2b: kernels and GPU time per decoding forward
#   bench_serve   python -m nemo_bard.bench.serve --preset qwen3vl_2b: BARD (B32 S4, 8 tokens per forward forced) and AR
#                 servers at concurrency 1, 8, 32 (output tokens/s, TTFT, latency)
#   prepare       the tiny AR model, its bard_vl conversion and the synthetic colour data
#   agreement     python -m nemo_bard.bench.agreement: tokens in bf16 vs fp32 (eager, static) of --agreement-model
#                 (e.g. the demo's SWD student), else of the tiny model; with --agreement-data (the model's task,
#                 e.g. the demo's digits/test with its images/ beside it) the first 1,000 prompts, eos honoured
#                 (with the demo's output in D: --agreement-model $D/bard_swd_demo/student_b16
#                 --agreement-data $D/digits/test)
#   gpu_tests     pytest -m gpu: Flex PBM step == dense step (bf16), Flex SWD step, activation checkpointing + Flex
#   e2e_flex_*    tiny PBM -> SWD through the front door, nccl + bf16, FlexAttention masks + activation checkpointing
#   bench_train   python -m nemo_bard.bench.train --preset qwen3vl_2b (AR SFT vs BARD dense/flex, +/- checkpointing)
#   ac_fit        bard.max_length 8192 (P + 2R) at batch 8 with activation checkpointing (flex, then dense)
#   e2e_dense_*   tiny PBM -> SWD, nccl + bf16, dense masks, LoRA (peft=lora)
# --only runs the named steps (the others are left out of the summary), e.g. two short calls on one warm machine:
# --only env,bench_decode,prepare,agreement then --only env,gpu_tests,prepare,e2e_flex_pbm,... .
# and writes one summary, summary.md + summary.json (plus logs/ and every step's JSON), under the output
# directory: --out, else $OUT, else gpu_check_out/; --pack leaves only the summary
# and details.tgz (everything else) there, for tools that bring back a few files. Scratch (tiny models, runs) goes to
# $GPU_CHECK_WORK or a temporary directory.
#
# --dry-run runs the same sequence on this machine's CPU at tiny sizes (CI runs it: tests/test_gpu_check.py);
# steps that need a GPU (the gpu tests, FlexAttention, the 8192 x 8 memory check) are recorded as skipped.
#
# Install first, on the CUDA machine: `pip install -e '.[test]'` (NeMo AutoModel 0.7.0 pins transformers 5.18 and
# brings a CUDA build of torch). The recipes run as `python3 -m nemo_bard.cli finetune --config ...`, the same
# front door as the `automodel` script.
set -uo pipefail

DRY=0
OUT_DIR=""
ONLY=""
AGREEMENT_MODEL=""
AGREEMENT_DATA=""
PACK=0
BUDGET=450
while (($#)); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    --only) ONLY=",$2,"; shift ;;
    --agreement-model) AGREEMENT_MODEL="$2"; shift ;;
    --agreement-data) AGREEMENT_DATA="$2"; shift ;;
    --pack) PACK=1 ;;
    -h|--help) sed -n '2,43p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT_DIR=${OUT_DIR:-${OUT:-$ROOT/gpu_check_out}}
mkdir -p "$OUT_DIR/logs"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
rm -f "$OUT_DIR/steps.jsonl"
# models, data and run directories go to a scratch directory (not into the output that travels back); removed at
# the end unless GPU_CHECK_KEEP=1 (a directory given as GPU_CHECK_WORK is kept)
if [[ -n ${GPU_CHECK_WORK:-} ]]; then
  WORK=$GPU_CHECK_WORK KEEP=1
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") KEEP=${GPU_CHECK_KEEP:-0}
fi
mkdir -p "$WORK"
PY=${PYTHON:-python3}
START=$(date +%s)
export PY DRY OUT_DIR WORK   # the step functions run in child shells

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if ((DRY)); then
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
fi

log() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }

# record NAME STATUS MILLISECONDS RC NOTE
record() {
  "$PY" -c 'import json, sys; n, s, ms, rc, note = sys.argv[1:]; print(json.dumps({"name": n, "status": s, "seconds": round(int(ms) / 1000, 1), "rc": int(rc), "note": note}))' \
    "$@" >> "$OUT_DIR/steps.jsonl"
}

# step NAME TIMEOUT COMMAND...: run under min(TIMEOUT, what is left of the budget); log to logs/NAME.log.
# COMMAND may be a function of this script (it runs in a child bash that is given the function).
ABORT=""
selected() { [[ -z $ONLY || $ONLY == *",$1,"* ]]; }
step() {
  local name=$1 limit=$2
  shift 2
  selected "$name" || return 1
  if [[ -n $ABORT ]]; then
    log "$name: skipped ($ABORT)"
    record "$name" skipped 0 0 "$ABORT"
    return 1
  fi
  local left=$((BUDGET - ($(date +%s) - START)))
  if ((left < 30)); then
    log "$name: skipped (time budget spent)"
    record "$name" skipped 0 0 "time budget spent"
    return 1
  fi
  ((limit > left)) && limit=$left
  log "$name: start (limit ${limit}s)"
  local t0 rc status ms
  t0=$(date +%s%N)
  if declare -F "$1" > /dev/null; then
    timeout --kill-after=15 "$limit" bash -c "$(declare -f "$1"); \"\$@\"" "$name" "$@" > "$OUT_DIR/logs/$name.log" 2>&1
  else
    timeout --kill-after=15 "$limit" "$@" > "$OUT_DIR/logs/$name.log" 2>&1
  fi
  rc=$?
  ms=$((($(date +%s%N) - t0) / 1000000))
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  record "$name" "$status" "$ms" "$rc" "$(tail -n 1 "$OUT_DIR/logs/$name.log" | cut -c1-300)"
  log "$name: $status (rc $rc, $((ms / 1000))s)"
  if [[ $status != ok ]]; then tail -n 25 "$OUT_DIR/logs/$name.log" | sed 's/^/    /'; fi
  [[ $status == ok ]]
}

skip() { selected "$1" || return 0; log "$1: skipped (${ABORT:-$2})"; record "$1" skipped 0 0 "${ABORT:-$2}"; }

# ------------------------------------------------------------------------------------------ environment
env_step() {
  "$PY" - "$OUT_DIR/env.json" <<'EOF'
"""Versions and paths of what will import (package metadata: no heavy import), the GPU, and the version pin."""
import importlib.metadata as md, importlib.util, json, shutil, subprocess, sys
info = {"python": sys.version.split()[0], "device": "cpu"}
for dist in ("torch", "transformers", "nemo_automodel", "hydra-core", "pydantic"):
    try:
        info[dist] = md.version(dist)
    except md.PackageNotFoundError:
        info[dist] = "missing"
info["transformers_path"] = getattr(importlib.util.find_spec("transformers"), "origin", None)
info["PYTORCH_CUDA_ALLOC_CONF"] = __import__("os").environ.get("PYTORCH_CUDA_ALLOC_CONF")
if shutil.which("nvidia-smi"):
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    info["device"] = subprocess.run(query, capture_output=True, text=True).stdout.strip() or "cpu"
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
from nemo_bard.integrations import check_version
check_version("transformers")  # nemo_bard's integration layer accepts the pinned 5.18 only
check_version("nemo_automodel")
EOF
}
if selected env; then step env 240 env_step || ABORT="environment not usable (see logs/env.log)"; fi

# ------------------------------------------------------------------------------------------ the checks
if ((DRY)); then
  step bench_decode 120 "$PY" -m nemo_bard.bench.decode --preset tiny --batch-sizes 1 --points 8:4:0.9 \
    --max-new-tokens 8 --ignore-eos --engine eager,static --repeats 1 --json "$OUT_DIR/bench_decode.json"
else
  step bench_decode 300 "$PY" -m nemo_bard.bench.decode --preset qwen3vl_2b --batch-sizes 1 8 \
    --points 16:4:0.9,32:4:0.9 --max-new-tokens 128 --ignore-eos --engine eager,static,compiled --repeats 1 \
    --json "$OUT_DIR/bench_decode.json"
fi

step profile 120 "$PY" -m nemo_bard.bench.profile $( ((DRY)) && echo "--point 8:4:0.9 --max-new-tokens 8" ||
  echo "--preset qwen3vl_2b --point 32:4:0.9 --max-new-tokens 64") --json "$OUT_DIR/profile.json"

step bench_serve 300 "$PY" -m nemo_bard.bench.serve $( ((DRY)) &&
  echo "--preset tiny --block-size 4 --steps 1 --concurrency 1,2 --requests 4 --max-tokens 8 --device cpu" ||
  echo "--preset qwen3vl_2b --block-size 32 --steps 4 --concurrency 1,8,32 --requests 96 --max-tokens 128
        --max-model-len 2048") --strategy low_confidence_static --ignore-eos --json "$OUT_DIR/bench_serve.json" \
  --plot "$OUT_DIR/bench_serve.png"

prepare() {
  "$PY" - "$WORK" <<'EOF'
"""The tiny bard_vl model (block size 4) and colour data; GPU_CHECK_MODEL / GPU_CHECK_DATA give existing ones."""
import os, sys
from pathlib import Path
work = Path(sys.argv[1])
model, data = os.environ.get("GPU_CHECK_MODEL"), os.environ.get("GPU_CHECK_DATA")
if not model:
    from nemo_bard.convert import convert
    from nemo_bard.tiny import write_tiny_model
    model = str(convert(write_tiny_model(work / "ar", preset="test"), work / "bard", block_size=4))
if not data:
    from nemo_bard.data.synthetic import write_synthetic_dataset
    data = str(write_synthetic_dataset(work / "data", rows=32, seed=0))
(work / "paths.env").write_text(f"MODEL={model}\nDATA={data}\n")
print(model, data)
EOF
}
step prepare 120 prepare
MODEL="" DATA=""
[[ -f $WORK/paths.env ]] && source "$WORK/paths.env"

STUDENT=${AGREEMENT_MODEL:-$MODEL}
if [[ -n $STUDENT ]]; then
  if ((DRY)); then SIZE=(--rows 2 --max-new-tokens 8); else SIZE=(--rows 8 --max-new-tokens 64); fi
  if [[ -n $AGREEMENT_DATA ]]; then SIZE=(--data "$AGREEMENT_DATA" --rows $((DRY ? 8 : 1000)) --max-new-tokens 32); fi
  step agreement 240 "$PY" -m nemo_bard.bench.agreement --model "$STUDENT" "${SIZE[@]}" --json "$OUT_DIR/agreement.json"
else
  skip agreement "no model (prepare failed)"
fi

if ((DRY)); then
  skip gpu_tests "needs a GPU (CI collects tests/test_gpu.py and skips it)"
else
  step gpu_tests 180 "$PY" -m pytest -q -m gpu -p no:cacheprovider -p no:logging --tb=short tests/test_gpu.py
fi

if ((DRY)); then
  TINY=("model.torch_dtype=float32" "dist_env.backend=gloo")
  PBM_STEPS=("step_scheduler.max_steps=2" "block_merge.schedule=[{block_size:4,steps:1},{block_size:8,steps:1}]")
  SWD_STEPS=("step_scheduler.max_steps=2")
else
  TINY=("model.torch_dtype=bfloat16" "dist_env.backend=nccl")
  PBM_STEPS=("step_scheduler.max_steps=4" "block_merge.schedule=[{block_size:4,steps:2},{block_size:8,steps:2}]")
  SWD_STEPS=("step_scheduler.max_steps=2")
fi
FLEX=("bard.mask_backend=flex" "bard.flex_compile=true" "distributed.activation_checkpointing=true"
      "model.attn_implementation={text_config:flex_attention,vision_config:sdpa}")

# e2e KIND EXTRA...: tiny PBM then SWD (student: the PBM's B8 export, teacher: its B4 export)
e2e() {
  local kind=$1
  shift
  local root=$WORK/e2e_$kind
  step "e2e_${kind}_pbm" 180 "$PY" -m nemo_bard.cli finetune --config conf/bard_tiny.yaml "paths.model=$MODEL" \
    "paths.data=$DATA" "paths.run_root=$root" step_scheduler.ckpt_every_steps=100 "${TINY[@]}" "${PBM_STEPS[@]}" "$@" &&
  step "e2e_${kind}_swd" 150 "$PY" -m nemo_bard.cli finetune --config conf/bard_tiny.yaml stage=swd "paths.data=$DATA" \
    "paths.run_root=$root" step_scheduler.ckpt_every_steps=100 "${TINY[@]}" "${SWD_STEPS[@]}" "$@"
}

if ((DRY)); then
  skip e2e_flex_pbm "needs a GPU (FlexAttention has no CPU backward)"
  skip e2e_flex_swd "needs a GPU"
else
  e2e flex "${FLEX[@]}"
fi

if ((DRY)); then
  step bench_train 120 "$PY" -m nemo_bard.bench.train --preset tiny --batch-size 2 --prompt-tokens 64 \
    --response-tokens 32 --block-size 8 --iters 1 --variants ar,bard_dense,bard_dense_ac \
    --json "$OUT_DIR/bench_train.json" --markdown "$OUT_DIR/bench_train.md"
  skip ac_fit "needs a GPU (bard.max_length 8192 at batch 8 is a GPU memory check)"
else
  step bench_train 330 "$PY" -m nemo_bard.bench.train --preset qwen3vl_2b --batch-size 4 --prompt-tokens 4096 \
    --response-tokens 1024 --block-size 32 --iters 3 --variants ar,bard_dense,bard_flex,ar_ac,bard_dense_ac,bard_flex_ac \
    --json "$OUT_DIR/bench_train.json" --markdown "$OUT_DIR/bench_train.md"
  step ac_fit 200 "$PY" -m nemo_bard.bench.train --preset qwen3vl_2b --batch-size 8 --prompt-tokens 4096 \
    --response-tokens 2048 --max-length 8192 --block-size 32 --iters 2 --variants bard_flex_ac,bard_dense_ac \
    --json "$OUT_DIR/ac_fit.json" --markdown "$OUT_DIR/ac_fit.md"
fi

e2e dense peft=lora



# ------------------------------------------------------------------------------------------ summary
"$PY" - "$OUT_DIR" "$WORK" "$DRY" "$BUDGET" "$(($(date +%s) - START))" <<'EOF'
import json, sys
from pathlib import Path

out, work, dry, budget, total = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
load = lambda name: json.loads((out / name).read_text()) if (out / name).is_file() else None  # noqa: E731
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
env, train, fit, decode, agree, prof, serve = (load(n) for n in (
    "env.json", "bench_train.json", "ac_fit.json", "bench_decode.json", "agreement.json", "profile.json",
    "bench_serve.json"))


def last_losses(run):
    f = work / run / "training.jsonl"
    return [json.loads(x)["loss"] for x in f.read_text().splitlines()] if f.is_file() else None


e2e = {f"{k}_{s}": last_losses(f"e2e_{k}/bard_{s}_tiny") for k in ("flex", "dense") for s in ("pbm", "swd")}
targets = dict(train.get("targets", {})) if train else {}
fit_rows = {}
if fit:
    for name, r in fit["variants"].items():
        fits = "step_s" in r and r.get("peak_gb", 1e9) <= 80.0
        fit_rows[name] = {"fits_80GB": fits, "peak_gb": r.get("peak_gb"), "seq_len": r.get("seq_len"),
                          "step_s": r.get("step_s"), "error": r.get("error")}
        targets[f"{name}: max_length {fit.get('max_length')} at batch {fit['batch_size']} fits in 80 GB"] = fits
summary = {"dry_run": dry, "budget_s": budget, "total_s": total, "env": env, "steps": steps, "targets": targets,
           "bench_train": train, "ac_fit": fit_rows, "bench_decode": decode, "agreement": agree, "e2e_losses": e2e,
           "profile": prof, "bench_serve": serve}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

md = [f"# nemo-bard GPU check{' (dry run on CPU)' if dry else ''}", ""]
if env:
    md.append(f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}, nemo_automodel "
              f"{env.get('nemo_automodel')}; {total} s of a {budget} s budget.")
md += ["", "| step | status | seconds | note |", "|---|---|---:|---|"]
md += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['note'].replace('|', '/')[:120]} |" for s in steps]
if targets:
    md += ["", "## Targets", ""] + [f"- {k}: {'yes' if ok else 'NO'}" for k, ok in targets.items()]
for title, name in (("Training step", "bench_train.md"), ("Activation checkpointing at 8192 x 8", "ac_fit.md")):
    if (out / name).is_file():
        md += ["", f"## {title}", "", (out / name).read_text()]
if decode:
    from nemo_bard.bench.decode import markdown
    md += ["", "## Decoding", "", f"{decode['device']}, {decode['dtype']}, {decode['models']}", "", markdown(decode)]
if serve:
    from nemo_bard.bench.serve import table as serve_table
    md += ["", "## Serving (BARD vs AR server)", "", serve_table(serve), ""] + [
        f"- concurrency {r['concurrency']}: BARD / AR output tokens/s {r['output_tokens_per_s_bard_over_ar']:.2f}x"
        for r in serve["ratios"]]
if prof:
    md += ["", "## One decoding forward", "", f"{prof['models']}, {prof['point']}, batch {prof['batch']}: "
           f"{prof['ms_per_forward_graphs']:.2f} ms per forward with graphs, {prof['ms_per_forward_no_graphs']:.2f} "
           f"ms without; {prof['kernels_per_forward']} kernels and {prof['kernel_ms_per_forward']:.2f} ms of kernel "
           "time per forward", "", "```", prof["top_kernels"], "```"]
if agree:
    what = (f"{agree['rows']} prompts of {agree['data']} (eos honoured)" if agree.get("data")
            else f"{agree['rows']} synthetic prompts x {agree['max_new_tokens']} tokens")
    md += ["", "## bf16 vs fp32 tokens", "", f"{agree['model']} on {agree['device']}, {what}: " + "; ".join(
               f"{e}: {agree[e]['same_sequences']}/{agree['rows']} identical sequences, "
               f"{100 * agree[e]['token_agreement']:.1f} % of tokens" for e in ("eager", "static"))]
md += ["", "## Tiny end-to-end runs (loss per step)", ""]
md += [f"- {k}: {'not run' if v is None else ', '.join(f'{x:.3f}' for x in v)}" for k, v in e2e.items()]
(out / "summary.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
failed = [s["name"] for s in steps if s["status"] in ("failed", "timeout")]
print(f"\nsummary: {out / 'summary.md'} and summary.json; {'failed: ' + ', '.join(failed) if failed else 'no step failed'}")
sys.exit(1 if failed else 0)
EOF
rc=$?
if ((PACK)); then  # one archive beside the summary, for runners that copy back only a few files
  (cd "$OUT_DIR" && find . -mindepth 1 -maxdepth 1 ! -name summary.md ! -name summary.json ! -name details.tgz \
     -printf '%P\n' | tar czf details.tgz -T - && find . -mindepth 1 -maxdepth 1 ! -name summary.md \
     ! -name summary.json ! -name details.tgz -exec rm -rf {} +)
fi
[[ $KEEP == 1 ]] || rm -rf "$WORK"
exit $rc
