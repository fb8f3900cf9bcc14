"""Faults and bad input that must never lose or corrupt work: the run-directory lock, atomic
artifacts, conversion checks, disk full, and one-line errors answered before any heavy import.

The training-step guards (non-finite steps, dropped micro-batches, metric flushing) are in
test_integrations.py; kill / SIGTERM / resume of a real run in test_e2e_pbm.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nemo_bard.errors import DiskFullError, RunStopped, TrainingDiverged, UserError, find_bard_error, report
from nemo_bard.rundir import COMPLETE_MARKER, LOCK_FILE, RunDirBusy, RunLock, atomic_directory, disk_full_message, is_complete
from tests.e2e_utils import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ------------------------------------------------------------------------------ row 2: one run per directory
def test_run_lock_is_exclusive_reentrant_and_names_the_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from nemo_bard.rundir import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=rf"run directory {tmp_path} is in use by another run \(pid {holder.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder leaves its lock file behind ...
        holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    lock = RunLock(tmp_path).acquire()  # ... which is stale (dead pid on this host): taken over
    assert lock.acquire() is lock  # re-entrant in one process
    lock.release()
    assert (tmp_path / LOCK_FILE).exists()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_record_from_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "other-node", "started": "x", "command": "c"}))
    with pytest.raises(RunDirBusy, match=f"other-node.*delete {tmp_path / LOCK_FILE}"):
        RunLock(tmp_path).acquire()


def test_lock_of_an_earlier_run_of_a_requeued_slurm_job_is_taken_over(tmp_path, monkeypatch):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "node-7", "slurm_job": "4242.0"}))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the same job, requeued after preemption or a timed-out stop
    RunLock(tmp_path).acquire().release()


def test_torchrun_workers_share_the_launcher_lock(tmp_path, monkeypatch):
    launcher = RunLock(tmp_path).acquire()
    try:
        worker_env = os.environ["NEMO_BARD_RUN_LOCK"]  # what the launcher hands its torchrun workers
        code = ("from nemo_bard.rundir import RunLock; "
                f"l = RunLock({str(tmp_path)!r}).acquire(); print(l.inherited)")
        out = subprocess.run([sys.executable, "-c", code], env={**ENV, "NEMO_BARD_RUN_LOCK": worker_env},
                             capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "True", out.stderr
        other = subprocess.run([sys.executable, "-c", code], env={k: v for k, v in ENV.items()
                                                                 if k != "NEMO_BARD_RUN_LOCK"},
                               capture_output=True, text=True, timeout=60)
        assert other.returncode != 0 and "is in use by another run" in other.stderr
    finally:
        launcher.release()


# ------------------------------------------------------------------------------ row 3: atomic artifacts
def test_atomic_directory_publishes_complete_dirs_only(tmp_path):
    dst = tmp_path / "stages" / "b4"
    with pytest.raises(RuntimeError):
        with atomic_directory(dst) as tmp:
            (tmp / "config.json").write_text("")  # a kill/crash in the middle of the write ...
            raise RuntimeError("killed")
    assert not dst.exists() and list(dst.parent.iterdir()) == []  # ... leaves nothing that looks finished
    with atomic_directory(dst, marker={"block_size": 4}) as tmp:
        (tmp / "config.json").write_text("{}")
    assert is_complete(dst) and json.loads((dst / COMPLETE_MARKER).read_text())["block_size"] == 4
    with atomic_directory(dst, replace=True) as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
    assert json.loads((dst / "config.json").read_text()) == {"new": 1} and sorted(os.listdir(dst.parent)) == ["b4"]


def test_export_is_sharded_atomic_and_loads(tiny_bard_dir, tiny_bard_model, tiny_processor, tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText

    from nemo_bard.models.export import export_hf

    out = export_hf(tiny_bard_model, tmp_path / "b8", tiny_processor, block_size=8, max_shard_size="100KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file() and is_complete(out)
    loaded = AutoModelForImageTextToText.from_pretrained(out)
    assert loaded.config.block_size == 8
    for k, v in tiny_bard_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # a failure while the processor files are written: the previous export stays, nothing half-written appears
    monkeypatch.setattr(type(tiny_processor), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("io")))
    with pytest.raises(OSError):
        export_hf(tiny_bard_model, out, tiny_processor, block_size=16)
    assert json.loads((out / "config.json").read_text())["block_size"] == 8 and sorted(os.listdir(tmp_path)) == ["b8"]


def test_an_8b_export_is_sharded():
    """The default shard size splits an 8B model (~16 GB in bf16) into several files (meta tensors, no memory)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from nemo_bard.models.configuration_bard_vl import BardVLConfig
    from nemo_bard.models.export import DEFAULT_MAX_SHARD_SIZE
    from nemo_bard.models.modeling_bard_vl import BardVLForConditionalGeneration
    from nemo_bard.recipes.config import BardSettings

    config = BardVLConfig(  # Qwen3-VL-8B sizes
        text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                           deepstack_visual_indexes=[8, 16, 24]),
        dtype="bfloat16",
    )
    with torch.device("meta"):
        model = BardVLForConditionalGeneration(config).to(torch.bfloat16)
    size = sum(p.numel() for p in model.parameters()) * 2
    assert size > 15e9
    assert BardSettings().export_max_shard_size == DEFAULT_MAX_SHARD_SIZE
    split = split_torch_state_dict_into_shards(model.state_dict(), max_shard_size=DEFAULT_MAX_SHARD_SIZE)
    assert split.is_sharded and len(split.filename_to_tensors) >= 3


