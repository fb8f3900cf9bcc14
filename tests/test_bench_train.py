"""bench.train's arithmetic (tokens/s, MFU, ratios), its exact-length batches and its table."""

from __future__ import annotations

import pytest

from nemo_bard.bench.train import _derive, markdown, peak_tflops, processor_batch


def report(**rows):
    return {"tokens": 20_000, "num_parameters": 2_000_000_000, "variants": rows, "notes": {}, "preset": "qwen3vl_2b",
            "device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "batch_size": 4, "prompt_tokens": 4096.0,
            "response_tokens": 1024.0, "block_size": 32, "iters": 3}


def test_peak_table_matches_device_names():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and peak_tflops("NVIDIA H200") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0 and peak_tflops("Some GPU") is None


def test_tokens_mfu_and_ratios():
    r = report(ar={"step_s": 1.0, "seq_len": 5120, "positions": 20_000, "peak_gb": 70.0, "loss": 1.0},
               bard_dense={"step_s": 1.5, "seq_len": 6144, "positions": 24_000, "peak_gb": 60.0, "loss": 2.0},
               bard_flex={"step_s": 1.2, "seq_len": 6144, "positions": 24_000, "peak_gb": 42.0, "loss": 2.0},
               bard_flex_ac={"error": "out of memory: ..."})
    _derive(r, peak=1000.0)
    flex = r["variants"]["bard_flex"]
    assert flex["tokens_per_s"] == pytest.approx(20_000 / 1.2)  # data tokens, the same count for every variant
    assert flex["mfu"] == pytest.approx(6 * 2e9 * 20_000 / 1.2 / 1e15)
    assert flex["mfu_positions"] == pytest.approx(6 * 2e9 * 24_000 / 1.2 / 1e15)
    assert flex["time_vs_ar"] == pytest.approx(1.2) and flex["time_vs_dense"] == pytest.approx(0.8)
    assert flex["memory_vs_ar"] == pytest.approx(0.6) and flex["memory_vs_dense"] == pytest.approx(0.7)
    table = markdown(r)  # MFU 6 * 2e9 * 20,000 / 1.2 s / 1e15 = 20 %; by positions (24,000) 24 %
    assert "| bard_flex | 6144 | 1.200 | 1.20 | 0.80 | 16,667 | 20.0 % | 24.0 % | 42.0 | 0.60 | 2.0000 |" in table
    assert "| bard_flex_ac | – | out of memory" in table


def test_batch_has_the_requested_token_lengths():
    from nemo_bard.tiny import build_processor, build_tokenizer

    pre = processor_batch(build_processor(build_tokenizer()), 2, 150, 40)
    assert pre["prefix_lens"].tolist() == [150, 150] and pre["response_lens"].tolist() == [40, 40]
    assert pre["image_grid_thw"].tolist() == [[1, 14, 14]] * 2  # one 224x224 image per row


def test_tiny_run_on_cpu(tmp_path, capsys):
    """The benchmark end to end at the tiny preset (the GPU check runs it at 2B): NeMo's AR SFT step and the BARD
    step with and without NeMo's activation checkpointing, on one batch; checkpointing changes no loss."""
    import json

    from nemo_bard.bench.train import main

    report = main(["--preset", "tiny", "--batch-size", "2", "--prompt-tokens", "64", "--response-tokens", "32",
                   "--block-size", "8", "--iters", "1", "--variants", "ar,bard_dense,bard_dense_ac",
                   "--json", str(tmp_path / "train.json"), "--markdown", str(tmp_path / "train.md")])
    rows = report["variants"]
    assert set(rows) == {"ar", "bard_dense", "bard_dense_ac"} and rows["bard_dense_ac"]["checkpointed_modules"] > 0
    assert rows["bard_dense_ac"]["loss"] == rows["bard_dense"]["loss"]  # same batch, weights, noise
    assert json.loads((tmp_path / "train.json").read_text())["variants"].keys() == rows.keys()
    assert "| bard_dense_ac |" in (tmp_path / "train.md").read_text() and "| bard_dense_ac |" in capsys.readouterr().out
    assert report["tokens"] == 2 * (64 + 32)  # exact-length rows
