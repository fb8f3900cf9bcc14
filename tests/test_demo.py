"""The CI-sized offline demo pipeline: every stage runs through the real CLI; artefacts and report schema."""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import pytest

from tests.e2e_utils import REPO, ForkedCLI

pytestmark = pytest.mark.e2e


def test_quick_demo_pipeline(tmp_path, capsys, monkeypatch):
    """The demo script in this process; its stages are CLI runs in their own processes, as for a user (forked from
    the tests' warm server instead of new interpreters: see tests/e2e_utils.py)."""
    from nemo_bard import demo
    from nemo_bard.demo import main

    out = tmp_path / "demo"
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(demo, "subprocess", SimpleNamespace(Popen=ForkedCLI, STDOUT=subprocess.STDOUT,
                                                            TimeoutExpired=subprocess.TimeoutExpired))
    main(["--quick", "--test-rows", "8", "--out", str(out), "--progress-every", "2"])
    stdout = capsys.readouterr().out
    for stage in ("ar_sft/training.jsonl", "bard_init/config.json", "bard_pbm_demo/stages/b4/config.json",
                  "bard_pbm_demo/stages/b8/config.json", "bard_pbm_demo/stages/b16/config.json",
                  "bard_swd_demo/student_b16/model.safetensors", "bard_pbm_demo/resolved_config.yaml"):
        assert (out / stage).exists(), stage
    assert json.loads((out / "bard_init" / "config.json").read_text())["model_type"] == "bard_vl"
    report = json.loads((out / "report" / "results.json").read_text())
    rows = report["results"]
    ar_rows = [r for r in rows if r["kind"] == "ar"]
    assert [r["engine"] for r in ar_rows] == ["static", "hf"]  # AR through the engine and HF generate
    assert report["reference"] == max(ar_rows, key=lambda r: r["tokens_per_second"])["name"]  # the fastest AR row
    assert [r["model"] for r in rows].count("SWD B16 (B4 anchor)") == 3
    keys = {"accuracy", "char_accuracy", "tokens_per_forward", "tokens_per_second", "num_forwards", "wall_time",
            "block_size", "denoising_steps", "threshold", "speedup_vs_reference", "n", "accuracy_ci95",
            "decode_tokens_per_second", "decode_speedup_vs_reference", "engine"}
    for r in rows:
        assert keys <= set(r), keys - set(r)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] == 8
    assert {r["block_size"] for r in rows if r["kind"] == "bard"} == {4, 8, 16}
    table = (out / "report" / "results.md").read_text()
    assert table.count("\n| ") >= len(rows) and "×AR" in table
    assert (out / "report" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "report" / "run.json").read_text())
    assert set(meta["times_s"]) == {"setup", "ar_sft", "pbm", "swd", "eval", "total"}
    for label in ("[ar_sft] ", "[pbm] ", "[swd] ", "[eval] "):  # every stage reports progress on the console
        assert label in stdout, label
    again = main(["--out", str(out), "--eval-only", "--engine", "eager", "--threshold", "0.8"])
    assert again["meta"]["engine"] == "eager" and again["meta"]["eval_only"] is True
    assert again["meta"]["times_s"]["pbm"] == meta["times_s"]["pbm"]  # training times kept
    assert {r["threshold"] for r in again["rows"] if r["model"].startswith("SWD")} == {1.0, 0.8, 0.7}
    with pytest.raises(SystemExit, match="--eval-only needs a finished demo in .*missing"):
        main(["--out", str(tmp_path / "nothing"), "--eval-only"])
