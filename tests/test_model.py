"""The bard_vl model: masked training forward semantics, loading through both Auto classes, conversion."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nemo_bard.attention.masks import dense_mask, training_token_meta
from tests.conftest import random_image

B = 4


def _training_inputs(model, processor, seed: int = 0, resp_text: str = "12345 67"):
    """One sample in the [prefix | clean | noisy] layout, built by hand."""
    tok = processor.tokenizer
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read the digits."}]}]
    prefix_text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    enc = processor(text=[prefix_text], images=[random_image(seed)], return_tensors="pt")
    prefix = enc["input_ids"][0]
    resp = tok(resp_text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    r = -(-len(resp) // B) * B
    resp = torch.tensor(resp + [tok.convert_tokens_to_ids("<|im_end|>")] * (r - len(resp)))
    g = torch.Generator().manual_seed(seed)
    noisy = torch.where(torch.rand(r, generator=g) < 0.5, torch.full_like(resp, model.config.mask_token_id), resp)
    p = prefix.numel()
    ids = torch.cat([prefix, resp, noisy])[None]
    mm = torch.cat([enc["mm_token_type_ids"][0], torch.zeros(2 * r, dtype=torch.long)])[None]
    pos_pc, _ = model.rope_positions(ids[:, : p + r], None, mm[:, : p + r], enc["image_grid_thw"])
    pos = torch.cat([pos_pc, pos_pc[:, :, p:]], dim=-1)
    kind, block = training_token_meta(torch.tensor([p]), torch.tensor([r]), B, p + 2 * r)
    return dict(
        input_ids=ids, mm_token_type_ids=mm, position_ids=pos, pixel_values=enc["pixel_values"],
        image_grid_thw=enc["image_grid_thw"], kind=kind, block=block, p=p, r=r,
    )


def _forward(model, x, ids=None, length=None):
    ids = x["input_ids"] if ids is None else ids
    length = ids.shape[1] if length is None else length
    mask = dense_mask(x["kind"][:, :length], x["block"][:, :length])
    return model(
        input_ids=ids[:, :length], attention_mask=mask, position_ids=x["position_ids"][:, :, :length],
        mm_token_type_ids=x["mm_token_type_ids"][:, :length], pixel_values=x["pixel_values"],
        image_grid_thw=x["image_grid_thw"],
    ).logits


@torch.no_grad()
def test_clean_logits_equal_block_causal_forward_of_prefix_clean(tiny_bard_model, tiny_processor):
    x = _training_inputs(tiny_bard_model, tiny_processor)
    p, r = x["p"], x["r"]
    full = _forward(tiny_bard_model, x)
    alone = _forward(tiny_bard_model, x, length=p + r)  # no noisy copy at all
    torch.testing.assert_close(full[:, : p + r], alone, rtol=0, atol=1e-5)


@torch.no_grad()
def test_noisy_block_logits_ignore_later_blocks(tiny_bard_model, tiny_processor):
    x = _training_inputs(tiny_bard_model, tiny_processor)
    p, r = x["p"], x["r"]
    assert r >= 2 * B, "need two response blocks"
    base = _forward(tiny_bard_model, x)
    changed = x["input_ids"].clone()
    changed[0, p + B : p + r] = 7  # later clean blocks
    changed[0, p + r + B :] = 9  # later noisy blocks
    out = _forward(tiny_bard_model, x, ids=changed)
    first_noisy = slice(p + r, p + r + B)
    torch.testing.assert_close(out[:, first_noisy], base[:, first_noisy], rtol=0, atol=1e-5)
    # ... while the later noisy block itself does change (the test can fail)
    assert (out[:, p + r + B :] - base[:, p + r + B :]).abs().max() > 1e-4
    # and changing a token inside the same noisy block changes that block (bidirectional within a block)
    same = x["input_ids"].clone()
    same[0, p + r + B - 1] = 11
    out2 = _forward(tiny_bard_model, x, ids=same)
    assert (out2[:, p + r : p + r + B - 1] - base[:, p + r : p + r + B - 1]).abs().max() > 1e-4


@torch.no_grad()
def test_logits_mask_and_same_position_labels(tiny_bard_model, tiny_processor):
    x = _training_inputs(tiny_bard_model, tiny_processor)
    full = _forward(tiny_bard_model, x)
    sel = torch.zeros_like(x["input_ids"], dtype=torch.bool)
    sel[0, -3:] = True
    mask = dense_mask(x["kind"], x["block"])
    kwargs = dict(
        input_ids=x["input_ids"], attention_mask=mask, position_ids=x["position_ids"],
        mm_token_type_ids=x["mm_token_type_ids"], pixel_values=x["pixel_values"], image_grid_thw=x["image_grid_thw"],
    )
    out = tiny_bard_model(**kwargs, logits_mask=sel)
    assert out.logits.shape == (3, full.shape[-1])
    torch.testing.assert_close(out.logits, full[0, -3:], rtol=0, atol=1e-6)
    labels = torch.full_like(x["input_ids"], -100)
    labels[0, -3:] = torch.tensor([5, 6, 7])
    loss = tiny_bard_model(**kwargs, labels=labels).loss
    expected = torch.nn.functional.cross_entropy(full[0, -3:], torch.tensor([5, 6, 7]))  # no shift
    torch.testing.assert_close(loss, expected)


@torch.no_grad()
def test_eager_matches_sdpa(tiny_bard_dir, tiny_bard_model, tiny_processor):
    from transformers import AutoModelForImageTextToText

    eager = AutoModelForImageTextToText.from_pretrained(tiny_bard_dir, dtype=torch.float32, attn_implementation="eager")
    x = _training_inputs(tiny_bard_model, tiny_processor, seed=1)
    torch.testing.assert_close(_forward(eager.eval(), x), _forward(tiny_bard_model, x), rtol=0, atol=1e-5)


@torch.no_grad()
def test_default_2d_mask_is_block_causal_prompt_mask(tiny_bard_model):
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    out = tiny_bard_model(input_ids=ids).logits
    changed = ids.clone()
    changed[0, 5] = 20  # block 1 (positions 4,5) with B=4: positions 0..3 unaffected, 4 affected
    out2 = tiny_bard_model(input_ids=changed).logits
    assert torch.allclose(out[:, :4], out2[:, :4], atol=1e-6)
    assert not torch.allclose(out[:, 4], out2[:, 4], atol=1e-4)


def test_auto_classes_load_bard_dir(tiny_bard_dir, tiny_ar_dir):
    from nemo_automodel import NeMoAutoModelForImageTextToText
    from transformers import AutoConfig, AutoModelForImageTextToText

    from nemo_bard import BardVLConfig, BardVLForConditionalGeneration
    from nemo_bard.integrations.cpu import cpu_patches
    from nemo_bard.integrations.nemo import NeMoBardVLForConditionalGeneration

    cfg = AutoConfig.from_pretrained(tiny_bard_dir)
    assert isinstance(cfg, BardVLConfig) and cfg.block_size == 4
    src = load_file(tiny_ar_dir / "model.safetensors")
    hf_model = AutoModelForImageTextToText.from_pretrained(str(tiny_bard_dir), dtype=torch.float32)
    with cpu_patches():
        nemo_model = NeMoAutoModelForImageTextToText.from_pretrained(str(tiny_bard_dir), dtype=torch.float32)
    assert type(hf_model) is BardVLForConditionalGeneration  # inference class: transformers only
    assert isinstance(nemo_model, NeMoBardVLForConditionalGeneration)  # NeMo's registry builds the training class
    for model in (hf_model, nemo_model):
        assert isinstance(model, BardVLForConditionalGeneration)
        sd = model.state_dict()
        assert set(sd) == set(src)
        for k, v in src.items():
            assert torch.equal(sd[k], v), k  # weights bit-identical to the AR source


def test_bard_dir_saved_with_qwen3vl_shaped_config_loads(tmp_path, tiny_ar_dir):
    """A directory holding only a Qwen3-VL-shaped config with model_type bard_vl (like released Bard-VL)."""
    import shutil

    from transformers import AutoModelForImageTextToText

    from nemo_bard import BardVLForConditionalGeneration

    dst = tmp_path / "released_like"
    shutil.copytree(tiny_ar_dir, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "bard_vl"
    cfg["architectures"] = ["BardVLForConditionalGeneration"]
    cfg["mask_token_id"] = 346
    (dst / "config.json").write_text(json.dumps(cfg))
    model = AutoModelForImageTextToText.from_pretrained(dst)
    assert isinstance(model, BardVLForConditionalGeneration)
    assert model.config.mask_token_id == 346


def test_convert_records_config_and_refuses_bad_input(tmp_path, tiny_ar_dir, tiny_bard_dir):
    from nemo_bard.convert import ConversionError, convert

    cfg = json.loads((tiny_bard_dir / "config.json").read_text())
    assert cfg["model_type"] == "bard_vl" and cfg["architectures"] == ["BardVLForConditionalGeneration"]
    assert cfg["mask_token_id"] == 346 and cfg["block_size"] == 4
    assert (tiny_bard_dir / "model.safetensors").read_bytes() == (tiny_ar_dir / "model.safetensors").read_bytes()
    with pytest.raises(ConversionError, match="already a bard_vl"):
        convert(tiny_bard_dir, tmp_path / "again")
    with pytest.raises(ConversionError, match="not empty"):
        convert(tiny_ar_dir, tiny_bard_dir)
    with pytest.raises(ConversionError, match="outside the embedding"):
        convert(tiny_ar_dir, tmp_path / "big", mask_token_id=10_000)
    bad = tmp_path / "llama"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConversionError, match="Qwen3-VL"):
        convert(bad, tmp_path / "out")


@torch.no_grad()
def test_flex_attention_block_mask_matches_dense(tiny_bard_dir, tiny_bard_model):
    from transformers import AutoModelForImageTextToText

    from nemo_bard.attention.masks import PAD, flex_block_mask

    flex = AutoModelForImageTextToText.from_pretrained(
        tiny_bard_dir, dtype=torch.float32,
        attn_implementation={"text_config": "flex_attention", "vision_config": "sdpa", "": "sdpa"},
    ).eval()
    p, r, length = torch.tensor([5, 3]), torch.tensor([8, 4]), 21
    kind, block = training_token_meta(p, r, B, length)
    ids = torch.randint(0, 300, (2, length), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(length)[None, None].expand(3, 2, length)
    dense = tiny_bard_model(input_ids=ids, attention_mask=dense_mask(kind, block), position_ids=pos).logits
    out = flex(input_ids=ids, attention_mask=flex_block_mask(kind, block), position_ids=pos).logits
    real = kind != PAD
    torch.testing.assert_close(out[real], dense[real], rtol=0, atol=1e-5)


def test_flex_capability_is_declared_on_bard_vl_only(tiny_ar_dir, tiny_bard_model):
    """Loading bard_vl with a flex text decoder does not make transformers' own Qwen3-VL accept flex."""
    from transformers import AutoModelForImageTextToText

    from nemo_bard.models import BardVLTextModel

    assert isinstance(tiny_bard_model.model.language_model, BardVLTextModel)
    with pytest.raises(ValueError, match="does not support an attention implementation through torch's flex"):
        AutoModelForImageTextToText.from_pretrained(
            tiny_ar_dir, attn_implementation={"text_config": "flex_attention", "vision_config": "sdpa", "": "sdpa"})


