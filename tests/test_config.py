"""The schema of the bard:, block_merge: and kd: sections: defaults, allowed values, unknown keys."""

from __future__ import annotations

import json

import pytest

from nemo_bard.recipes.config import BardConfigError, parse_bard_settings, parse_sections
from tests.e2e_utils import run_python


def test_defaults_in_one_place():
    sections = parse_sections({})
    bard = sections.bard
    assert (bard.max_length, bard.clean_attention, bard.mask_backend, bard.response_pad_token) == (
        8192, "block_causal", "dense", "<|im_end|>")
    assert (bard.noise.type, bard.noise.min_rate, bard.noise.max_rate) == ("stratified_blocks", 0.001, 1.0)
    assert (bard.loss.reduction, bard.loss.pad_weight, bard.loss.min_t) == ("sample_mean", 0.5, None)
    assert sections.block_merge is None and sections.kd is None
    kd = parse_sections({"kd": {}}).kd
    assert (kd.top_k, kd.temperature, kd.direction, kd.ce_weight, kd.kd_weight) == (16, 1.0, "forward", 1.0, 0.5)


@pytest.mark.parametrize(
    "raw,match",
    [
        ({"bard": {"block_sise": 4}}, r"^unknown key bard\.block_sise \(valid: block_size, "),
        ({"bard": {"loss": {"reduce": "sum"}}}, r"^unknown key bard\.loss\.reduce \(valid: reduction, "),
        ({"bard": {"loss": {"reduction": "sum"}}}, r"^bard\.loss\.reduction: input should be 'sample_mean' or"),
        ({"bard": {"clean_attention": "full"}}, r"^bard\.clean_attention: .*\(got 'full'\)$"),
        ({"bard": {"noise": {"min_rate": 0.6, "max_rate": 0.2}}}, r"^bard\.noise: min_rate=0\.6 exceeds max_rate=0\.2$"),
        ({"bard": {"block_size": 8, "max_length": 12}}, "shorter than two blocks"),
        ({"kd": {"direction": "both"}}, r"^kd\.direction: input should be 'forward' or 'reverse' \(got 'both'\)$"),
        ({"kd": {"top_k": 0}}, r"^kd\.top_k: input should be greater than or equal to 1"),
        ({"block_merge": {"schedule": [{"block_size": 4, "steps": 2}, {"block_size": 6, "steps": 2}]}},
         r"^block_merge\.schedule\[1\]: block size 6 is not a multiple of the previous 4"),
        ({"block_merge": {"schedule": [{"block_size": 4, "step": 2}]}}, r"unknown key block_merge\.schedule\.0\.step\b"),
        ({"block_merge": {"reset_lr": True, "schedule": [{"block_size": 4, "steps": 2}]}},
         r"^unknown key block_merge\.reset_lr \(valid: schedule, reset_lr_schedule"),
    ],
)
def test_errors_are_one_line_and_name_the_key(raw, match):
    with pytest.raises(BardConfigError, match=match) as info:
        parse_sections(raw)
    assert "\n" not in str(info.value)


def test_assignment_is_validated():
    bard = parse_bard_settings({"mask_backend": "dense"})
    bard.block_size = 16
    with pytest.raises(ValueError):
        bard.mask_backend = "sparse"


def test_schema_module_is_light():
    out = run_python("import sys, nemo_bard.recipes.config; print('torch' in sys.modules, 'nemo_automodel' in sys.modules)")
    assert out.split() == ["False", "False"]


def test_a_recipe_config_is_checked_once_per_process(monkeypatch, tmp_path):
    """The front end checks a config before any heavy import; the recipe's pre-flight then gets the same typed
    sections without running the checks again. A changed config is checked again."""
    import nemo_bard.recipes.config as config

    calls = []
    monkeypatch.setattr(config, "check_paths", lambda cfg, checksums=False: calls.append(checksums))
    monkeypatch.setattr(config, "_checked", {})
    cfg = {"bard": {"max_length": 256, "verify_checksums": True}, "step_scheduler": {"max_steps": 4},
           "dataset": {"_target_": "nemo_bard.data.datasets.BardChatDataset", "path": "data.jsonl"}}
    first = config.check_recipe_config(cfg)
    again = json.loads(json.dumps(cfg))  # the config as the recipe gets it: NeMo's loader resolved the _target_
    again["dataset"]["_target_"] = config.BardSettings
    second = config.check_recipe_config(again)
    assert calls == [True] and first == second and first is not second  # each caller gets its own copy
    config.check_recipe_config({**cfg, "bard": {"max_length": 512, "verify_checksums": False}})
    assert calls == [True, False]
