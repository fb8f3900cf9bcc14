"""Helpers for the end-to-end CLI tests: runs of the real `automodel` front door in their own processes.

Each run is a separate process (own pid, exit code, signals, locks; torchrun's workers are fresh interpreters),
but it is forked from a warm server process that imported nemo_bard's NeMo integration once per test worker
(``multiprocessing``'s forkserver with a preload): importing NeMo AutoModel costs ~17 s on the 2-core CI
machine, and the suite starts over a dozen runs. (Tests of the import itself start new interpreters:
:func:`run_python`, tests/test_faults.py.)
"""

from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
AUTOMODEL = str(Path(sys.executable).parent / "automodel")


def _cli_env() -> dict[str, str]:
    """This checkout first on the path (the tests' own modules, e.g. fault-injection callbacks, are importable)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


# What the warm server imports once (the heavy part of every run), NeMo AutoModel's Auto-model chain first: every
# forked run is then also a process where NeMo was imported before nemo_bard (the order that must not break
# registration; the pytest process itself has the other order, conftest imports nemo_bard first).
PRELOAD = ["nemo_automodel._transformers.auto_model", "nemo_bard.cli", "nemo_bard.integrations.nemo",
           "nemo_bard.recipes.pbm", "nemo_bard.recipes.swd"]
_context: multiprocessing.context.ForkServerContext | None = None


def _server() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _call_child(func, args: tuple, conn) -> None:
    try:
        conn.send(("ok", func(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the caller
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    conn.close()


def run_forked(func, *args, timeout: float = 300):
    """``func(*args)`` (a module-level function) in a process forked from the warm server; its return value."""
    ctx = _server()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_call_child, args=(func, args, send))
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout):
            raise AssertionError(f"run_forked: {func.__name__} gave no answer in {timeout} s")
        status, value = recv.recv()
    finally:
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
    assert status == "ok", value
    return value


def _cli_child(args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """Body of a forked run: the console script's ``sys.exit(main())`` with its output in files."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), fd)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(write_through=True)  # as PYTHONUNBUFFERED: nothing lost when the run is killed
    sys.argv = [AUTOMODEL, *args]
    code = 1
    try:
        from nemo_bard.cli import main

        code = main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        atexit._run_exitfuncs()  # what an interpreter does at exit (a forked child skips it)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class ForkedCLI:
    """``subprocess.Popen``-like handle of one ``automodel ARGS`` run forked from the warm server.

    ``stdout`` may be an open file (its path is appended to) and ``stderr`` ``subprocess.STDOUT``; else both are
    collected in temporary files (:meth:`communicate`).
    """

    def __init__(self, cmd: list[str], stdout=None, stderr=None, env: dict[str, str] | None = None,
                 cwd: Path | str | None = None) -> None:
        args = cmd[3:] if cmd[1:3] == ["-m", "nemo_bard.cli"] else cmd[1:]  # `python -m nemo_bard.cli` or a script
        self._tmp = tempfile.TemporaryDirectory(prefix="forked_cli_")
        self.out = stdout.name if stdout is not None else os.path.join(self._tmp.name, "out")
        self.err = self.out if stderr == subprocess.STDOUT else os.path.join(self._tmp.name, "err")
        full_env = {**_cli_env(), **(env or {})}
        self._proc = _server().Process(target=_cli_child, args=(args, str(cwd or os.getcwd()), full_env, self.out, self.err))
        self._proc.start()
        self.pid = self._proc.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not self._proc.is_alive():
            self._proc.join()
            self.returncode = self._proc.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(AUTOMODEL, timeout)
        return self.returncode

    def kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        read = lambda path: Path(path).read_text(errors="replace") if os.path.exists(path) else ""  # noqa: E731
        return read(self.out), "" if self.err == self.out else read(self.err)


def run_cli(args: list[str], cwd: Path = REPO, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """``automodel ARGS`` in its own process, forked from the warm server."""
    run = ForkedCLI([AUTOMODEL, *args], cwd=cwd)
    out, err = run.communicate(timeout)
    proc = subprocess.CompletedProcess([AUTOMODEL, *args], run.returncode, out, err)
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


def start_cli(args: list[str], log: Path) -> ForkedCLI:
    """``automodel ARGS`` started in its own process (forked from the warm server), output to ``log``."""
    with open(log, "w") as f:
        return ForkedCLI([AUTOMODEL, *args], stdout=f, stderr=subprocess.STDOUT, cwd=REPO)


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
    from nemo_bard.data.layout import BlockLayout
    from nemo_bard.schema import NoiseSettings

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    ds = BardChatDataset(str(data_path), max_samples=rows)
    batch = bard_collate_fn([ds[i] for i in range(len(ds))], processor)
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    layout = BlockLayout(block_size, model.config.mask_token_id, im_end,
                         noise=NoiseSettings(type="uniform_sample", min_rate=0.5, max_rate=0.5))
    b = layout.build(batch, list(range(len(ds))), model.rope_positions)
    logits = model(**b.inputs, logits_mask=b.loss_mask).logits
    return torch.nn.functional.cross_entropy(logits, b.targets[b.loss_mask]).item()


def cosine_lr(num_steps: int, decay_steps: int, multiplier: float) -> float:
    """NeMo's cosine schedule as conf/tuning/tiny_common.yaml sets it up (lr 2e-3, 1 warm-up step, min_lr 1e-4)."""
    from nemo_automodel.components.optim.scheduler import OptimizerParamScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    sched = OptimizerParamScheduler(opt, init_lr=2e-4, max_lr=2e-3, min_lr=1e-4, lr_warmup_steps=1,
                                    lr_decay_steps=decay_steps, lr_decay_style="cosine", start_wd=0.0, end_wd=0.0,
                                    wd_incr_steps=decay_steps, wd_incr_style="constant")
    sched.step(num_steps)
    return opt.param_groups[0]["lr"] * multiplier


def lr_offset_and_multiplier(log: dict[int, dict], steps: int) -> tuple[int, float]:
    """Which scheduler step a logged step's LR is (0 or 1) and the parameter group's lr multiplier, read from the
    logged LR of a ``steps``-step run."""
    return next((k, m) for k in (0, 1) for m in [log[1]["lr"] / cosine_lr(1 + k, steps, 1.0)]
                if all(log[s]["lr"] == pytest.approx(cosine_lr(s + k, steps, m)) for s in range(steps)))
