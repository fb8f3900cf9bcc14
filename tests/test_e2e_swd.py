"""End-to-end SWD on CPU: B8 student from a tiny PBM export, B4 anchor, through `automodel finetune`."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open

from tests.e2e_utils import run_cli, training_log

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pbm_exports(tiny_bard_dir, tmp_path_factory):
    """A short PBM 4 -> 8 run providing stages/b4 (anchor) and stages/b8 (student)."""
    from nemo_bard.data.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path_factory.mktemp("colours_swd"), rows=48, seed=1)
    root = tmp_path_factory.mktemp("swd_root")
    run_cli(["finetune", "--config", "conf/bard_tiny.yaml", f"paths.model={tiny_bard_dir}", f"paths.data={data}",
             f"paths.run_root={root}", "step_scheduler.ckpt_every_steps=100", "--optimizer.lr=2e-3"])
    return root, data


def swd_args(root, data, *extra):
    return ["finetune", "--config", "conf/bard_tiny.yaml", "stage=swd", f"paths.data={data}", f"paths.run_root={root}",
            *extra]


@pytest.fixture(scope="module")
def swd_run(pbm_exports):
    root, data = pbm_exports
    proc = run_cli(swd_args(root, data, "step_scheduler.max_steps=8", "step_scheduler.ckpt_every_steps=4",
                            "optimizer.lr=2e-3"))
    return root / "bard_swd_tiny", proc


def test_kd_and_ce_decrease(swd_run):
    run, proc = swd_run
    log = training_log(run)
    assert sorted(log) == list(range(8)) and {rec["block_size"] for rec in log.values()} == {8}
    first = {k: sum(log[s][k] for s in (0, 1)) / 2 for k in ("ce_loss", "kd_loss")}
    last = {k: sum(log[s][k] for s in (6, 7)) / 2 for k in ("ce_loss", "kd_loss")}
    assert last["ce_loss"] < first["ce_loss"] and last["kd_loss"] < first["kd_loss"], (first, last)
    for rec in log.values():
        assert {"ce_loss", "kd_loss", "teacher_entropy", "top1_agree"} <= set(rec)
    assert "student block 8, teacher block 4" in proc.stderr + proc.stdout


def test_checkpoint_holds_student_only_and_final_export(swd_run, pbm_exports):
    from transformers import AutoModelForImageTextToText

    run, _ = swd_run
    root, _ = pbm_exports
    ckpt = (run / "LATEST").resolve()  # the final checkpoint (step 7)
    assert ckpt.name.endswith("step_7")
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["dataloader", "model", "optim", "rng"]
    keys = set()
    for shard in (ckpt / "model").glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            keys |= set(f.keys())
    student = AutoModelForImageTextToText.from_pretrained(run / "student_b8")
    assert keys == set(student.state_dict()), "checkpoint must hold exactly one (the student's) set of weights"
    teacher = AutoModelForImageTextToText.from_pretrained(root / "bard_pbm_tiny" / "stages" / "b4").state_dict()
    with safe_open(next((ckpt / "model").glob("*.safetensors")), "pt") as f:
        name = "lm_head.weight"
        saved = f.get_tensor(name)
    assert torch.equal(saved, student.state_dict()[name]) and not torch.equal(saved, teacher[name])
    assert student.config.block_size == 8


def test_resume_continues(swd_run, pbm_exports, tmp_path):
    run, _ = swd_run
    root, data = pbm_exports
    resumed_root = tmp_path
    shutil.copytree(run / "epoch_0_step_3", resumed_root / "bard_swd_tiny" / "epoch_0_step_3")
    run_cli(swd_args(root, data, "step_scheduler.max_steps=8", "step_scheduler.ckpt_every_steps=4", "optimizer.lr=2e-3",
                     f"paths.run_root={resumed_root}", "paths.pbm_run=" + str(root / "bard_pbm_tiny"),
                     f"checkpoint.restore_from={resumed_root / 'bard_swd_tiny' / 'epoch_0_step_3'}"))
    a, b = training_log(run), training_log(resumed_root / "bard_swd_tiny")
    assert sorted(b) == [4, 5, 6, 7]
    for s in b:
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5, abs=1e-6)


def test_two_process_swd(pbm_exports, tmp_path):
    root, data = pbm_exports
    run_cli(swd_args(root, data, "--nproc-per-node", "2", "step_scheduler.max_steps=3",
                     "step_scheduler.ckpt_every_steps=100", f"paths.run_root={tmp_path}",
                     "paths.pbm_run=" + str(root / "bard_pbm_tiny")))
    run = tmp_path / "bard_swd_tiny"
    assert sorted(training_log(run)) == [0, 1, 2]
    assert len(list((run / "epoch_0_step_2" / "model").glob("shard-*.safetensors"))) == 2
    assert (run / "student_b8" / "config.json").exists()


def test_vocab_mismatch_and_block_errors_before_training(pbm_exports, tmp_path):
    import json

    root, data = pbm_exports
    bad = tmp_path / "teacher_b3"
    shutil.copytree(root / "bard_pbm_tiny" / "stages" / "b4", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["block_size"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    proc = run_cli(swd_args(root, data, f"paths.teacher={bad}", f"paths.run_root={tmp_path}",
                            f"paths.pbm_run={root / 'bard_pbm_tiny'}"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [  # answered before any heavy import
        "automodel: error: teacher block size 3 does not divide student block size 8; SWD distills a small-block "
        "anchor into a larger block (e.g. teacher 4, student 8/16/32)"]
    cfg["block_size"] = 4
    cfg["text_config"]["vocab_size"] = cfg["text_config"]["vocab_size"] + 32
    (bad / "config.json").write_text(json.dumps(cfg))
    proc = run_cli(swd_args(root, data, f"paths.teacher={bad}", f"paths.run_root={tmp_path}",
                            f"paths.pbm_run={root / 'bard_pbm_tiny'}"), check=False)
    assert proc.returncode == 2 and "vocabularies differ" in proc.stderr
    assert str(bad) in proc.stderr and "stages/b8" in proc.stderr  # names both models
