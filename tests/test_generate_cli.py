"""``python -m nemo_bard.generate``: answer + stats JSON on the tiny model, and one-line usage errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nemo_bard.generate import build_parser, main
from tests.conftest import random_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "digits.png"
    random_image(5, 64, 96).save(path)
    return path


def test_cli_writes_stats_json(tiny_bard_dir, image_path, tmp_path, capsys):
    stats_path = tmp_path / "stats.json"
    rc = main(["--model", str(tiny_bard_dir), "--image", str(image_path), "--prompt", "Read the digits.",
               "--max-new-tokens", "8", "--stats-json", str(stats_path), "--verify"])  # an intact checkpoint passes
    assert rc == 0
    stats = json.loads(stats_path.read_text())
    for key in ("response_tokens", "num_forwards", "tokens_per_forward", "wall_time", "prefill_time", "answer"):
        assert key in stats
    assert 1 <= stats["response_tokens"] <= 8 and stats["num_forwards"] >= 2  # two blocks of B=4
    assert stats["tokens_per_forward"] == pytest.approx(stats["response_tokens"] / stats["num_forwards"])
    assert stats["block_size"] == 4 and stats["device"] == "cpu" and stats["dtype"] == "float32"
    assert stats["answer"] in capsys.readouterr().out


def test_cli_stream_and_block_size_warning(tiny_bard_dir, image_path, tmp_path, capsys):
    stats_path = tmp_path / "s.json"
    rc = main([
        "--model", str(tiny_bard_dir), "--image", str(image_path), "--prompt", "Describe the image.",
        "--block_size", "2", "--denoising_steps", "2", "--max_new_tokens", "6", "--stream",
        "--stats_json", str(stats_path),
    ])
    out = capsys.readouterr()
    assert rc == 0
    assert "warning: --block-size 2 differs from the checkpoint's block_size 4" in out.err
    stats = json.loads(stats_path.read_text())
    assert stats["block_size"] == 2 and stats["denoising_steps"] == 2
    assert out.out == stats["answer"] + "\n"  # streamed block by block, then a newline


def test_cli_video_frame_directory(tiny_bard_dir, tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):
        random_image(20 + i).save(frames / f"{i:03d}.png")
    stats_path = tmp_path / "v.json"
    rc = main(["--model", str(tiny_bard_dir), "--video", str(frames), "--prompt", "Describe.",
               "--max-new-tokens", "4", "--stats-json", str(stats_path)])
    stats = json.loads(stats_path.read_text())
    assert rc == 0 and stats["prompt_tokens"] > 20 and stats["video_frame_indices"] == [[0, 1, 2, 3]]


def test_cli_video_file_sampling(tiny_bard_dir, coded_clip, tmp_path, capsys):
    """A 3-s, 10-fps mp4 at 2 fps would give 6 frames; --video-max-frames 4 spreads 4 over the clip."""
    stats_path = tmp_path / "v.json"
    assert main(["--model", str(tiny_bard_dir), "--video", str(coded_clip), "--prompt", "Describe.",
                 "--video-max-frames", "4", "--max-new-tokens", "4", "--stats-json", str(stats_path)]) == 0
    stats = json.loads(stats_path.read_text())
    assert stats["video_frame_indices"] == [[0, 10, 19, 29]] and stats["prompt_tokens"] > 20


SAMPLING_ERRORS = {  # flags -> the one line's tail
    "temperature_nan": (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0 = greedy), got nan"),
    "temperature_inf": (["--temperature", "inf"], "--temperature must be a finite number >= 0 (0 = greedy), got inf"),
    "top_p_2": (["--top-p", "2"], "--top-p must be in (0, 1] (1 = off), got 2.0"),
    "top_p_0": (["--top_p", "0"], "--top-p must be in (0, 1] (1 = off), got 0.0"),
    "top_k_negative": (["--top-k", "-1"], "--top-k must be >= 0 (0 = off), got -1"),
    "engine": (["--engine", "fast"], "--engine 'fast' is not one of static, compiled, eager"),
}


@pytest.mark.parametrize("case", ["missing_image", "strip_image", "ar_model", "missing_model", "corrupt_video",
                                  "no_decoder",
                                  "tau_negative", "tau_above_one", "empty_config", "truncated_weights",
                                  "zeroed_weights", *SAMPLING_ERRORS])
def test_cli_usage_errors(case, tiny_bard_dir, tiny_ar_dir, tmp_path, capsys, monkeypatch):
    argv = ["--model", str(tiny_bard_dir), "--prompt", "hi"]
    if case == "missing_image":
        argv += ["--image", str(tmp_path / "nope.png")]
        expected = f"--image {tmp_path / 'nope.png'}: file not found"
    elif case == "strip_image":  # the processor refuses aspect ratios above 200:1
        random_image(0, 1, 10000).save(tmp_path / "strip.png")
        argv += ["--image", str(tmp_path / "strip.png")]
        expected = f"--image: image {tmp_path / 'strip.png'} is 10000x1 pixels, an aspect ratio above the 200:1"
    elif case == "ar_model":
        argv[1] = str(tiny_ar_dir)
        expected = f"python -m nemo_bard.convert --src {tiny_ar_dir} --dst OUT"
    elif case == "missing_model":
        argv[1] = str(tmp_path / "none")
        expected = f"--model directory {tmp_path / 'none'} not found"
    elif case in ("tau_negative", "tau_above_one"):
        tau = "-1" if case == "tau_negative" else "2"
        argv += ["--confidence-threshold", tau]
        expected = f"--confidence-threshold must be in [0, 1], got {float(tau)}"
    elif case == "empty_config":
        broken = tmp_path / "killed_export"
        shutil.copytree(tiny_bard_dir, broken)
        (broken / "config.json").write_text("")  # what a kill during a non-atomic export left
        argv[1] = str(broken)
        expected = f"{broken / 'config.json'} is empty"
    elif case in SAMPLING_ERRORS:
        argv += SAMPLING_ERRORS[case][0]
        expected = SAMPLING_ERRORS[case][1]
    elif case in ("truncated_weights", "zeroed_weights"):
        broken = tmp_path / "damaged"
        shutil.copytree(tiny_bard_dir, broken)
        weights = broken / "model.safetensors"
        size = weights.stat().st_size
        if case == "truncated_weights":
            weights.write_bytes(weights.read_bytes()[: size // 2])
        else:  # 1 KiB of zeros inside the tensor data: only the sha256 recorded at export tells
            with open(weights, "r+b") as f:
                f.seek(size // 2)
                f.write(bytes(1024))
            argv += ["--verify"]
        argv[1] = str(broken)
        expected = f"{weights} is damaged: "
    elif case == "corrupt_video":
        clip = tmp_path / "clip.mp4"
        clip.write_bytes(b"\x00" * 64)
        argv += ["--video", str(clip)]
        expected = f"--video: cannot open video {clip} as a video file"
    else:
        monkeypatch.setattr("transformers.utils.is_av_available", lambda: False)
        clip = tmp_path / "clip.mp4"
        clip.write_bytes(b"\x00")
        argv += ["--video", str(clip)]
        expected = "--video: decoding video files needs PyAV: pip install 'nemo-bard[video]'"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nemo_bard.generate: error: ") and expected in err[0]


def test_generate_refuses_tau_outside_unit_interval(tiny_bard_model, tiny_processor):
    from nemo_bard.generation import block_diffusion_generate
    from nemo_bard.generation.inputs import build_inputs, user_conversation

    inputs = build_inputs(tiny_processor, [user_conversation("hi")])
    for tau in (-1.0, 2.0):
        with pytest.raises(ValueError, match=r"confidence_threshold must be in \[0, 1\]"):
            block_diffusion_generate(tiny_bard_model, **inputs, max_new_tokens=4, confidence_threshold=tau)


def test_bad_arguments_answer_before_torch_is_imported(tiny_bard_dir, tmp_path):
    """``--model /nope`` and a bad sampling flag: one line, exit 2, well within 3 s, without importing torch (a
    new interpreter: the test process has torch loaded already)."""
    import os
    import subprocess
    import sys
    import time

    code = ("import sys; from nemo_bard.generate import main; rc = main(sys.argv[1:]); "
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for extra, line in ((["--model", str(tmp_path / "nope")], f"--model directory {tmp_path / 'nope'} not found; pass "
                                                                "a bard_vl checkpoint directory"),
                        (["--model", str(tiny_bard_dir), "--top-p", "2"],
                         "--top-p must be in (0, 1] (1 = off), got 2.0")):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, *extra, "--prompt", "x"], env=env, capture_output=True,
                              text=True, timeout=60)
        elapsed = time.perf_counter() - t
        assert proc.stdout.split() == ["2", "False", "False"], proc.stderr
        assert proc.stderr.strip().splitlines() == [f"nemo_bard.generate: error: {line}"]
        assert elapsed < 3.0, elapsed


def test_help_lists_the_decoders_names():
    from nemo_bard.generate import ENGINE_NAMES, STRATEGY_NAMES
    from nemo_bard.generation.points import ENGINES, REMASKING_STRATEGIES

    assert ENGINE_NAMES == tuple(ENGINES) and STRATEGY_NAMES == tuple(REMASKING_STRATEGIES)


def test_cli_accepts_dash_and_underscore_spellings():
    parser = build_parser()
    dash = parser.parse_args(["--model", "m", "--prompt", "p", "--block-size", "8", "--denoising-steps", "4",
                              "--confidence-threshold", "0.5", "--max-new-tokens", "3",
                              "--remasking-strategy", "low_confidence_static", "--stats-json", "x.json"])
    under = parser.parse_args(["--model", "m", "--prompt", "p", "--block_size", "8", "--denoising_steps", "4",
                               "--confidence_threshold", "0.5", "--max_new_tokens", "3",
                               "--remasking_strategy", "low_confidence_static", "--stats_json", "x.json"])
    assert vars(dash) == vars(under)
    assert (dash.block_size, dash.denoising_steps, dash.confidence_threshold, dash.max_new_tokens) == (8, 4, 0.5, 3)
