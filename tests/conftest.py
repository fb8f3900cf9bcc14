"""Shared fixtures: one tiny AR Qwen3-VL and its bard_vl conversion per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One compute thread per xdist worker and per process it starts: the workers (one per core) already fill the
    # machine, and two-thread pools on top of them oversubscribe it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from PIL import Image

import nemo_bard.models.modeling_bard_vl  # noqa: F401  (registers bard_vl with the Auto classes)


@pytest.fixture(scope="session")
def tiny_ar_dir(tmp_path_factory):
    from nemo_bard.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny_ar") / "model", preset="test", seed=0)


@pytest.fixture(scope="session")
def tiny_bard_dir(tiny_ar_dir, tmp_path_factory):
    from nemo_bard.convert import convert

    return convert(tiny_ar_dir, tmp_path_factory.mktemp("tiny_bard") / "model", block_size=4)


@pytest.fixture(scope="session")
def tiny_processor(tiny_bard_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_bard_dir)


@pytest.fixture(scope="session")
def tiny_bard_model(tiny_bard_dir):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_bard_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def sharp_model(tiny_bard_model):
    """The tiny model with a 30x lm_head: peaked confidences, so thresholds commit several tokens per step."""
    import copy

    model = copy.deepcopy(tiny_bard_model)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def random_image(seed: int, h: int = 64, w: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8))


FRAME_CODE = 8  # frame i of a coded clip is uniform grey 8 * (i % 32): decoding recovers i % 32


def coded_frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    """``n`` uniform frames whose grey level encodes the frame index (see :func:`frame_codes`)."""
    return np.stack([np.full((h, w, 3), FRAME_CODE * (i % 32), np.uint8) for i in range(n)])


def frame_codes(frames) -> list[int]:
    """Source frame index (mod 32) of each decoded frame of a coded clip."""
    return [int(round(float(np.asarray(f).mean()) / FRAME_CODE)) % 32 for f in frames]


@pytest.fixture(scope="session")
def coded_clip(tmp_path_factory):
    """A 3-second, 10-fps mp4 (30 frames) written with PyAV; frame i is grey level 8 * i."""
    from nemo_bard.data.synthetic import write_video

    return write_video(tmp_path_factory.mktemp("clips") / "coded.mp4", coded_frames(30), fps=10)


# The long files first (seconds per file on the 2-core machine, `--durations=0`, one compute thread per worker):
# xdist hands whole files to its two workers in this order (pytest.ini: --no-loadscope-reorder, instead of xdist's
# most-tests-first), so no long file runs alone at the end. Other files follow in their collection order.
SLOW_FILES = ["test_e2e_swd.py",  # 70 (the first CLI run of a worker also starts its warm server: e2e_utils.py)
              "test_e2e_pbm.py",  # 82
              "test_e2e_data_faults.py",  # 75
              "test_demo.py",  # 41
              "test_integrations.py",  # 20
              "test_engine.py",  # 7
              "test_cli.py",  # 27
              "test_generation.py",  # 8
              "test_gpu_check.py"]  # 15


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: order within a file is kept
