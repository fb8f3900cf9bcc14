"""End-to-end PBM on CPU through the real `automodel` front door (tiny model, tiny offline data)."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch
import yaml

from nemo_bard.rundir import is_complete
from tests.e2e_utils import (
    cosine_lr,
    fixed_masked_ce,
    lr_offset_and_multiplier,
    run_cli,
    start_cli,
    training_log,
    wait_for,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    from nemo_bard.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("colours"), rows=48, seed=0, video_every=6)  # 8 clips


def tiny_args(model_dir, data_path, run_root, *extra):
    return ["finetune", "--config", "conf/bard_tiny.yaml", f"paths.model={model_dir}", f"paths.data={data_path}",
            f"paths.run_root={run_root}", *extra]


@pytest.fixture(scope="module")
def pbm_run(tiny_bard_dir, data_path, tmp_path_factory):
    """PBM 4 -> 8 (4 + 4 steps), checkpoints every 3 steps; Hydra overrides + a NeMo-style override."""
    root = tmp_path_factory.mktemp("pbm")
    proc = run_cli(tiny_args(tiny_bard_dir, data_path, root, "step_scheduler.ckpt_every_steps=3", "--optimizer.lr=2e-3"))
    return root / "bard_pbm_tiny", proc


def test_block_size_switches_at_boundary_and_stages_export(pbm_run):
    run, proc = pbm_run
    log = training_log(run)
    assert sorted(log) == list(range(8))
    assert [log[s]["block_size"] for s in range(8)] == [4, 4, 4, 4, 8, 8, 8, 8]
    assert "block size 4 -> 8" in proc.stderr + proc.stdout
    resolved = yaml.safe_load((run / "resolved_config.yaml").read_text())
    assert resolved["optimizer"]["lr"] == 2e-3  # NeMo-style override folded into the resolved file
    assert resolved["recipe"] == "nemo_bard.recipes.pbm.BardPBMRecipe"


def test_stage_export_loads_with_from_pretrained(pbm_run, tiny_bard_dir):
    from transformers import AutoModelForImageTextToText

    from nemo_bard import BardVLForConditionalGeneration

    run, _ = pbm_run
    for b in (4, 8):
        model = AutoModelForImageTextToText.from_pretrained(run / "stages" / f"b{b}")
        assert isinstance(model, BardVLForConditionalGeneration) and model.config.block_size == b
    before = AutoModelForImageTextToText.from_pretrained(tiny_bard_dir).state_dict()
    after = AutoModelForImageTextToText.from_pretrained(run / "stages" / "b4").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "stage export must hold trained weights"


def test_loss_decreases(pbm_run, tiny_bard_dir, data_path):
    run, _ = pbm_run
    start = fixed_masked_ce(tiny_bard_dir, data_path)
    end = fixed_masked_ce(run / "stages" / "b8", data_path)
    assert end < start - 0.5, (start, end)
    log = training_log(run)
    assert all(torch.isfinite(torch.tensor(rec["loss"])) for rec in log.values())


def test_bad_schedule_is_a_clear_error_before_training(tiny_bard_dir, data_path, tmp_path):
    proc = run_cli(tiny_args(tiny_bard_dir, data_path, tmp_path, "step_scheduler.max_steps=9"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "automodel: error: block_merge.schedule steps sum to 8 but step_scheduler.max_steps=9; make them equal"]
    assert not (tmp_path / "bard_pbm_tiny").exists()


def test_empty_dataset_fails_before_model_loads(tiny_bard_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    proc = run_cli(tiny_args(tiny_bard_dir, empty, tmp_path), check=False)
    out = proc.stderr + proc.stdout
    assert proc.returncode == 2 and "Traceback" not in out  # raised inside NeMo's setup: still one line, exit 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"automodel: error: dataset {empty} has no usable rows (1 rows, 1 without an assistant response)")
    assert "Instantiating" not in out and "Loading weights" not in out


def test_resume_mid_stage_continues_exactly(pbm_run, tiny_bard_dir, data_path, tmp_path):
    """One command, run three times in one directory: the first run is SIGKILLed when step 3 starts (mid B=4 stage,
    after the step-2 checkpoint); the second resumes from LATEST (the dead run's lock is stale) and gets SIGTERM
    when step 4 starts (it finishes the step, saves a checkpoint, exits 143); the third finishes. Every step's loss
    equals the uninterrupted run's. A second run started while the first is alive is refused at once, and
    training.jsonl keeps every step logged before the SIGKILL."""
    full, _ = pbm_run
    root = tmp_path / "killed"
    run = root / "bard_pbm_tiny"
    faults = ",".join(f"{{_target_:tests.fault_callbacks.SignalAt,step:{step},signal:{sig},once:'{tmp_path / sig}'}}"
                      for step, sig in ((3, "SIGKILL"), (4, "SIGTERM")))
    args = tiny_args(tiny_bard_dir, data_path, root, "step_scheduler.ckpt_every_steps=3", "--optimizer.lr=2e-3",
                     f"+callbacks=[{faults}]")
    proc = start_cli(args, tmp_path / "log1.txt")
    try:
        wait_for(lambda: (run / ".nemo_bard.lock").exists(), timeout=120, proc=proc)
        second = run_cli(args, check=False, timeout=120)  # meanwhile, the same run again on the same directory
        assert proc.wait(timeout=400) == -signal.SIGKILL
    finally:
        proc.kill()
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"run directory {run} is in use by another run (pid {proc.pid} on " in second.stderr
    assert sorted(training_log(run)) == [0, 1, 2]  # every step logged before the kill is on disk
    assert (run / "LATEST").resolve() == (run / "epoch_0_step_2").resolve()

    stopped = run_cli(args, check=False)  # resumes at step 3, stops on SIGTERM during step 4
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"automodel: stopped by signal SIGTERM after step 4 (checkpoint {run}/epoch_0_step_4 saved); "
        "resume with the same command")
    assert (run / "LATEST").resolve() == (run / "epoch_0_step_4").resolve()

    run_cli(args)  # the same command finishes the run (resumed mid B=8 stage)
    a, b = training_log(full), training_log(run)
    assert sorted(b) == list(range(8))
    for step in range(8):
        assert b[step]["block_size"] == a[step]["block_size"]
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-6), step
    assert all(is_complete(run / "stages" / f"b{size}") for size in (4, 8))
    assert not (run / ".nemo_bard.lock").exists()


def test_resume_with_a_changed_schedule(pbm_run, tiny_bard_dir, data_path, tmp_path):
    """The finished 4:4,8:4 run, resumed with 4:6,8:2 (its finished b4 stage made longer), is refused with one line
    and nothing changes; resumed with an appended stage (4:4,8:4,16:4, max_steps 12) it trains steps 8-11 at B16
    on the LR schedule a 12-step run has (not at the 8-step run's min_lr) and keeps the b4 and b8 exports."""
    full, _ = pbm_run
    root = tmp_path / "resumed"
    run = root / "bard_pbm_tiny"
    shutil.copytree(full, run, symlinks=True)
    def exports() -> dict[int, list]:
        return {b: sorted((p.name, p.read_bytes()) for p in (run / "stages" / f"b{b}").iterdir()) for b in (4, 8)}

    before = exports()
    trained_with = (run / "resolved_config.yaml").read_text()
    args = tiny_args(tiny_bard_dir, data_path, root, "step_scheduler.ckpt_every_steps=3", "--optimizer.lr=2e-3")

    refused = run_cli([*args, "block_merge.schedule=[{block_size:4,steps:6},{block_size:8,steps:2}]"], check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    last = next(run.glob("epoch_*_step_7"))
    assert refused.stderr.strip().splitlines()[-1] == (
        f"automodel: error: block_merge.schedule 4:6,8:2 does not match the checkpoint {last}, trained "
        "for 8 steps under 4:4,8:4: stage 1 (block size 4, steps 0-3) is finished (exported as b4) but the new "
        "schedule gives it 6 steps; keep 4:4,8:4 as it was (the running stage may grow, later stages may change or "
        "be added, with step_scheduler.max_steps their sum) or train in a new checkpoint.checkpoint_dir")
    assert sorted(training_log(run)) == list(range(8)) and exports() == before
    assert [p.read_text() for p in run.glob("resolved_config.*.yaml")] == [trained_with]  # kept, not overwritten

    grown = run_cli([*args, "step_scheduler.max_steps=12",
                     "block_merge.schedule=[{block_size:4,steps:4},{block_size:8,steps:4},{block_size:16,steps:4}]"])
    assert "the LR schedule is re-derived for 12 steps (decay over 12 steps, was 8)" in grown.stdout + grown.stderr
    old, log = training_log(full), training_log(run)
    assert sorted(log) == list(range(12)) and [log[s]["block_size"] for s in range(8, 12)] == [16] * 4
    # which scheduler step a logged step's LR is, and the parameter group's lr multiplier, from the original run
    offset, mult = lr_offset_and_multiplier(old, 8)
    assert cosine_lr(8 + offset, 8, mult) == pytest.approx(1e-4 * mult)  # where NeMo's restore alone would stay
    for step in range(8, 12):
        assert log[step]["lr"] == pytest.approx(cosine_lr(step + offset, 12, mult)), step
    assert log[8]["lr"] > 2e-4 * mult
    assert is_complete(run / "stages" / "b16")
    assert exports() == before


def test_two_process_fsdp2_native_form_mixed_batches(pbm_run, tiny_bard_dir, tmp_path, capsys):
    """`automodel <plain NeMo yaml> --nproc-per-node 2 --a.b=c` (NeMo AutoModel 0.7's own form) with real FSDP2
    sharding on CPU (gloo): the block size switches on schedule, one checkpoint shard file per rank, and NeMo's
    activation checkpointing (its sharded FSDP2 path) on every layer of the bard_vl model. Text-only, image and
    video-file rows: a rank whose micro-batch lacks images or videos still runs the (sharded) vision tower (no
    FSDP hang, finite loss); the stage export then answers about a clip."""
    from transformers import AutoModelForImageTextToText

    from nemo_bard.data.synthetic import write_synthetic_dataset
    from nemo_bard.generate import main as generate

    data = write_synthetic_dataset(tmp_path / "mixed", rows=24, seed=3, text_only_every=2, video_every=3)
    assert len(list((tmp_path / "mixed" / "videos").glob("*.mp4"))) == 4
    run, _ = pbm_run
    cfg = yaml.safe_load((run / "resolved_config.yaml").read_text())
    cfg["checkpoint"]["checkpoint_dir"] = str(tmp_path / "native")
    cfg["dataset"]["path"] = str(data)
    cfg["step_scheduler"].update(local_batch_size=1, global_batch_size=2, ckpt_every_steps=100)
    cfg["bard"]["length_grouped"] = False
    cfg["block_merge"]["schedule"] = [{"block_size": 4, "steps": 3}, {"block_size": 8, "steps": 3}]
    plain = tmp_path / "plain_nemo.yaml"
    plain.write_text(yaml.safe_dump(cfg))
    proc = run_cli([str(plain), "--nproc-per-node", "2", "--step_scheduler.max_steps=6",
                    "--distributed.activation_checkpointing=true"], timeout=300)
    assert "torch.distributed.run" in proc.stdout
    assert "activation checkpointing: 16 modules recompute their activations in backward" in proc.stdout + proc.stderr
    native = tmp_path / "native"
    log = training_log(native)
    assert sorted(log) == list(range(6)) and all(torch.isfinite(torch.tensor(r["loss"])) for r in log.values())
    assert [log[s]["block_size"] for s in range(6)] == [4, 4, 4, 8, 8, 8]
    shards = sorted(p.name for p in (native / "epoch_0_step_5" / "model").glob("shard-*.safetensors"))
    assert len(shards) == 2, shards
    assert AutoModelForImageTextToText.from_pretrained(native / "stages" / "b4").config.block_size == 4
    stats = tmp_path / "gen.json"
    clip = tmp_path / "mixed" / "videos" / "00002.mp4"  # 16 frames at 8 fps: the processor's 2 fps picks 4
    assert generate(["--model", str(native / "stages" / "b8"), "--video", str(clip),
                     "--prompt", "What colour is the moving square?", "--max-new-tokens", "8",
                     "--stats-json", str(stats)]) == 0
    result = json.loads(stats.read_text())
    assert result["video_frame_indices"] == [[0, 5, 10, 15]] and result["block_size"] == 8
    assert 1 <= result["response_tokens"] <= 8 and result["answer"] in capsys.readouterr().out