# ------------------------------------------------------------------------------ row 4: conversion
@pytest.fixture()
def ar_without_mask(tiny_ar_dir, tmp_path):
    """The tiny AR checkpoint with `<|mask|>` removed from its tokenizer (as a real Qwen3-VL tokenizer)."""
    src = tmp_path / "nomask"
    shutil.copytree(tiny_ar_dir, src)
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != "<|mask|>"]
    (src / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc["extra_special_tokens"] = [t for t in tc.get("extra_special_tokens", []) if t != "<|mask|>"]
    (src / "tokenizer_config.json").write_text(json.dumps(tc))
    return src


def test_convert_refuses_an_ordinary_token_before_writing(ar_without_mask, tiny_ar_dir, tmp_path):
    from nemo_bard.convert import ConversionError, convert, main

    dst = tmp_path / "out"
    with pytest.raises(ConversionError, match="--mask-token-id 100 is the ordinary token .* of the tokenizer"):
        convert(ar_without_mask, dst, mask_token_id=100)
    with pytest.raises(ConversionError, match="already defines <\\|mask\\|> at id 346, not 100"):
        convert(tiny_ar_dir, dst, mask_token_id=100)
    assert not dst.exists() and sorted(os.listdir(tmp_path)) == ["nomask"]
    dst.mkdir()  # an empty destination is fine, and the corrected retry succeeds
    assert main(["--src", str(ar_without_mask), "--dst", str(dst), "--mask-token-id", "349"]) == 0
    assert is_complete(dst) and json.loads((dst / "config.json").read_text())["mask_token_id"] == 349


def test_convert_interrupted_leaves_nothing(tiny_ar_dir, tmp_path, monkeypatch):
    from nemo_bard.convert import convert

    real_copy, copied = shutil.copy2, []

    def copy_then_die(a, b):
        if copied:
            raise KeyboardInterrupt  # e.g. Ctrl-C after the first file
        copied.append(real_copy(a, b))

    monkeypatch.setattr(shutil, "copy2", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_ar_dir, tmp_path / "out")
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(shutil, "copy2", real_copy)
    assert is_complete(convert(tiny_ar_dir, tmp_path / "out", block_size=4))


def test_convert_adds_mask_with_the_tokenizer_api_and_the_same_ids(ar_without_mask, tmp_path):
    """Reserved fillers up to the mask id, then `<|mask|>` (Qwen3: 151669, 151670, then 151671), every other id
    unchanged: the ids the hand-written tokenizer.json edit gave."""
    from transformers import AutoTokenizer

    from nemo_bard.convert import convert

    before = AutoTokenizer.from_pretrained(ar_without_mask)
    n = len(before)
    assert n == 346  # the tiny vocabulary; the mask goes above it, at 349
    out = convert(ar_without_mask, tmp_path / "out", mask_token_id=349)
    tok = AutoTokenizer.from_pretrained(out)
    expected = {**before.get_vocab(), "<|bard_reserved_346|>": 346, "<|bard_reserved_347|>": 347,
                "<|bard_reserved_348|>": 348, "<|mask|>": 349}
    assert tok.get_vocab() == expected
    added = [t for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"] if t["id"] >= 346]
    assert [(t["id"], t["content"], t["special"], t["normalized"]) for t in added] == [
        (346, "<|bard_reserved_346|>", True, False), (347, "<|bard_reserved_347|>", True, False),
        (348, "<|bard_reserved_348|>", True, False), (349, "<|mask|>", True, False)]
    text = "<|im_start|>user\nRead 12 <|mask|><|mask|>x<|im_end|>"
    ids = tok(text)["input_ids"]
    assert ids.count(349) == 2 and [i for i in ids if i != 349] == before(text.replace("<|mask|>", ""))["input_ids"]
    assert "<|mask|>" in tok.all_special_tokens and tok.decode(ids, skip_special_tokens=True) == "user\nRead 12 x"


# ------------------------------------------------------------------------------ row 10: disk full
# what torch's checkpoint writer raised when a save filled the disk (torch.save to /dev/full, torch 2.x)
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def _nemo_save_on_full_disk(*args, **kwargs):
    """NeMo's coordinator step wraps the writer's error (rank 0 logs it, every rank raises this)."""
    raise RuntimeError("Failed to write optim state to ...; see the coordinator log") from RuntimeError(TORCH_FULL)


def test_disk_full_is_named(tmp_path, monkeypatch):
    import nemo_bard.rundir as rundir

    real = RuntimeError(TORCH_FULL)
    target = tmp_path / "epoch_0_step_3"
    assert disk_full_message(real, target) is None  # a write error on a disk with room: not "disk full"
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 2**20))
    assert disk_full_message(real, target) == f"no space left on {target} (1 MiB free)"
    wrapped = RuntimeError("Failed to write optim state; see the coordinator log")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert disk_full_message(wrapped, target).startswith(f"no space left on {target}")


