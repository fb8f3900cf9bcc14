"""The `automodel` / `nemo-bard` front door: argument forms, Hydra composition, hand-over to NeMo."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from nemo_bard.cli import CLIError, compose, split_argv
from tests.e2e_utils import AUTOMODEL, REPO

FIX = REPO / "tests" / "fixtures"


def test_split_argv_forms():
    cfg, nproc, hydra, nemo = split_argv(["finetune", "--config", str(FIX / "echo_plain.yaml"), "a.b=1", "--x.y=2",
                                          "--nproc-per-node", "2", "--z.w", "3"])
    assert cfg == (FIX / "echo_plain.yaml").resolve() and nproc == 2
    assert hydra == ["a.b=1"] and nemo == ["--x.y=2", "--z.w", "3"]
    cfg2, nproc2, hydra2, nemo2 = split_argv([str(FIX / "echo_plain.yaml"), "--nproc_per_node=4", "--flag"])
    assert cfg2 == cfg and nproc2 == 4 and hydra2 == [] and nemo2 == ["--flag"]


@pytest.mark.parametrize(
    "argv,match",
    [
        (["finetune"], "no config given"),
        (["finetune", "--config", "nope.yaml"], "does not exist"),
        (["finetune", "--config"], "needs a path"),
        (["conf/bard_pbm.yaml", "--nproc-per-node", "two"], "expects an integer"),
        (["conf/bard_pbm.yaml", "stray"], "unexpected argument"),
    ],
)
def test_split_argv_errors(argv, match):
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with pytest.raises(CLIError, match=match):
            split_argv(argv)
    finally:
        os.chdir(cwd)


def test_compose_config_groups_and_overrides():
    pbm = compose(REPO / "conf" / "bard_pbm.yaml", [], [])
    assert pbm["recipe"] == "nemo_bard.recipes.pbm.BardPBMRecipe"
    assert [s["block_size"] for s in pbm["block_merge"]["schedule"]] == [4, 8, 16, 32]
    assert pbm["optimizer"]["lr"] == 2e-5 and pbm["optimizer"]["param_group_overrides"][0]["lr_mult"] == 0.1
    assert "defaults" not in pbm and "${" not in json.dumps(pbm)  # every interpolation resolved
    swd = compose(REPO / "conf" / "bard_pbm.yaml", ["stage=swd", "model=qwen3vl_2b", "step_scheduler.max_steps=10"],
                  ["--optimizer.lr=3e-6", "--kd.top_k=8"])
    assert swd["recipe"] == "nemo_bard.recipes.swd.BardSWDRecipe" and "block_merge" not in swd
    assert swd["model"]["pretrained_model_name_or_path"] == "runs/bard_pbm_qwen3vl_2b/stages/b16"
    assert swd["teacher_model"]["pretrained_model_name_or_path"] == "runs/bard_pbm_qwen3vl_2b/stages/b4"
    assert swd["step_scheduler"]["max_steps"] == 10 and swd["optimizer"]["lr"] == 3e-6 and swd["kd"]["top_k"] == 8
    assert swd["bard"]["noise"] == {"type": "uniform_sample", "min_rate": 0.1, "max_rate": 0.5}
    assert compose(REPO / "conf" / "bard_swd.yaml", [], []) == compose(REPO / "conf" / "bard_pbm.yaml", ["stage=swd"], [])
    with pytest.raises(CLIError, match="could not compose"):
        compose(REPO / "conf" / "bard_pbm.yaml", ["model=qwen3vl_99b"], [])


def test_demo_configs_override_only_what_they_name():
    """The demo's tuning files change a few keys; Hydra's merge keeps the stage's other values under them."""
    pbm = compose(REPO / "conf" / "bard_demo.yaml", [], [])
    assert (pbm["optimizer"]["lr"], pbm["lr_scheduler"]["min_lr"]) == (2e-3, 2e-4)  # the demo AR model's own lr
    assert pbm["bard"]["noise"] == {"type": "stratified_blocks", "min_rate": 0.001, "max_rate": 1.0}
    assert [(s["block_size"], s["steps"]) for s in pbm["block_merge"]["schedule"]] == [(4, 1200), (8, 200), (16, 200)]
    swd = compose(REPO / "conf" / "bard_demo.yaml", ["stage=swd"], [])
    assert swd["recipe"] == "nemo_bard.recipes.swd.BardSWDRecipe" and swd["optimizer"]["lr"] == 3e-4
    # rates up to 1: the first denoising steps of a block see it (nearly) fully masked; the rest stays the stage's
    assert swd["bard"]["noise"] == {"type": "uniform_sample", "min_rate": 0.1, "max_rate": 1.0}
    assert swd["bard"]["loss"]["reduction"] == "token_mean" and swd["bard"]["max_length"] == 256


def _run(args, tmp_path, monkeypatch, capsys):
    """The console script's entry point in this process (the hand-over to NeMo's app is in-process too)."""
    from nemo_bard.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(args)
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    return json.loads((tmp_path / "echo.json").read_text()), out


