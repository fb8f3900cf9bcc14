"""Block-merge schedule validation, switching, export and resume behaviour (with a stand-in recipe)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nemo_bard.callbacks import (
    BardCallback,
    BlockMergeCallback,
    CallbackList,
    ResumeScheduleError,
    ScheduleError,
    parse_schedule,
)
from nemo_bard.callbacks.block_merge import read_schedule_record
from nemo_bard.errors import UserError
from nemo_bard.rundir import atomic_directory

SCHEDULE = [{"block_size": 4, "steps": 3}, {"block_size": 8, "steps": 2}, {"block_size": 32, "steps": 2}]


class FakeRecipe:
    def __init__(self, tmp_path, step=0):
        self.block_size = 0
        self.step_scheduler = SimpleNamespace(step=step)
        self.checkpoint_root = str(tmp_path)
        self.exports, self.lr_resets, self.opt_resets = [], [], 0
        self.restored_checkpoint, self.lr_rederived = None, 0

    def set_block_size(self, b):
        self.block_size = b

    def export_model(self, path, block_size):
        with atomic_directory(path, replace=True) as tmp:  # what export_hf does
            (tmp / "config.json").write_text("{}")
        self.exports.append((path.name, block_size, self.step_scheduler.step))
        return path

    def reset_lr_schedule(self, stage_steps, steps_into_stage=0):
        self.lr_resets.append((stage_steps, steps_into_stage))

    def reset_optimizer_state(self):
        self.opt_resets += 1

    def rederive_lr_schedule(self):
        self.lr_rederived += 1
        return 8, 12


@pytest.mark.parametrize(
    "schedule,match",
    [
        ([{"block_size": 8, "steps": 2}, {"block_size": 4, "steps": 2}], "must grow"),
        ([{"block_size": 4, "steps": 2}, {"block_size": 6, "steps": 2}], "not a multiple"),
        ([{"block_size": 4, "steps": 0}], ">= 1"),
        ([{"block_size": 4}], "integer 'block_size' and 'steps'"),
        ([], "empty"),
    ],
)
def test_schedule_errors(schedule, match):
    with pytest.raises(ScheduleError, match=match):
        parse_schedule(schedule)


def test_schedule_must_sum_to_max_steps():
    with pytest.raises(ScheduleError, match="sum to 7 but step_scheduler.max_steps=8"):
        parse_schedule(SCHEDULE, max_steps=8)
    assert [s.start for s in parse_schedule(SCHEDULE, max_steps=7)] == [0, 3, 5]


def test_switches_exports_and_resets_at_boundaries(tmp_path):
    cb = BlockMergeCallback(SCHEDULE, reset_lr_schedule=True, reset_optimizer=True)
    recipe = FakeRecipe(tmp_path)
    cb.on_train_start(recipe)
    seen = []
    for step in range(7):
        recipe.step_scheduler.step = step
        cb.on_step_start(recipe, step)
        seen.append(recipe.block_size)
    recipe.step_scheduler.step = 7
    cb.on_train_end(recipe)
    assert seen == [4, 4, 4, 8, 8, 32, 32]
    assert cb.switches == [(3, 4, 8), (5, 8, 32)]
    # each stage exported once, when it finished (b4 before step 3 runs, b8 before step 5, b32 at the end)
    assert recipe.exports == [("b4", 4, 3), ("b8", 8, 5), ("b32", 32, 7)]
    assert recipe.lr_resets == [(3, 0), (2, 0), (2, 0)] and recipe.opt_resets == 2


def test_resume_mid_stage_restores_block_size_without_export(tmp_path):
    cb = BlockMergeCallback(SCHEDULE, reset_lr_schedule=True)
    recipe = FakeRecipe(tmp_path, step=4)  # resumed inside the B=8 stage
    cb.on_train_start(recipe)
    assert recipe.block_size == 8 and recipe.exports == []
    assert recipe.lr_resets == [(2, 1)]  # the stage's LR schedule, one step in


def test_resume_at_boundary_exports_missing_stage(tmp_path):
    cb = BlockMergeCallback(SCHEDULE)
    recipe = FakeRecipe(tmp_path, step=3)  # checkpoint taken at the last step of the B=4 stage
    cb.on_train_start(recipe)
    assert recipe.block_size == 8 and recipe.exports == [("b4", 4, 3)]
    cb.on_train_start(FakeRecipe(tmp_path, step=3))  # export exists now: not written twice
    assert len(recipe.exports) == 1


def test_resume_redoes_an_export_that_was_killed(tmp_path):
    """A kill during the b4 export left stages/b4 with a 0-byte config.json and no completion marker (what a
    non-atomic writer leaves): resuming at the boundary exports it again."""
    partial = tmp_path / "stages" / "b4"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("")
    cb = BlockMergeCallback(SCHEDULE)
    recipe = FakeRecipe(tmp_path, step=3)
    cb.on_train_start(recipe)
    assert recipe.exports == [("b4", 4, 3)] and (partial / "config.json").read_text() == "{}"


def test_callback_list_calls_in_order_and_rejects_non_callbacks():
    calls = []

    class Rec(BardCallback):
        def __init__(self, name):
            self.name = name

        def on_step_end(self, recipe, step, metrics):
            calls.append((self.name, step, metrics["loss"]))

    cbs = CallbackList([Rec("a"), Rec("b")])
    cbs.on_step_end(None, 3, {"loss": 1.5})
    assert calls == [("a", 3, 1.5), ("b", 3, 1.5)]
    with pytest.raises(TypeError, match="BardCallback"):
        CallbackList([object()])


def _schedule(text):
    return [{"block_size": int(b), "steps": int(n)} for b, n in (e.split(":") for e in text.split(","))]


def _resume(tmp_path, old, new, step, reset_lr=False):
    """Save a checkpoint of a run under ``old`` at ``step``, then start a callback with ``new`` on it."""
    ckpt = tmp_path / f"epoch_0_step_{step - 1}"
    ckpt.mkdir()
    BlockMergeCallback(_schedule(old)).on_save(FakeRecipe(tmp_path, step=step), str(ckpt))
    recipe = FakeRecipe(tmp_path, step=step)
    recipe.restored_checkpoint = str(ckpt)
    cb = BlockMergeCallback(_schedule(new), reset_lr_schedule=reset_lr)
    cb.on_train_start(recipe)
    return cb, recipe


def test_resume_refuses_a_finished_stage_made_longer(tmp_path):
    """Stopped after step 4 of 4:4,8:4 (b4 finished and exported, one B8 step trained), resumed with 4:6,8:2: the
    finished b4 export would be replaced by a model trained partly at B8. Refused before anything trains."""
    b4 = tmp_path / "stages" / "b4"
    with atomic_directory(b4, replace=True) as tmp:
        (tmp / "config.json").write_text('{"old": 1}')
    with pytest.raises(ResumeScheduleError) as err:
        _resume(tmp_path, "4:4,8:4", "4:6,8:2", step=5)
    msg = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in msg
    assert msg.startswith(f"block_merge.schedule 4:6,8:2 does not match the checkpoint {tmp_path}/epoch_0_step_4, "
                          "trained for 5 steps under 4:4,8:4: stage 1 (block size 4, steps 0-3) is finished")
    assert "gives it 6 steps; keep 4:4,8:4 as it was" in msg and "new checkpoint.checkpoint_dir" in msg
    assert (b4 / "config.json").read_text() == '{"old": 1}'


def test_resume_refuses_a_running_stage_made_shorter(tmp_path):
    """Stopped after step 2 of 4:4,8:4, resumed with 4:1,8:7: steps trained at B4 would be labelled B8 and b4 never
    exported."""
    with pytest.raises(ResumeScheduleError, match=r"under 4:4,8:4: stage 1 \(block size 4, steps 0-3\) is running "
                       r"\(3 steps trained\) and the new schedule shortens it to 1 steps; keep 4:4 as it was"):
        _resume(tmp_path, "4:4,8:4", "4:1,8:7", step=3)
    with pytest.raises(ResumeScheduleError, match="new schedule's stage 1 has block size 8"):
        _resume(tmp_path, "4:4,8:4", "8:8", step=4)


def test_resume_may_lengthen_the_running_stage(tmp_path):
    cb, recipe = _resume(tmp_path, "4:4,8:4", "4:6,8:4", step=3)
    assert recipe.block_size == 4 and recipe.exports == [] and recipe.lr_rederived == 1
    for step in range(3, 10):
        recipe.step_scheduler.step = step
        cb.on_step_start(recipe, step)
    assert recipe.exports == [("b4", 4, 6)]  # exported once, when the lengthened stage finished


def test_resume_may_append_a_stage_and_rederives_the_lr_schedule(tmp_path):
    """A finished 4:4,8:4 run resumed with 4:4,8:4,16:4: the new stage trains at B16, the finished exports stay."""
    for b in (4, 8):
        with atomic_directory(tmp_path / "stages" / f"b{b}", replace=True) as tmp:
            (tmp / "config.json").write_text("{}")
    cb, recipe = _resume(tmp_path, "4:4,8:4", "4:4,8:4,16:4", step=8)
    assert recipe.block_size == 16 and recipe.exports == [] and recipe.lr_rederived == 1
    cb, recipe = _resume(tmp_path / "stages", "4:4,8:4", "4:4,8:4", step=6)  # same schedule: nothing re-derived
    assert recipe.block_size == 8 and recipe.lr_rederived == 0
    cb, recipe = _resume(tmp_path / "stages" / "b4", "4:4,8:4", "4:4,8:4,16:4", step=6, reset_lr=True)
    assert recipe.lr_rederived == 0 and recipe.lr_resets == [(4, 2)]  # per-stage LR schedules: the stage's own


def test_checkpoint_without_a_schedule_record_resumes_unchecked(tmp_path):
    recipe = FakeRecipe(tmp_path, step=5)
    recipe.restored_checkpoint = str(tmp_path)
    BlockMergeCallback(_schedule("4:6,8:2")).on_train_start(recipe)
    assert recipe.block_size == 4


def test_schedule_record_is_written_by_rank_0_only(tmp_path):
    recipe = FakeRecipe(tmp_path, step=3)
    recipe.dist_env = SimpleNamespace(is_main=False)
    BlockMergeCallback(SCHEDULE).on_save(recipe, str(tmp_path))
    assert not (tmp_path / "bard_schedule.json").exists()
    recipe.dist_env.is_main = True
    BlockMergeCallback(SCHEDULE).on_save(recipe, str(tmp_path))
    assert [(s.block_size, s.steps) for s in read_schedule_record(tmp_path)] == [(4, 3), (8, 2), (32, 2)]
