"""scripts/gpu_check.sh --dry-run: the GPU check's sequence on this CPU at tiny sizes, and its summary."""

from __future__ import annotations

import json
import tarfile
import os
import subprocess
import sys

from tests.e2e_utils import REPO

# CI runs the script's plumbing (budget, step records, summary) with the CPU steps no other test covers: the
# environment record and the bf16-vs-fp32 agreement tool; gpu_tests is selected to show that it is recorded as
# skipped without a GPU. (bench.decode, bench.train and the CLI runs have their own tests: tests/test_bench_*.py,
# tests/test_e2e_*.py.)
SELECTED = ["env", "prepare", "agreement", "gpu_tests"]


def test_gpu_check_dry_run(tiny_bard_dir, tmp_path):
    from nemo_bard.data.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", rows=16, seed=0)
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_MODEL": str(tiny_bard_dir), "GPU_CHECK_DATA": str(data),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("OUT", None)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out), "--only", ",".join(SELECTED), "--pack"],
                          cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert list(status) == SELECTED  # in the script's order (most important first), nothing else
    assert {k for k, v in status.items() if v != "ok"} == {"gpu_tests"} and status["gpu_tests"] == "skipped"
    assert summary["env"]["transformers"].startswith("5.18") and summary["dry_run"] is True
    assert summary["bench_train"] is None  # not selected
    assert summary["e2e_losses"] == {"flex_pbm": None, "flex_swd": None, "dense_pbm": None, "dense_swd": None}
    assert summary["bench_decode"] is None and set(summary["agreement"]) >= {"eager", "static"}
    md = (out / "summary.md").read_text()
    for section in ("| agreement | ok |", "| gpu_tests | skipped |", "## bf16 vs fp32 tokens"):
        assert section in md, section
    assert sorted(p.name for p in out.iterdir()) == ["details.tgz", "summary.json", "summary.md"]  # --pack
    with tarfile.open(out / "details.tgz") as tar:
        assert {"agreement.json", "logs/agreement.log", "steps.jsonl"} <= set(tar.getnames())
