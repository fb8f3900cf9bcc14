"""Helpers for the end-to-end CLI tests (subprocess runs of the real `automodel` front door)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
AUTOMODEL = str(Path(sys.executable).parent / "automodel")


def _cli_env() -> dict[str, str]:
    """This checkout first on the path (the tests' own modules, e.g. fault-injection callbacks, are importable)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def run_cli(args: list[str], cwd: Path = REPO, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    env = _cli_env()
    proc = subprocess.run([AUTOMODEL, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"automodel {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_python(code: str, timeout: int = 300) -> str:
    """Run ``code`` in a fresh interpreter (this checkout first on the path); returns its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def start_cli(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([AUTOMODEL, *args], cwd=REPO, env=_cli_env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float = 300, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None and not predicate():
            raise AssertionError("process exited before the awaited condition")
        time.sleep(0.05)
    raise AssertionError("timed out")


def training_log(run_dir: Path) -> dict[int, dict]:
    """Step -> metrics from training.jsonl (the last record wins for repeated steps)."""
    out = {}
    for line in (run_dir / "training.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[int(rec["step"])] = rec
    return out


@torch.no_grad()
def fixed_masked_ce(model_dir: Path, data_path: Path, block_size: int = 4, rows: int = 16) -> float:
    """Unweighted CE at masked positions with fixed 50% noise: a low-variance measure of what training learned."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from nemo_bard.data.collate import bard_collate_fn
    from nemo_bard.data.datasets import BardChatDataset
    from nemo_bard.data.layout import MODEL_INPUT_KEYS, BlockLayout
    from nemo_bard.data.noise import NoiseConfig

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    ds = BardChatDataset(str(data_path), max_samples=rows)
    batch = bard_collate_fn([ds[i] for i in range(len(ds))], processor)
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    layout = BlockLayout(block_size, model.config.mask_token_id, im_end,
                         noise=NoiseConfig("uniform_sample", 0.5, 0.5))
    b = layout.build(batch, list(range(len(ds))), model.rope_positions)
    logits = model(**{k: b[k] for k in MODEL_INPUT_KEYS if k in b}, logits_mask=b["loss_mask"]).logits
    return torch.nn.functional.cross_entropy(logits, b["targets"][b["loss_mask"]]).item()
