"""Bad data and a diverging loss in a real `automodel finetune` run (tiny model, tiny offline data): nothing that
did not train is exported or checkpointed, and every stop is one line with its exit code."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from nemo_bard.data.synthetic import write_synthetic_dataset
from tests.e2e_utils import run_cli, training_log
from tests.test_e2e_pbm import tiny_args

pytestmark = pytest.mark.e2e

SHORT = ["step_scheduler.max_steps=2", "block_merge.schedule=[{block_size:4,steps:1},{block_size:8,steps:1}]"]


@pytest.fixture()
def data(tmp_path):
    return write_synthetic_dataset(tmp_path / "data", rows=16, seed=1)


def _last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_every_image_missing_with_skip_stops_before_any_export(tiny_bard_dir, data, tmp_path):
    """Every step of stage B=4 is empty: exit 2 at its last step, no stage export, no checkpoint of that step; the
    same command again resumes from the end-of-epoch checkpoint of step 1 (with the counts saved beside it) and stops
    the same way."""
    shutil.rmtree(data.parent / "images")
    run = tmp_path / "bard_pbm_tiny"
    for attempt in range(2):
        proc = run_cli(tiny_args(tiny_bard_dir, data, tmp_path, "+dataset.skip_bad_samples=true"), check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert _last_line(proc) == (
            "automodel: error: no training data reached the model: every optimizer step from step 0 to 3 had every "
            "row skipped or dropped (32 skipped for unreadable media with "
            "skip_bad_samples, 0 dropped as longer than bard.max_length); the export of stage B=4 (steps 0-3) and the "
            "checkpoint of step 3 were not written. Fix the image/video paths (relative paths resolve against "
            "dataset.root_dir) or raise bard.max_length")
        assert "Traceback" not in proc.stderr + proc.stdout
        assert not (run / "stages").exists()
        assert (run / "LATEST").resolve() == (run / "epoch_0_step_1").resolve()  # 16 rows: an epoch is 2 steps
    assert [training_log(run)[s]["empty_steps"] for s in range(4)] == [1, 2, 3, 4]


def test_image_of_extreme_aspect_ratio_names_the_row_or_is_skipped(tiny_bard_dir, data, tmp_path):
    strip = data.parent / "images" / "00003.png"
    Image.new("RGB", (10000, 1), (200, 30, 30)).save(strip)
    for attempt in range(2):  # the same command again (a resume) stops the same way, without a traceback
        proc = run_cli(tiny_args(tiny_bard_dir, data, tmp_path / "strict", *SHORT), check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert _last_line(proc) == (
            f"automodel: error: {data} row 3: image {strip} is 10000x1 pixels, an aspect ratio above the 200:1 the "
            "Qwen3-VL processor accepts; crop, pad or drop it")
        assert "Traceback" not in proc.stderr + proc.stdout
    run_cli(tiny_args(tiny_bard_dir, data, tmp_path / "skip", *SHORT, "+dataset.skip_bad_samples=true"))
    run = tmp_path / "skip" / "bard_pbm_tiny"
    log = training_log(run)
    assert sum(rec.get("num_dropped_samples", 0) for rec in log.values()) == 1 and "empty_steps" not in log[0]
    assert (run / "stages" / "b4").is_dir() and (run / "stages" / "b8").is_dir()


def test_loss_going_nan_before_a_stage_boundary_publishes_no_stage(tiny_bard_dir, data, tmp_path):
    """Steps 2 and 3 (the last of stage B=4) have a NaN loss while the weights stay finite: the run stops diverged
    (exit 3) at the end of step 3, before the step-3 checkpoint and the stages/b4 export."""
    nan = "+callbacks=[{_target_:tests.fault_callbacks.NaNLossFrom,step:2}]"
    proc = run_cli(tiny_args(tiny_bard_dir, data, tmp_path, nan), check=False)
    run = tmp_path / "bard_pbm_tiny"
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert _last_line(proc).startswith(
        "automodel: error: training diverged: the last 2 optimizer step(s) before step 4 had a non-finite loss or "
        "gradients and were skipped; the export of stage B=4 (steps 0-3) and the checkpoint of step 3 were not written")
    assert not (run / "stages").exists()
    assert (run / "LATEST").resolve() == (run / "epoch_0_step_1").resolve()  # the end-of-epoch one, before the NaNs
    assert sorted(training_log(run)) == [0, 1, 2, 3]