def test_tiny_model_layers_override_changes_only_the_text_depth(tmp_path, tiny_ar_dir):
    from nemo_bard.tiny import PRESETS, write_tiny_model

    out = write_tiny_model(tmp_path / "deep", preset="test", seed=0, layers=PRESETS["test"].layers + 1)
    deep, base = (json.loads((d / "config.json").read_text()) for d in (out, tiny_ar_dir))
    assert deep["text_config"]["num_hidden_layers"] == base["text_config"]["num_hidden_layers"] + 1
    for section in ("text_config", "vision_config"):
        differs = {k for k in base[section] if base[section][k] != deep[section].get(k)}
        assert differs == ({"num_hidden_layers", "layer_types"} & set(base[section]) if section == "text_config"
                           else set())
    assert json.loads((out / "nemo_bard_tiny.json").read_text()) == {"preset": "test", "seed": 0, "layers": 3}
    with pytest.raises(ValueError, match="layers must be at least 1, got 0"):
        write_tiny_model(tmp_path / "none", preset="test", layers=0)
    assert not (tmp_path / "none").exists()


def test_tiny_cli_refuses_zero_layers_in_one_line(tmp_path, capsys):
    from nemo_bard.tiny import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "none"), "--layers", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("error: --layers must be at least 1, got 0")
    assert not (tmp_path / "none").exists()
