"""CUDA-only checks (``pytest -m gpu``; skipped without a GPU): FlexAttention training steps on the device.

* one PBM step with the Flex ``BlockMask`` (built on the GPU, compiled) matches the dense-mask step's loss
  and gradients within bf16 tolerance;
* one SWD step runs with Flex masks for the student and the teacher (both built on the GPU);
* NeMo's activation checkpointing with the Flex mask gives the loss and gradients of the step without it.

``scripts/gpu_check.sh`` runs these first.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_integrations import collated, colours, count_calls, pbm_grads, stub_recipe  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FLEX = {"text_config": "flex_attention", "vision_config": "sdpa", "": "sdpa"}


def cuda_model(path, backend: str, dtype=torch.bfloat16, nemo: bool = False):
    from transformers import AutoModelForImageTextToText

    from nemo_bard.integrations.nemo import NeMoBardVLForConditionalGeneration

    cls = NeMoBardVLForConditionalGeneration if nemo else AutoModelForImageTextToText
    attn = FLEX if backend == "flex" else "sdpa"
    return cls.from_pretrained(path, dtype=dtype, attn_implementation=attn).to("cuda").train()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def test_flex_pbm_step_matches_dense_step(tiny_bard_dir, tiny_processor, collated):  # noqa: F811
    from torch.nn.attention.flex_attention import BlockMask

    results = {}
    for backend in ("dense", "flex"):
        model = cuda_model(tiny_bard_dir, backend)
        recipe = stub_recipe(model, tiny_processor, local_batch_size=4, device="cuda", mask_backend=backend)
        built, _ = recipe.prepare_step([collated([0, 1, 2, 3])], step=0)
        mask = built[0].inputs["attention_mask"]
        if backend == "flex":
            assert isinstance(mask, BlockMask) and mask.kv_num_blocks.device.type == "cuda"
        else:
            assert mask.device.type == "cuda"
        assert built[0].inputs["input_ids"].device.type == "cuda"
        results[backend] = pbm_grads(model, recipe, [collated([0, 1, 2, 3])])
    (loss_d, grads_d), (loss_f, grads_f) = results["dense"], results["flex"]
    assert torch.isfinite(loss_f) and relative_error(loss_f, loss_d) < 2e-2, (loss_f, loss_d)
    assert grads_f.keys() == grads_d.keys()
    errors = {k: relative_error(grads_f[k], grads_d[k]) for k in grads_d if grads_d[k].float().norm() > 1e-6}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 5e-2, (worst, errors[worst])


def test_flex_swd_step_runs(tiny_bard_dir, tiny_processor, collated):  # noqa: F811
    from torch.nn.attention.flex_attention import BlockMask

    from nemo_bard.loss.kd import TopKDistillationLoss
    from nemo_bard.recipes.config import KDSettings
    from nemo_bard.recipes.swd import BardSWDRecipe

    student = cuda_model(tiny_bard_dir, "flex")
    teacher = cuda_model(tiny_bard_dir, "flex").eval().requires_grad_(False)
    pbm = stub_recipe(student, tiny_processor, local_batch_size=4, device="cuda", mask_backend="flex")
    recipe = BardSWDRecipe.__new__(BardSWDRecipe)
    recipe.__dict__.update(pbm.__dict__)
    recipe.kd, recipe.teacher_block, recipe.student_block = KDSettings(), 4, 8
    recipe.teacher_model, recipe.offload_teacher = teacher, False
    recipe.loss_fn = TopKDistillationLoss(recipe.kd.top_k)
    recipe.bard.loss.reduction = "token_mean"
    recipe.set_block_size(8)
    built, denominator = recipe.prepare_step([collated([0, 1, 2, 3])], step=0)
    t_mask = recipe.teacher_inputs(built[0])["attention_mask"]
    assert isinstance(t_mask, BlockMask) and t_mask.kv_num_blocks.device.type == "cuda"
    loss, stats = recipe.forward_loss(student, built[0], denominator, is_train=True)
    loss.backward()
    assert torch.isfinite(loss) and stats["num_positions"] > 0
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in teacher.parameters())


def test_activation_checkpointing_with_flex_mask(tiny_bard_dir, tiny_processor, collated):  # noqa: F811
    """Loss and gradients with and without NeMo's activation checkpointing (fp32, Flex): identical when the
    step itself is deterministic on this GPU (two runs without checkpointing agree), else within 1e-5."""
    from nemo_bard.integrations.nemo import apply_activation_checkpointing

    batches = [collated([0, 1, 2, 3])]
    runs = []
    for ac in (False, False, True):
        model = cuda_model(tiny_bard_dir, "flex", dtype=torch.float32, nemo=True)
        if ac:
            model = apply_activation_checkpointing(model)
        layer = model.model.language_model.layers[0]
        calls = count_calls(getattr(layer.mlp, "_checkpoint_wrapped_module", layer.mlp))
        recipe = stub_recipe(model, tiny_processor, local_batch_size=4, device="cuda", mask_backend="flex")
        runs.append((*pbm_grads(model, recipe, batches), calls[0]))
    (loss_a, grads_a, calls_a), (loss_b, grads_b, _), (loss_ac, grads_ac, calls_ac) = runs
    assert (calls_a, calls_ac) == (1, 2)  # the checkpointed run really recomputed
    deterministic = torch.equal(loss_a, loss_b) and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    tol = {"rtol": 0.0, "atol": 0.0} if deterministic else {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(loss_ac, loss_a, **tol)
    for k in grads_a:
        torch.testing.assert_close(grads_ac[k], grads_a[k], **tol)
