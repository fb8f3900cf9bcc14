"""End-to-end SWD on CPU: B8 student from a tiny PBM export, B4 anchor, through `automodel finetune`.

The PBM run that provides the exports trains LoRA adapters (``peft=lora``), so its stage exports are merged
LoRA models; the two-process SWD run trains LoRA too (FSDP2-sharded adapters, merged final export)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open

from tests.e2e_utils import cosine_lr, lr_offset_and_multiplier, run_cli, training_log

pytestmark = pytest.mark.e2e


LORA_SCALE = 32 / 16  # conf/peft/lora.yaml: alpha / dim


@pytest.fixture(scope="module")
def pbm_exports(tiny_bard_dir, tmp_path_factory):
    """A short LoRA PBM 4 -> 8 run providing stages/b4 (anchor) and stages/b8 (student), merged exports."""
    from nemo_bard.data.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path_factory.mktemp("colours_swd"), rows=48, seed=1)
    root = tmp_path_factory.mktemp("swd_root")
    run_cli(["finetune", "--config", "conf/bard_tiny.yaml", f"paths.model={tiny_bard_dir}", f"paths.data={data}",
             f"paths.run_root={root}", "step_scheduler.ckpt_every_steps=100", "--optimizer.lr=2e-2", "peft=lora"])
    return root, data


def tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_adapters_only(ckpt):
    """A LoRA checkpoint's model directory holds NeMo's adapter file (lora_A / lora_B tensors) and no base weights."""
    files = sorted(p.name for p in (ckpt / "model").iterdir() if p.suffix == ".safetensors")
    assert files == ["adapter_model.safetensors"], files
    adapters = tensors(ckpt / "model")
    assert adapters and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in adapters)
    assert not (ckpt / "model" / "consolidated").exists()
    return {k.removeprefix("base_model.model."): v for k, v in adapters.items()}


def assert_merged(export_dir, base_dir, adapters):
    """``export_dir`` is a full bard_vl model: the base weights (stored in bf16, as NeMo keeps frozen weights under
    LoRA) with ``alpha/dim * B @ A`` added on every adapted projection."""
    export, base = tensors(export_dir), tensors(base_dir)
    assert export.keys() == base.keys()
    adapted = {k.removesuffix(".lora_A.weight") for k in adapters if k.endswith(".lora_A.weight")}
    assert adapted and all(".language_model." in k and k.endswith("_proj") for k in adapted)
    for key, weight in export.items():
        frozen = base[key].to(weight.dtype)
        module = key.removesuffix(".weight")
        if module not in adapted:
            assert torch.equal(weight, frozen), key
            continue
        a, b = adapters[f"{module}.lora_A.weight"].float(), adapters[f"{module}.lora_B.weight"].float()
        merged = (frozen.float() + LORA_SCALE * (b @ a)).to(weight.dtype)
        assert torch.equal(weight, merged), key
        assert not torch.equal(weight, frozen), key  # the adapter moved the weight


def assert_generates(model_dir, block_size):
    import numpy as np
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from nemo_bard import BardVLForConditionalGeneration
    from nemo_bard.generation.inputs import build_inputs, user_conversation

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    assert isinstance(model, BardVLForConditionalGeneration) and model.config.block_size == block_size
    image = Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8))
    inputs = build_inputs(AutoProcessor.from_pretrained(model_dir), [user_conversation("Name the colour.", [image])])
    out = model.generate(**inputs, max_new_tokens=8)
    assert out.sequences.shape[0] == 1 and out.num_forwards > 0


def test_lora_pbm_checkpoint_holds_adapters_and_stage_exports_are_merged(pbm_exports, tiny_bard_dir):
    root, _ = pbm_exports
    run = root / "bard_pbm_tiny"
    final = (run / "LATEST").resolve()
    assert final.name.endswith("step_7")
    adapters = assert_adapters_only(final)
    assert_merged(run / "stages" / "b8", tiny_bard_dir, adapters)  # exported after the final step
    b4, b8 = tensors(run / "stages" / "b4"), tensors(run / "stages" / "b8")
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(b4[q], b8[q]) and torch.equal(b4["lm_head.weight"], b8["lm_head.weight"])
    for b in (4, 8):
        assert_generates(run / "stages" / f"b{b}", b)


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


def test_resume_with_more_steps_follows_the_longer_lr_schedule(swd_run, pbm_exports, tmp_path):
    """The finished 8-step SWD run resumed with max_steps 12 trains steps 8-11 on the LR schedule a 12-step run has,
    not at the 8-step run's min_lr, where NeMo's restored scheduler alone would stay."""
    run, first = swd_run
    root, data = pbm_exports
    assert "re-derived" not in first.stdout + first.stderr  # a fresh start keeps the schedule it built
    shutil.copytree(run, tmp_path / "bard_swd_tiny", symlinks=True)
    proc = run_cli(swd_args(root, data, "step_scheduler.max_steps=12", "step_scheduler.ckpt_every_steps=4",
                            "optimizer.lr=2e-3", f"paths.run_root={tmp_path}",
                            "paths.pbm_run=" + str(root / "bard_pbm_tiny")))
    assert "the LR schedule is re-derived for 12 steps (decay over 12 steps, was 8)" in proc.stdout + proc.stderr
    old, log = training_log(run), training_log(tmp_path / "bard_swd_tiny")
    assert sorted(log) == list(range(12))
    offset, mult = lr_offset_and_multiplier(old, 8)
    assert cosine_lr(8 + offset, 8, mult) == pytest.approx(1e-4 * mult)
    for step in range(8, 12):
        assert log[step]["lr"] == pytest.approx(cosine_lr(step + offset, 12, mult)), step
    assert log[8]["lr"] > 2e-4 * mult


def test_two_process_lora_swd(pbm_exports, tmp_path):
    """SWD with LoRA on 2 ranks (FSDP2-sharded adapters): the checkpoint holds the adapters only and the final
    export is the merged student, a full bard_vl model that loads and generates."""
    root, data = pbm_exports
    run_cli(swd_args(root, data, "--nproc-per-node", "2", "step_scheduler.max_steps=3", "peft=lora",
                     "--optimizer.lr=2e-2", "step_scheduler.ckpt_every_steps=100", f"paths.run_root={tmp_path}",
                     "paths.pbm_run=" + str(root / "bard_pbm_tiny")))
    run = tmp_path / "bard_swd_tiny"
    assert sorted(training_log(run)) == [0, 1, 2]
    adapters = assert_adapters_only(run / "epoch_0_step_2")
    assert_merged(run / "student_b8", root / "bard_pbm_tiny" / "stages" / "b8", adapters)
    assert_generates(run / "student_b8", 8)


def test_vocab_mismatch_error_before_training(pbm_exports, tmp_path):
    """A pre-flight error of SWD through the front door (the block-size and tokenizer checks of the same
    pre-flight are unit tests in test_swd_units.py)."""
    import json

    root, data = pbm_exports
    bad = tmp_path / "teacher_vocab"
    shutil.copytree(root / "bard_pbm_tiny" / "stages" / "b4", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["vocab_size"] = cfg["text_config"]["vocab_size"] + 32
    (bad / "config.json").write_text(json.dumps(cfg))
    proc = run_cli(swd_args(root, data, f"paths.teacher={bad}", f"paths.run_root={tmp_path}",
                            f"paths.pbm_run={root / 'bard_pbm_tiny'}"), check=False)
    assert proc.returncode == 2 and "vocabularies differ" in proc.stderr
    assert str(bad) in proc.stderr and "stages/b8" in proc.stderr  # names both models
