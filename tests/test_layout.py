"""Block layout (§3), noise (§5) and the masked-denoising loss (§6) on hand-checked cases."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from nemo_bard.attention.masks import dense_mask, training_token_meta
from nemo_bard.data.layout import BlockLayout, collated_batch, select_samples
from nemo_bard.data.noise import sample_block_rates, sample_noise
from nemo_bard.loss.denoise import MaskedDenoisingLoss
from nemo_bard.schema import LossSettings, NoiseSettings
from tests.test_masks import HAND_BLOCK_CAUSAL

MASK, PAD = 7, 99
ALL_MASKED = NoiseSettings(type="uniform_sample", min_rate=1.0, max_rate=1.0)


def text_rope(ids, mask2d, mm, image_grid_thw=None, video_grid_thw=None):
    """Text-only mRoPE: positions 0..n-1 on all three axes over the valid tokens."""
    pos = (mask2d.cumsum(-1) - 1).clamp_min(0)
    return pos[None].expand(3, -1, -1), None


def processor_batch(prefixes, responses):
    prefix_ids = torch.zeros(len(prefixes), max(map(len, prefixes)), dtype=torch.long)
    for i, p in enumerate(prefixes):
        prefix_ids[i, : len(p)] = torch.tensor(p)
    return collated_batch(prefix_ids, torch.tensor([len(p) for p in prefixes]), responses)


def test_single_sample_layout_by_hand():
    layout = BlockLayout(block_size=2, mask_token_id=MASK, pad_token_id=PAD, noise=ALL_MASKED)
    out = layout.build(processor_batch([[10, 11, 12]], [[20, 21, 22]]), seeds=[0], rope_fn=text_rope)
    # [prefix P=3 | clean R=4 (3 real + 1 pad) | noisy copy, all masked]
    assert out.inputs["input_ids"][0].tolist() == [10, 11, 12, 20, 21, 22, PAD, MASK, MASK, MASK, MASK]
    # noisy copy reuses the clean copy's positions
    assert out.inputs["position_ids"][0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6]
    assert torch.equal(out.inputs["position_ids"][0], out.inputs["position_ids"][1])
    assert torch.equal(out.inputs["attention_mask"][0, 0], HAND_BLOCK_CAUSAL)
    assert out.loss_mask[0].tolist() == [False] * 7 + [True] * 4
    assert out.targets[0, 7:].tolist() == [20, 21, 22, PAD]
    # 1/t with t=1, response padding (after the real <|im_end|>) at half weight
    assert out.loss_weights[0, 7:].tolist() == [1.0, 1.0, 1.0, 0.5]
    assert out.loss_weights[0, :7].abs().sum() == 0


def test_batch_padding_positions_and_mask_rows():
    layout = BlockLayout(block_size=2, mask_token_id=MASK, pad_token_id=PAD, noise=ALL_MASKED)
    out = layout.build(processor_batch([[10, 11, 12], [40, 41]], [[20, 21, 22], [30]]), [0, 1], text_rope)
    assert out.inputs["input_ids"].shape == (2, 11)
    # sample 1: P=2, R=2 -> 6 real tokens then batch padding
    assert out.inputs["input_ids"][1, :6].tolist() == [40, 41, 30, PAD, MASK, MASK]
    assert out.inputs["position_ids"][0, 1, :6].tolist() == [0, 1, 2, 3, 2, 3]
    m = out.inputs["attention_mask"][1, 0]
    assert not m[:6, 6:].any() and not m[6:, :6].any()
    assert out.loss_mask[1].tolist() == [False] * 4 + [True, True] + [False] * 5
    assert out.loss_weights[1, 4:6].tolist() == [1.0, 0.5]


def _tensors(batch) -> dict:
    """Every tensor of a BlockBatch by name (its model inputs and its own fields)."""
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return {k: v for k, v in {**batch.inputs, **fields}.items() if isinstance(v, torch.Tensor)}


def test_truncation_at_block_boundary_and_drop_counted():
    layout = BlockLayout(block_size=2, mask_token_id=MASK, pad_token_id=PAD, max_length=9, noise=ALL_MASKED)
    batch = processor_batch([[10, 11, 12], list(range(50, 58))], [[20, 21, 22, 23, 24], [30]])
    out = layout.build(batch, [0, 1], text_rope)
    assert out.num_dropped == 1 and out.num_samples == 1
    # room = (9 - 3) // 4 * 2 = 2 tokens: the response is cut after one block, never inside the prefix
    assert out.resp_lens.tolist() == [2]
    assert out.inputs["input_ids"][0].tolist() == [10, 11, 12, 20, 21, MASK, MASK]


def test_select_samples_drops_media_rows():
    batch = processor_batch([[1], [2], [3]], [[4], [5], [6]])
    grids = torch.tensor([[1, 2, 2], [1, 4, 2], [1, 2, 4]])  # 4, 8, 8 patch rows
    batch.update(pixel_values=torch.arange(20).float()[:, None], image_grid_thw=grids,
                 n_images_per_sample=torch.tensor([1, 0, 2]))
    out = select_samples(batch, torch.tensor([False, True, True]))
    assert out["image_grid_thw"].tolist() == [[1, 4, 2], [1, 2, 4]]
    assert out["pixel_values"][:, 0].tolist() == list(range(4, 20))
    assert out["prefix_ids"][:, 0].tolist() == [2, 3]


def test_noise_is_stratified_and_deterministic():
    cfg = NoiseSettings()
    for seed in range(50):
        n = 1 + seed % 7
        t = sample_block_rates(n, cfg, torch.Generator().manual_seed(seed))
        sorted_t = torch.sort(t).values
        strata = torch.arange(n, dtype=torch.float64)
        # every sample covers [0, 1] across its blocks: one rate per stratum [i/N, (i+1)/N]
        assert ((sorted_t >= (strata + cfg.min_rate) / n - 1e-12) & (sorted_t <= (strata + 1) / n + 1e-12)).all()
    r = torch.tensor([8, 4])
    a = sample_noise(r, 2, 8, [3, 4], cfg)
    b = sample_noise(r, 2, 8, [3, 4], cfg)
    c = sample_noise(r, 2, 8, [3, 5], cfg)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert torch.equal(a[0][0], c[0][0]) and not torch.equal(a[0][1], c[0][1])  # per-sample seeds
    # rates are constant within a block and zero outside the response
    assert torch.equal(a[0][0, 0::2], a[0][0, 1::2]) and (a[0][1, 4:] == 0).all()


def test_noise_mask_frequency_matches_rate():
    t, masked = sample_noise(torch.tensor([4000]), 4000, 4000, [11], NoiseSettings())
    assert abs(masked.float().mean().item() - t[0, 0].item()) < 0.03


def test_swd_noise_masks_at_least_one_token():
    cfg = NoiseSettings(type="uniform_sample", min_rate=0.0, max_rate=0.0)
    _, masked = sample_noise(torch.tensor([4, 8]), 4, 8, [1, 2], cfg)
    assert masked.sum(-1).tolist() == [1, 1]


def test_noise_config_errors():
    from nemo_bard.errors import BardConfigError
    from nemo_bard.recipes.config import parse_bard_settings

    with pytest.raises(ValueError, match="min_rate=0.5 exceeds max_rate=0.1"):
        NoiseSettings(min_rate=0.5, max_rate=0.1)
    with pytest.raises(BardConfigError, match=r"bard\.noise\.type"):  # the section's model names the key
        parse_bard_settings({"noise": {"type": "gaussian"}})


def _hand_case():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    targets = torch.tensor([0, 2, 1])
    weights = torch.tensor([1.0, 2.0, 0.5])
    sample_ids = torch.tensor([0, 0, 1])
    return logits, targets, weights, sample_ids


def test_denoise_loss_hand_computed_two_samples():
    logits, targets, weights, sample_ids = _hand_case()
    ce_a = math.log(1 + 2 * math.exp(-2))
    ce_b = math.log(2 + math.e)
    ce_c = math.log(3)
    expected = ((ce_a * 1.0 + ce_b * 2.0) / 2 + (ce_c * 0.5) / 1) / 2
    sample_mean = MaskedDenoisingLoss(LossSettings(reduction="sample_mean"))
    out = sample_mean(logits, targets, weights, sample_ids, 2, global_denominator=2)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.num_correct.item() == 1
    token_mean = MaskedDenoisingLoss(LossSettings(reduction="token_mean"))
    tok = token_mean(logits, targets, weights, sample_ids, 2, global_denominator=3)
    assert tok.loss.item() == pytest.approx((ce_a + 2 * ce_b + 0.5 * ce_c) / 3, rel=1e-6)


def test_two_micro_batches_equal_one_big_batch():
    logits, targets, weights, sample_ids = _hand_case()
    fn = MaskedDenoisingLoss(LossSettings(reduction="sample_mean"))
    big = fn(logits, targets, weights, sample_ids, 2, global_denominator=2).loss
    (g_big,) = torch.autograd.grad(big, logits)
    # micro-batch 1 holds sample 0, micro-batch 2 holds sample 1; both normalise by the global count
    l1 = fn(logits[:2], targets[:2], weights[:2], torch.tensor([0, 0]), 1, global_denominator=2).loss
    l2 = fn(logits[2:], targets[2:], weights[2:], torch.tensor([0]), 1, global_denominator=2).loss
    (g_acc,) = torch.autograd.grad(l1 + l2, logits)
    assert (l1 + l2).item() == pytest.approx(big.item(), rel=1e-7)
    torch.testing.assert_close(g_acc, g_big)


def test_loss_positions_match_model_side_mask():
    """The layout's kinds/blocks agree with the mask module's own layout for the same lengths."""
    layout = BlockLayout(block_size=4, mask_token_id=MASK, pad_token_id=PAD, noise=NoiseSettings())
    batch = processor_batch([[1, 2, 3, 4, 5], [6, 7]], [list(range(20, 29)), [30, 31]])
    out = layout.build(batch, [5, 6], text_rope)
    kind, block = training_token_meta(out.prefix_lens, out.resp_lens, 4, out.inputs["input_ids"].shape[1])
    assert torch.equal(out.inputs["attention_mask"], dense_mask(kind, block))
    assert not (out.loss_mask & (kind != 2)).any()


@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_built_batch_and_mask_land_on_the_requested_device(backend, monkeypatch):
    """Every tensor the model and the loss read, and the mask, are placed on / built on ``device`` (here the
    ``meta`` device, which a CPU-only machine has: shapes without data); the lengths stay on the host."""
    import torch.nn.attention.flex_attention as flex

    built_on = []

    def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device, BLOCK_SIZE):  # noqa: N803  (torch's names)
        built_on.append(torch.device(device))
        index = torch.zeros(1, dtype=torch.long, device=device)
        built_on.append(mask_mod(index, index, index, index).device)  # the tensors the mask_mod reads
        return "block-mask"

    monkeypatch.setattr(flex, "create_block_mask", create_block_mask)
    layout = BlockLayout(block_size=2, mask_token_id=MASK, pad_token_id=PAD, noise=ALL_MASKED, mask_backend=backend)
    batch = processor_batch([[10, 11, 12], [40, 41]], [[20, 21, 22], [30]])
    out = layout.build(batch, [0, 1], text_rope, device="meta")
    tensors = _tensors(out)
    assert {"input_ids", "position_ids", "loss_mask", "targets", "loss_weights", "mask_rates"} <= set(tensors)
    assert {k for k, v in tensors.items() if v.device.type != "meta"} == {"prefix_lens", "resp_lens"}
    assert out.num_loss_tokens == 6 and out.num_loss_samples == 2  # host-side counts, no device sync
    if backend == "dense":
        assert out.inputs["attention_mask"].device.type == "meta" and built_on == []
    else:
        assert out.inputs["attention_mask"] == "block-mask" and built_on == [torch.device("meta")] * 2
    cpu = layout.build(batch, [0, 1], text_rope)
    assert all(v.device.type == "cpu" for v in _tensors(cpu).values())
