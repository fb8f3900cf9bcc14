"""The CI-sized offline demo pipeline: every stage runs through the real CLI; artefacts, report schema, the
AR / PBM-per-block / SWD / control rows and the paired comparisons."""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import pytest
from datasets import load_from_disk

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
    # any point is within 100 points of AR: the tuned point is then the fastest, and the student gets it
    main(["--quick", "--test-rows", "8", "--out", str(out), "--progress-every", "2", "--tune-tolerance", "100"])
    stdout = capsys.readouterr().out
    for stage in ("ar_sft/training.jsonl", "bard_init/config.json", "bard_pbm_demo/stages/b4/config.json",
                  "bard_pbm_demo/stages/b8/config.json", "bard_pbm_demo/stages/b16/config.json",
                  "bard_swd_demo/student_b16/model.safetensors", "bard_pbm_demo/resolved_config.yaml",
                  "bard_swd_demo_control/student_b16/model.safetensors"):
        assert (out / stage).exists(), stage
    # SWD and its control: the same run (B16 student from the PBM export, B4 anchor) but for the KD weight
    swd_log, control_log = ((out / "logs" / f"{n}.log").read_text() for n in ("swd", "control"))
    assert "student block 16, teacher block 4" in swd_log and "weights ce 1.00 / kd 0.50" in swd_log
    assert "student block 16, teacher block 4" in control_log and "weights ce 1.00 / kd 0.00" in control_log
    assert json.loads((out / "digits" / "digits_config.json").read_text())["task"] == "odd_count"
    # the AR model learns to read the same images first, then the task from that export
    assert json.loads((out / "digits_read" / "digits_config.json").read_text())["task"] == "read"
    ar_config = (out / "ar_sft" / "resolved_config.yaml").read_text()
    assert str(out / "ar_read" / "LATEST" / "model" / "consolidated") in ar_config
    assert json.loads((out / "bard_init" / "config.json").read_text())["model_type"] == "bard_vl"
    report = json.loads((out / "report" / "results.json").read_text())
    rows = report["results"]
    ar_rows = [r for r in rows if r["kind"] == "ar"]
    assert [r["engine"] for r in ar_rows] == ["static"] and report["reference"] == ar_rows[0]["name"]
    assert [(r["model"], r["threshold"]) for r in rows] == [
        ("AR (NeMo SFT)", None),
        *[(f"PBM stage B{b}", t) for b in (4, 8, 16) for t in (1.0, 0.9)],
        *[(m, t) for m in ("SWD B16 (B4 anchor)", "Control B16 (SWD without KD)") for t in (1.0, 0.9)],
        ("SWD B16 (point tuned on dev)", rows[-1]["threshold"])]
    # tuned on the dev split (held-out scans, no test row), written to the student, evaluated on test
    tuned = json.loads((out / "report" / "tune.json").read_text())
    block, steps, tau, strategy = tuned["point"].split(":")
    assert tuned["evidence"]["rows"] == 8 and block == "16", tuned
    assert (rows[-1]["denoising_steps"], rows[-1]["threshold"]) == (int(steps), float(tau))
    student = out / "bard_swd_demo" / "student_b16"
    gen = json.loads((student / "generation_config.json").read_text())
    assert (gen["denoising_steps"], gen["confidence_threshold"], gen["remasking_strategy"]) == (
        int(steps), float(tau), f"low_confidence_{strategy}"), gen
    assert (student / "decoding_point.json").is_file()
    assert "tuned on 8 dev rows" in (out / "report" / "tune.md").read_text()
    cost = tuned["cost_vs_one_evaluation"]  # tuning against the chosen point's one evaluation, both of this run
    assert cost["evaluation_rows"] == 8 and cost["tuning_s"] == tuned["wall_s"]
    assert cost["ratio"] == pytest.approx(cost["tuning_s"] / cost["evaluation_s"], rel=0.05)
    assert f"Tuning took {tuned['wall_s']:.1f} s" in (out / "report" / "results.md").read_text()
    dev, test = (load_from_disk(str(out / "digits" / split))["scan_ids"] for split in ("dev", "test"))
    assert len(dev) == 8 and not {tuple(r) for r in dev} & {tuple(r) for r in test}
    keys = {"accuracy", "char_accuracy", "tokens_per_forward", "tokens_per_second", "num_forwards", "wall_time",
            "block_size", "denoising_steps", "threshold", "speedup_vs_reference", "n", "accuracy_ci95",
            "decode_tokens_per_second", "decode_speedup_vs_reference", "engine"}
    for r in rows:
        assert keys <= set(r), keys - set(r)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] == 8
    assert {r["block_size"] for r in rows if r["kind"] == "bard"} == {4, 8, 16}
    table = (out / "report" / "results.md").read_text()
    assert table.count("\n| ") >= len(rows) and "×AR" in table
    comps = {c["comparison"]: c for c in json.loads((out / "report" / "comparisons.json").read_text())}
    for t in ("1", "0.9"):
        for label in (f"PBM B16 - PBM B4, τ {t} (large blocks lose?)",
                      f"SWD B16 - Control B16, τ {t} (distillation itself)",
                      f"SWD B16 - PBM B16, τ {t} (SWD recovers?)",
                      f"Control B16 - PBM B16, τ {t} (training further)"):
            c = comps[label]
            assert c["n"] == 8 and c["ci95"][0] <= c["diff"] <= c["ci95"][1], c
    assert comps["SWD B16 at its tuned point - AR"]["n"] == 8
    assert "Paired differences" in table and "distillation itself" in table
    assert (out / "report" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "report" / "run.json").read_text())
    assert set(meta["times_s"]) == {"setup", "ar_read", "ar_sft", "pbm", "swd", "control", "tune", "eval",
                                  "total"}
    assert meta["swd_steps"] == meta["control_steps"] and meta["anchor"] == "PBM stage B4"
    # every stage reports progress on the console
    for label in ("[ar_read] ", "[ar_sft] ", "[pbm] ", "[swd] ", "[control] ", "[tune] ", "[eval] "):
        assert label in stdout, label
    again = main(["--out", str(out), "--eval-only", "--engine", "eager", "--threshold", "0.8"])
    assert again["meta"]["engine"] == "eager" and again["meta"]["eval_only"] is True
    assert again["meta"]["times_s"]["pbm"] == meta["times_s"]["pbm"]  # training times kept
    assert {r["threshold"] for r in again["rows"] if r["model"] in ("SWD B16 (B4 anchor)",
                                                                   "Control B16 (SWD without KD)")} == {1.0, 0.8}
    relabelled = json.loads((out / "report" / "comparisons.json").read_text())
    assert sum("τ 0.8" in c["comparison"] for c in relabelled) == 6
    with pytest.raises(SystemExit, match="--eval-only needs a finished demo in .*missing"):
        main(["--out", str(tmp_path / "nothing"), "--eval-only"])