def test_checkpoint_save_on_a_full_disk_says_so(tmp_path, monkeypatch):
    """NeMo's save hits ENOSPC: one DiskFullError naming the checkpoint; nothing is published."""
    from types import SimpleNamespace

    from nemo_automodel.recipes.vlm.finetune import FinetuneRecipeForVLM

    import nemo_bard.rundir as rundir
    from nemo_bard.callbacks.base import CallbackList
    from nemo_bard.recipes.pbm import BardPBMRecipe

    recipe = BardPBMRecipe.__new__(BardPBMRecipe)
    recipe.checkpointer = SimpleNamespace(config=SimpleNamespace(checkpoint_dir=str(tmp_path), enabled=True))
    recipe.model_parts = [torch.nn.Linear(2, 2)]
    recipe.device_mesh = None
    recipe.step_scheduler = SimpleNamespace(step=3)
    recipe.callbacks = CallbackList()
    monkeypatch.setattr(FinetuneRecipeForVLM, "save_checkpoint",
                        _nemo_save_on_full_disk)
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(DiskFullError, match=rf"no space left on {tmp_path}/epoch_0_step_3 .*not published"):
        recipe.save_checkpoint(0, 3, 1.0)
    with torch.no_grad():
        recipe.model_parts[0].weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="weights hold NaN/inf at step 3; checkpoint .* was not written"):
        recipe.save_checkpoint(0, 3, 1.0)  # checked before anything is written


def _bare_recipe(tmp_path: Path, model: torch.nn.Module):
    """A PBM recipe with just what ``save_checkpoint`` / ``export_model`` read (no NeMo setup)."""
    from types import SimpleNamespace

    from nemo_bard.callbacks.base import CallbackList
    from nemo_bard.recipes.config import parse_bard_settings
    from nemo_bard.recipes.pbm import BardPBMRecipe

    recipe = BardPBMRecipe.__new__(BardPBMRecipe)
    recipe.checkpointer = SimpleNamespace(config=SimpleNamespace(checkpoint_dir=str(tmp_path), enabled=True))
    recipe.model_parts = [model]
    recipe.device_mesh = None
    recipe.step_scheduler = SimpleNamespace(step=3)
    recipe.callbacks = CallbackList()
    recipe.bard = parse_bard_settings({})
    recipe.processor = None
    return recipe


