"""SWD pieces: the top-k KD loss, the teacher batch, and the pre-flight teacher/student checks."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nemo_bard.attention.masks import dense_mask, training_token_meta
from nemo_bard.data.layout import BlockLayout
from nemo_bard.loss.kd import TopKDistillationLoss, teacher_topk
from nemo_bard.recipes.config import BardConfigError, parse_bard_settings
from nemo_bard.recipes.swd import BardSWDRecipe, check_teacher_student
from nemo_bard.schema import NoiseSettings
from tests.test_layout import processor_batch, text_rope


def test_topk_with_full_vocab_equals_cross_entropy_to_teacher():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    values, idx = teacher_topk(t, 11)
    kd = TopKDistillationLoss(top_k=11)(s, values, idx, denominator=5).loss
    full_ce = -(F.softmax(t, -1) * F.log_softmax(s, -1)).sum(-1).mean()
    torch.testing.assert_close(kd, full_ce)
    # ... i.e. forward KL(q_T || p_S) plus the (student-independent) teacher entropy
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    ent = -(F.softmax(t, -1) * F.log_softmax(t, -1)).sum(-1).mean()
    torch.testing.assert_close(kd, kl + ent)


def test_topk_kd_hand_computed():
    # V=3, k=2: teacher top-2 are tokens 0 (logit 2) and 2 (logit 1); student logits [0, 0, 0]
    student = torch.zeros(1, 3)
    teacher = torch.tensor([[2.0, 0.0, 1.0]])
    values, idx = teacher_topk(teacher, 2)
    assert idx.tolist() == [[0, 2]]
    q = [math.exp(2) / (math.exp(2) + math.e), math.e / (math.exp(2) + math.e)]
    expected = -(q[0] * math.log(1 / 3) + q[1] * math.log(1 / 3))  # = log 3
    out = TopKDistillationLoss(top_k=2)(student, values, idx, denominator=1)
    assert out.loss.item() == pytest.approx(expected)
    assert out.teacher_entropy_sum.item() == pytest.approx(-(q[0] * math.log(q[0]) + q[1] * math.log(q[1])))
    assert out.top1_agree_sum.item() == 1  # argmax of all-zero student is 0, the teacher's top-1
    # temperature 2: softmax of logits/2, scaled by tau^2
    out_t = TopKDistillationLoss(top_k=2, temperature=2.0)(student, values, idx, denominator=1)
    assert out_t.loss.item() == pytest.approx(4 * math.log(3))
    # reverse KL over the top-k support: student renormalised to [1/2, 1/2]
    rev = TopKDistillationLoss(top_k=2, direction="reverse")(student, values, idx, denominator=1)
    assert rev.loss.item() == pytest.approx(0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1]))


def test_gradients_flow_only_into_the_student():
    teacher = torch.nn.Linear(4, 7)
    student = torch.nn.Linear(4, 7)
    x = torch.randn(3, 4)
    with torch.no_grad():
        values, idx = teacher_topk(teacher(x), 3)
    loss = TopKDistillationLoss(top_k=3)(student(x), values, idx, denominator=3).loss
    loss.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert teacher.weight.grad is None and not values.requires_grad


def test_teacher_sees_student_tokens_and_positions_with_teacher_block_mask():
    layout = BlockLayout(block_size=8, mask_token_id=7, pad_token_id=99, noise=NoiseSettings(type="uniform_sample", min_rate=0.1, max_rate=0.5))
    batch = layout.build(processor_batch([[1, 2, 3], [4, 5, 6, 7, 8]], [list(range(20, 31)), [30, 31]]), [1, 2],
                         text_rope)
    recipe = BardSWDRecipe.__new__(BardSWDRecipe)
    recipe.teacher_block = 4
    recipe.bard = parse_bard_settings({"mask_backend": "dense"})
    recipe.layout = layout
    recipe.dist_env = SimpleNamespace(device=torch.device("cpu"))
    got = recipe.teacher_inputs(batch)
    # built by hand: same tokens/positions; block ids recomputed with B_t = 4 over the same lengths
    length = batch.inputs["input_ids"].shape[1]
    kind, block = training_token_meta(torch.tensor([3, 5]), torch.tensor([16, 8]), 4, length)
    assert torch.equal(got["input_ids"], batch.inputs["input_ids"])
    assert torch.equal(got["position_ids"], batch.inputs["position_ids"])
    assert torch.equal(got["attention_mask"], dense_mask(kind, block))
    assert not torch.equal(got["attention_mask"], batch.inputs["attention_mask"])  # the student's B=8 mask differs
    recipe.dist_env = SimpleNamespace(device=torch.device("meta"))  # built on the training device
    on_device = recipe.teacher_inputs(layout.build(processor_batch([[1, 2, 3]], [[20, 21]]), [1], text_rope,
                                                   device="meta"))
    assert all(v.device.type == "meta" for v in on_device.values() if isinstance(v, torch.Tensor))


def _copy(src, dst, **config_changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in config_changes.items():
        if k == "vocab_size":
            cfg["text_config"]["vocab_size"] = v
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_preflight_checks(tmp_path, tiny_bard_dir, tiny_ar_dir):
    student = _copy(tiny_bard_dir, tmp_path / "student", block_size=8)
    assert check_teacher_student(str(student), str(tiny_bard_dir), None, None) == (8, 4)
    odd = _copy(tiny_bard_dir, tmp_path / "b3", block_size=3)
    with pytest.raises(BardConfigError, match="teacher block size 3 does not divide student block size 8"):
        check_teacher_student(str(student), str(odd), None, None)
    big_vocab = _copy(tiny_bard_dir, tmp_path / "vocab", vocab_size=384)
    with pytest.raises(BardConfigError, match=r"vocabularies differ: student .*student .*teacher .*vocab"):
        check_teacher_student(str(student), str(big_vocab), None, None)
    other_tok = _copy(tiny_bard_dir, tmp_path / "tok")
    tj = json.loads((other_tok / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other_tok / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(BardConfigError, match="tokenizers differ"):
        check_teacher_student(str(student), str(other_tok), None, None)
    with pytest.raises(BardConfigError, match="not bard_vl. Convert it first"):
        check_teacher_student(str(student), str(tiny_ar_dir), None, None)
    with pytest.raises(BardConfigError, match="not found; run PBM first"):
        check_teacher_student(str(tmp_path / "missing"), str(tiny_bard_dir), None, None)


def test_flex_backend_preflight_on_cpu():
    from nemo_bard.recipes.base import BardRecipeBase

    recipe = BardRecipeBase.__new__(BardRecipeBase)
    recipe.bard = parse_bard_settings({"mask_backend": "flex"})
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(BardConfigError, match="needs a GPU"):
        recipe._check_mask_backend()
    recipe.bard = parse_bard_settings({"mask_backend": "dense"})
    recipe._check_mask_backend()  # dense needs nothing


def test_swd_refuses_a_loss_reduction_it_would_not_use(tiny_bard_dir):
    """SWD normalises by loss positions: an explicit ``bard.loss.reduction: sample_mean`` is refused with one line
    naming the key (it was silently rewritten before); left unset, the stage's own rule applies."""
    from types import SimpleNamespace

    from nemo_bard.recipes.config import parse_sections
    from nemo_bard.recipes.swd import BardSWDRecipe

    paths = {"model": {"pretrained_model_name_or_path": str(tiny_bard_dir)},
             "teacher_model": {"pretrained_model_name_or_path": str(tiny_bard_dir)}}
    for loss, error in (({"reduction": "sample_mean"}, True), ({"reduction": "token_mean"}, False), ({}, False)):
        recipe = BardSWDRecipe.__new__(BardSWDRecipe)
        recipe.cfg = SimpleNamespace(get=lambda key, default=None: paths.get(key, default))
        recipe.sections = parse_sections({"bard": {"loss": loss}})
        recipe.bard = recipe.sections.bard
        if error:
            with pytest.raises(BardConfigError, match=r"^bard\.loss\.reduction=sample_mean: SWD .* set "
                                                      r"bard\.loss\.reduction: token_mean or remove the key$"):
                recipe.check_sections()
        else:
            recipe.check_sections()
            assert recipe.reduction() == "token_mean" and recipe.bard.block_size == 4