def test_nemo_form_reaches_recipe_unchanged(tmp_path, monkeypatch, capsys):
    out, _ = _run([str(FIX / "echo_plain.yaml"), f"--echo_file={tmp_path / 'echo.json'}", "--optimizer.lr=3e-4"],
                  tmp_path, monkeypatch, capsys)
    assert out["optimizer"]["lr"] == 3e-4 and out["nested"] == {"a": 1} and out["_world_size"] == 1


def test_finetune_form_without_and_with_hydra_overrides(tmp_path, monkeypatch, capsys):
    out, _ = _run(["finetune", "--config", str(FIX / "echo_plain.yaml"), f"--echo_file={tmp_path / 'echo.json'}"],
                  tmp_path, monkeypatch, capsys)
    assert out["optimizer"]["lr"] == 1e-4
    out, stdout = _run(["finetune", "--config", str(FIX / "hydra" / "echo.yaml"), "opt=sgd", "opt.lr=0.5",
                        f"echo_file={tmp_path / 'echo.json'}", f"checkpoint.checkpoint_dir={tmp_path / 'run'}"],
                       tmp_path, monkeypatch, capsys)
    assert out["opt"] == {"kind": "sgd", "lr": 0.5} and out["name"] == "run_sgd"
    resolved = tmp_path / "run" / "resolved_config.yaml"
    assert yaml.safe_load(resolved.read_text())["opt"]["kind"] == "sgd"
    assert str(resolved) in stdout
    assert not (tmp_path / "run" / ".nemo_bard.lock").exists()  # the run-directory lock is released


def test_a_changed_config_keeps_the_run_directorys_previous_resolved_config(tmp_path, capsys):
    """Re-running into a run directory with another config (a resume, maybe refused) never loses the config its
    checkpoints were trained with; the same config again writes nothing new."""
    from nemo_bard.cli import write_resolved

    run = tmp_path / "run"
    first = {"checkpoint": {"checkpoint_dir": str(run)}, "step_scheduler": {"max_steps": 8}}
    write_resolved(first, Path("x.yaml"))
    write_resolved(dict(first), Path("x.yaml"))
    assert sorted(p.name for p in run.iterdir()) == ["resolved_config.yaml"]
    second = {**first, "step_scheduler": {"max_steps": 12}}
    third = {**first, "step_scheduler": {"max_steps": 16}}
    write_resolved(second, Path("x.yaml"))
    write_resolved(third, Path("x.yaml"))
    kept = sorted(run.glob("resolved_config.*.yaml"))
    assert len(kept) == 2 and "kept as" in capsys.readouterr().err
    assert sorted(yaml.safe_load(p.read_text())["step_scheduler"]["max_steps"] for p in kept) == [8, 12]
    assert yaml.safe_load((run / "resolved_config.yaml").read_text())["step_scheduler"]["max_steps"] == 16


def test_print_resolved_only_composes(tmp_path, monkeypatch, capsys):
    from nemo_bard.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["finetune", "--config", str(FIX / "hydra" / "echo.yaml"), "--print-resolved",
               f"checkpoint.checkpoint_dir={tmp_path / 'r'}", f"echo_file={tmp_path / 'never.json'}"])
    assert rc == 0 and capsys.readouterr().out.strip() == str(tmp_path / "r" / "resolved_config.yaml")
    assert not (tmp_path / "never.json").exists()


def test_nemo_bard_alias_and_two_workers(tmp_path):
    """Two workers under torchrun; the user error rank 1 raises is one line per failing rank and one summary line,
    exit 2, no traceback (torchrun's own is replaced)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    nemo_bard = str(Path(AUTOMODEL).with_name("nemo-bard"))
    proc = subprocess.run([nemo_bard, "finetune", "--config", str(FIX / "echo_plain.yaml"), "--nproc-per-node", "2",
                           f"--echo_file={tmp_path / 'echo.json'}", "--fail_other_ranks=bad row 7 in data.jsonl"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert json.loads((tmp_path / "echo.json").read_text())["_world_size"] == 2
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "[rank 1] nemo-bard: error: bad row 7 in data.jsonl" in proc.stderr.splitlines()  # the name typed
    assert proc.stderr.strip().splitlines()[-1] == (
        "nemo-bard: error: training process rank 1 exited with code 2 (its message is above)")


def test_bad_bard_section_is_one_line(tmp_path, monkeypatch, capsys):
    """A schema error in a composed BARD config: exit 2, one stderr line naming the key, nothing written (that
    such errors come before any heavy import is tests/test_faults.py::test_user_errors_answer_before_heavy_imports)."""
    from nemo_bard.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["finetune", "--config", str(REPO / "conf" / "bard_tiny.yaml"), "bard.noise.type=gaussian",
               f"checkpoint.checkpoint_dir={tmp_path / 'run'}"])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "automodel: error: bard.noise.type: input should be 'stratified_blocks' or 'uniform_sample' (got 'gaussian')"]
    assert not (tmp_path / "run").exists()


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && python -m pytest -q"
    assert command in readme.splitlines() and command in ci.splitlines()