def test_distributed_checkpoint_exception_on_a_full_disk_says_so(tmp_path, monkeypatch):
    """torch's CheckpointException derives from BaseException: it is still reported as a full disk, and a
    Ctrl-C during the save is not mistaken for one."""
    from nemo_automodel.recipes.vlm.finetune import FinetuneRecipeForVLM
    from torch.distributed.checkpoint.api import CheckpointException

    recipe = _bare_recipe(tmp_path, torch.nn.Linear(2, 2))
    failure = CheckpointException("save failed", {0: (OSError(errno.ENOSPC, "No space left on device"), None)})
    monkeypatch.setattr(FinetuneRecipeForVLM, "save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(failure))
    with pytest.raises(DiskFullError, match=rf"^no space left on {tmp_path}/epoch_0_step_3 \(\d+ MiB free\): the "
                                            "checkpoint of step 3 was not completed and is not published"):
        recipe.save_checkpoint(0, 3, 1.0)
    monkeypatch.setattr(FinetuneRecipeForVLM, "save_checkpoint",
                        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        recipe.save_checkpoint(0, 3, 1.0)


def test_stage_export_on_a_full_disk_says_so(tiny_bard_model, tmp_path, monkeypatch):
    """safetensors reports ENOSPC as a SafetensorError (not an OSError): one DiskFullError, nothing published."""
    from safetensors import SafetensorError

    from nemo_bard.models.modeling_bard_vl import BardVLForConditionalGeneration

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(BardVLForConditionalGeneration, "save_pretrained", full)
    recipe = _bare_recipe(tmp_path, tiny_bard_model)
    out = tmp_path / "stages" / "b8"
    with pytest.raises(DiskFullError, match=rf"^no space left on {out} \(\d+ MiB free\): the export {out} was not "
                                            r"completed \(nothing was published there\)"):
        recipe.export_model(out, block_size=8)
    assert os.listdir(tmp_path / "stages") == []


def test_convert_on_a_full_disk_says_so(tiny_ar_dir, tmp_path, monkeypatch, capsys):
    from nemo_bard.convert import main

    real_copy = shutil.copy2

    def copy(src, dst):
        if Path(src).name == "model.safetensors":
            with open(dst, "wb") as f:
                f.write(b"\0" * 100)  # part of the file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst)

    monkeypatch.setattr(shutil, "copy2", copy)
    dst = tmp_path / "out"
    assert main(["--src", str(tiny_ar_dir), "--dst", str(dst)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"nemo_bard.convert: error: no space left on {dst} (")
    assert "the conversion to" in err[0] and os.listdir(tmp_path) == []  # nothing half-written


# ------------------------------------------------------------------------------ rows 9, 11: fast one-line errors
def test_error_reporting_is_one_line_with_exit_codes(capsys, monkeypatch):
    monkeypatch.delenv("NEMO_BARD_DEBUG", raising=False)
    try:
        try:
            raise UserError("dataset path x does not exist")
        except UserError as inner:
            raise RuntimeError("wrapped by a library") from inner
    except RuntimeError as exc:
        assert isinstance(find_bard_error(exc), UserError)
        assert report("automodel", exc) == 2
    assert capsys.readouterr().err == "automodel: error: dataset path x does not exist\n"
    assert report("automodel", RunStopped("stopped by signal SIGTERM after step 2", signal.SIGTERM)) == 143
    assert capsys.readouterr().err == "automodel: stopped by signal SIGTERM after step 2\n"
    assert report("automodel", TrainingDiverged("training diverged")) == 3
    capsys.readouterr()
    monkeypatch.setenv("NEMO_BARD_DEBUG", "1")
    try:
        raise UserError("x")
    except UserError as exc:
        report("automodel", exc)
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("automodel: error: x\n")


FAST_CASES = {  # argv -> the one stderr line (substring)
    "missing_config": (["finetune", "--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
    "bad_key": (["finetune", "--config", "conf/bard_tiny.yaml", "+bard.mask_backnd=dense"], "unknown key bard.mask_backnd"),
    "schedule": (["finetune", "--config", "conf/bard_tiny.yaml", "step_scheduler.max_steps=9"],
                 "block_merge.schedule steps sum to 8 but step_scheduler.max_steps=9; make them equal"),
    "missing_data": (["finetune", "--config", "conf/bard_tiny.yaml", "paths.data={tmp}/none.jsonl"],
                     "dataset path {tmp}/none.jsonl does not exist"),
    "missing_model": (["finetune", "--config", "conf/bard_tiny.yaml", "paths.data={data}", "paths.model={tmp}/m"],
                      "model directory {tmp}/m not found; convert an AR Qwen3-VL first"),
    "empty_config_json": (["finetune", "--config", "conf/bard_tiny.yaml", "paths.data={data}", "paths.model={empty}"],
                          "{empty}/config.json is empty"),
    "nemo_style_key": (["finetune", "--config", "conf/bard_tiny.yaml", "--bard.mask_backnd=dense"],
                       "unknown key bard.mask_backnd"),
    "truncated_model": (["finetune", "--config", "conf/bard_tiny.yaml", "paths.data={data}", "paths.model={truncated}"],
                        "{truncated}/model.safetensors is damaged: "),
    "swd_teacher": (["finetune", "--config", "conf/bard_tiny.yaml", "stage=swd", "paths.data={data}",
                     "paths.student={bard}", "paths.teacher=outputs/nope"],
                    "SWD teacher directory outputs/nope not found; run PBM first"),
}


def test_user_errors_answer_before_heavy_imports(tmp_path, tiny_bard_dir):
    """Every case exits 2 with one stderr line, and neither torch nor NeMo was imported to get there."""
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    empty = tmp_path / "empty_model"
    empty.mkdir()
    (empty / "config.json").write_text("")
    truncated = _damaged_copy(tiny_bard_dir, tmp_path / "truncated", "truncated")
    fmt = {"tmp": tmp_path, "data": data, "empty": empty, "bard": tiny_bard_dir, "truncated": truncated}
    cases = {name: ([a.format(**fmt) for a in argv], line.format(**fmt)) for name, (argv, line) in FAST_CASES.items()}
    code = f"""
import contextlib, io, json, sys, time
from nemo_bard.cli import main
out = {{}}
for name, (argv, _) in json.loads({json.dumps(json.dumps(cases))}).items():
    err = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stderr(err):
        rc = main(argv + ["checkpoint.checkpoint_dir={tmp_path}/run_" + name] if name != "missing_config" else argv)
    out[name] = [rc, err.getvalue(), time.perf_counter() - t]
out["heavy"] = sorted(m for m in ("torch", "transformers", "nemo_automodel", "datasets") if m in sys.modules)
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("heavy") == []
    for name, (rc, err, _) in result.items():
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("automodel: error: "), (name, err)
        assert cases[name][1] in lines[0], (name, lines[0])
    assert not any((tmp_path / f"run_{name}").exists() for name in cases)  # nothing written


def test_read_only_run_root_is_one_line(tmp_path, tiny_bard_dir, monkeypatch, capsys):
    """A run root on a read-only file system (EROFS injected where the lock creates the run directory, and where it
    opens the lock file in an existing directory): one line naming the run root, exit 2, nothing written."""
    from nemo_bard.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    ro = tmp_path / "ro"
    (ro / "existing").mkdir(parents=True)
    real_mkdir, real_open = Path.mkdir, os.open

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    def os_open(path, *args, **kwargs):
        if str(path).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    for run_dir, root in ((ro / "runs" / "pbm", ro), (ro / "existing", ro / "existing")):
        argv = ["finetune", "--config", str(REPO / "conf/bard_tiny.yaml"), f"paths.data={data}",
                f"paths.model={tiny_bard_dir}", f"checkpoint.checkpoint_dir={run_dir}"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"automodel: error: run root {root} is read-only (Read-only file system), so run directory "
                       f"{run_dir} cannot be written; point paths.run_root (checkpoint.checkpoint_dir) at a writable "
                       "directory"]
    assert os.listdir(ro) == ["existing"] and os.listdir(ro / "existing") == []


def test_full_disk_at_the_start_of_a_run_is_one_line(tmp_path, tiny_bard_dir, monkeypatch, capsys):
    """The first writes of a run on a full disk (its resolved config, then its lock file): `no space left on
    <run dir>`, exit 1, no traceback."""
    import builtins

    from nemo_bard.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    run_dir = tmp_path / "run"
    real_open, real_os_open = builtins.open, os.open

    def full(path) -> None:
        if str(path).startswith(str(run_dir)):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    def full_open(path, mode="r", *args, **kwargs):
        if "w" in mode:
            full(path)
        return real_open(path, mode, *args, **kwargs)

    def full_os_open(path, *args, **kwargs):
        full(path)
        return real_os_open(path, *args, **kwargs)

    argv = ["finetune", "--config", str(REPO / "conf/bard_tiny.yaml"), f"paths.data={data}",
            f"paths.model={tiny_bard_dir}", f"checkpoint.checkpoint_dir={run_dir}"]
    for patched, fake in ((builtins, full_open), (os, full_os_open)):
        monkeypatch.setattr(patched, "open", fake)
        assert main(argv) == 1, fake
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"automodel: error: no space left on {run_dir} ("), err
        assert err[0].endswith("the run cannot start; free space or point paths.run_root (checkpoint.checkpoint_dir) "
                               "elsewhere"), err


@pytest.mark.parametrize("script", ["automodel", "nemo-bard"])
def test_usage_error_through_the_console_script_is_fast(script, tmp_path):
    """Each console script answers in well under 3 s and calls itself by the name that was typed."""
    t = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / script), "finetune", "--config", "nope.yaml"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
    assert proc.stderr.startswith(f"{script}: error: config file 'nope.yaml'")
    assert elapsed < 3.0, elapsed


def test_nemo_style_values_parse_as_nemo_parses_them():
    """The front door reads ``--a.b=VALUE`` without importing NeMo (it imports torch): same values as NeMo's."""
    from nemo_automodel.components.config.loader import translate_value

    from nemo_bard.cli import parse_value

    for text in ("1", "-2.5e-3", "true", "False", "none", "None", "NONE", "null", "[1, 'a']", "{'k': (1, 2)}",
                 "'quoted'", "dense", "a.b", "1e", "nan", "inf", "0x10", "x" * 1001, "", " 3", "1_000"):
        ours, theirs = parse_value(text), translate_value(text)
        assert type(ours) is type(theirs) and ours == theirs, text


# ------------------------------------------------------------------------------ rows 5-7: verified checkpoints
def _damaged_copy(src: Path, dst: Path, how: str) -> Path:
    """A copy of model directory ``src`` whose ``model.safetensors`` is truncated, or has 1 KiB of zeros written
    into its tensor data (``zeros``) or its JSON header (``header``)."""
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    size = weights.stat().st_size
    if how == "truncated":
        os.truncate(weights, size // 2)
    else:
        with open(weights, "r+b") as f:
            f.seek(size // 2 if how == "zeros" else 16)
            f.write(b"\0" * 1024)
    return dst


def test_verify_model_dir_names_the_damaged_file(tiny_bard_dir, tiny_ar_dir, tmp_path):
    from nemo_bard.models.verify import CheckpointCorrupt, check_safetensors, verify_model_dir

    marker = json.loads((tiny_bard_dir / COMPLETE_MARKER).read_text())
    assert set(marker["files"]) == {"model.safetensors"} and len(marker["files"]["model.safetensors"]["sha256"]) == 64
    assert verify_model_dir(tiny_bard_dir, checksums=True) == [tiny_bard_dir / "model.safetensors"]
    for how, src, match in (
        ("truncated", tiny_bard_dir, r"\d+ bytes, \d+ when it was written \(truncated\?\)"),  # size from the marker
        ("truncated", tiny_ar_dir, r"tensor '.*' lies at bytes .* \(truncated\?\)"),  # no marker: from the header
        ("header", tiny_ar_dir, r"its header is not valid JSON \(overwritten\?\)"),
    ):
        bad = _damaged_copy(src, tmp_path / f"{how}_{src.name}_{src.parent.name}", how)
        with pytest.raises(CheckpointCorrupt, match=rf"^{bad}/model.safetensors is damaged: {match}; re-export"):
            verify_model_dir(bad)
    zeros = _damaged_copy(tiny_bard_dir, tmp_path / "zeros", "zeros")
    assert verify_model_dir(zeros)  # the structure is intact: only the recorded checksum tells
    with pytest.raises(CheckpointCorrupt, match=rf"^{zeros}/model.safetensors is damaged: its sha256 differs"):
        verify_model_dir(zeros, checksums=True, what="SWD teacher")
    with open(zeros / "model.safetensors", "ab") as f:  # bytes after the last tensor
        f.write(b"x")
    with pytest.raises(CheckpointCorrupt, match="1 bytes after the last tensor"):
        check_safetensors(zeros / "model.safetensors")


def test_sharded_export_records_and_verifies_every_shard(tiny_bard_model, tmp_path):
    from nemo_bard.models.export import export_hf
    from nemo_bard.models.verify import CheckpointCorrupt, verify_model_dir

    out = export_hf(tiny_bard_model, tmp_path / "b8", block_size=8, max_shard_size="300KB")
    shards = sorted(out.glob("model-*.safetensors"))
    recorded = json.loads((out / COMPLETE_MARKER).read_text())["files"]
    assert len(shards) > 1 and set(recorded) == {p.name for p in shards} | {"model.safetensors.index.json"}
    assert verify_model_dir(out, checksums=True) == shards
    with open(shards[-1], "r+b") as f:  # 1 KiB of zeros in the last shard's data
        f.seek(f.seek(0, 2) - 2048)
        f.write(bytes(1024))
    with pytest.raises(CheckpointCorrupt, match=rf"^{shards[-1]} is damaged: its sha256 differs"):
        verify_model_dir(out, checksums=True)
    (out / COMPLETE_MARKER).unlink()  # no record (e.g. a copied HF model): a missing shard is still named
    shards[0].unlink()
    with pytest.raises(CheckpointCorrupt, match=rf"^{shards[0]} is missing \(listed in model.safetensors.index.json\)"):
        verify_model_dir(out)


def test_convert_refuses_a_truncated_source(tiny_ar_dir, tmp_path, capsys):
    from nemo_bard.convert import main

    bad = _damaged_copy(tiny_ar_dir, tmp_path / "ar", "truncated")
    assert main(["--src", str(bad), "--dst", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"nemo_bard.convert: error: {bad}/model.safetensors is damaged: ")
    assert sorted(os.listdir(tmp_path)) == ["ar"]  # nothing written


def swd_config(data, student: Path, teacher: Path) -> dict:
    """A plain SWD recipe config (the pre-flight reads nothing else)."""
    return {
        "recipe": "nemo_bard.recipes.swd.BardSWDRecipe", "seed": 3,
        "step_scheduler": {"global_batch_size": 2, "local_batch_size": 2, "max_steps": 2},
        "model": {"pretrained_model_name_or_path": str(student)},
        "teacher_model": {"pretrained_model_name_or_path": str(teacher)},
        "dataset": {"_target_": "nemo_bard.data.datasets.BardChatDataset", "path": str(data)},
        "dataloader": {"_target_": "torchdata.stateful_dataloader.StatefulDataLoader", "num_workers": 0,
                       "collate_fn": {"_target_": "nemo_bard.data.collate.bard_collate_fn"}},
        "bard": {"max_length": 512},
    }


@pytest.mark.parametrize("how", ["truncated", "zeros"])
def test_swd_preflight_refuses_a_damaged_teacher(how, tiny_bard_dir, tmp_path):
    """Before any model loads: a truncated teacher (structure) and one with 1 KiB of zeros in its tensor data
    (recorded sha256) are one error naming the file; ``bard.verify_checksums=false`` skips only the hash."""
    from nemo_automodel.components.config.loader import ConfigNode

    from nemo_bard.data.synthetic import write_synthetic_dataset
    from nemo_bard.models.verify import CheckpointCorrupt
    from nemo_bard.recipes.swd import BardSWDRecipe

    data = write_synthetic_dataset(tmp_path / "data", rows=4, seed=1)
    teacher = _damaged_copy(tiny_bard_dir, tmp_path / "teacher", how)
    cfg = swd_config(data, tiny_bard_dir, teacher)
    with pytest.raises(CheckpointCorrupt, match=rf"^{teacher}/model.safetensors is damaged: .*the SWD teacher"):
        BardSWDRecipe(ConfigNode(cfg)).preflight()
    if how == "zeros":
        cfg["bard"]["verify_checksums"] = False
        BardSWDRecipe(ConfigNode(cfg)).preflight()
