"""Run NeMo AutoModel 0.7 recipes on a host without CUDA (tests, CI, the offline demo), in a scope.

NeMo AutoModel 0.7 assumes CUDA in a few places. While :func:`cpu_patches` is active, and only on a
host without CUDA, these are neutralised:

1. ``torch.cuda.reset_peak_memory_stats`` raises without a GPU (called at recipe setup and after
   every logged step) -> no-op.
2. ``torch.cuda.current_device`` raises (``auto_model.from_pretrained`` builds a
   ``torch.device("cuda", current_device())`` for the unused pipeline path) -> 0.
3. NeMo's ``apply_model_infrastructure`` moves the weights to that CUDA device -> forced to CPU.
4. The VLM recipe's ``initialize_distributed`` would use the configured NCCL backend and leave
   ``DistInfo.device=None`` -> gloo and ``device=cpu``.
5. ``torch.distributed.run.determine_local_world_size("gpu")`` (the interactive launcher's device
   count) raises ``Cuda is not available`` -> 1, so ``automodel cfg.yaml`` runs the recipe in-process;
   multi-process CPU runs use ``--nproc-per-node N`` (torchrun with gloo).

It also turns on flush-to-zero for denormal floats: early in training Adam's second moments of a
small model are denormal, which made the BARD training-benchmark step 3.6x slower on this project's
CPU (3.44 s vs 0.95 s).

Every patch is undone when the outermost scope exits (the scope is re-entrant). A patch target that
does not exist is an error naming it, never a silent no-op. On a host with CUDA the scope does
nothing. The ``automodel`` front door, :func:`nemo_bard.integrations.nemo.run_main` and the BARD
recipes' ``setup`` / training loop enter it; user code rarely needs to.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import sys
import threading
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed.run as torchrun

from nemo_bard.integrations import check_version

check_version("nemo_automodel")

logger = logging.getLogger(__name__)
_lock = threading.RLock()
_depth = 0


def cpu_only() -> bool:
    """True when no CUDA device can be used."""
    return not torch.cuda.is_available()


@contextmanager
def _swap(owner: Any, name: str, make: Callable[[Any], Any]) -> Iterator[None]:
    """Replace ``owner.name`` by ``make(original)`` for the duration of the block."""
    try:
        original = getattr(owner, name)
    except AttributeError:
        where = getattr(owner, "__name__", type(owner).__name__)
        raise RuntimeError(
            f"nemo_bard CPU patch target {where}.{name} does not exist; the installed NeMo AutoModel / torch "
            "differs from the version these patches were written for"
        ) from None
    setattr(owner, name, make(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def _gpu_count_as_one(original: Callable[[str], int]) -> Callable[[str], int]:
    @functools.wraps(original)
    def determine_local_world_size(nproc_per_node: str) -> int:
        return 1 if nproc_per_node == "gpu" else original(nproc_per_node)

    return determine_local_world_size


def _infrastructure_on_cpu(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def apply_model_infrastructure(*args: Any, **kwargs: Any) -> Any:
        kwargs["device"] = torch.device("cpu")
        return original(*args, **kwargs)

    return apply_model_infrastructure


def _distributed_on_cpu(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def initialize_distributed(backend: str = "gloo", timeout_minutes: int = 1) -> Any:
        info = original(backend="gloo", timeout_minutes=timeout_minutes)
        return dataclasses.replace(info, backend="gloo", device=torch.device("cpu"))

    return initialize_distributed


def _patch_targets() -> list[tuple[Any, str, Callable[[Any], Any]]]:
    auto_model = importlib.import_module("nemo_automodel._transformers.auto_model")
    vlm_finetune = importlib.import_module("nemo_automodel.recipes.vlm.finetune")
    return [
        (torch.cuda, "reset_peak_memory_stats", lambda _orig: lambda *a, **k: None),
        (torch.cuda, "current_device", lambda _orig: lambda: 0),
        (torchrun, "determine_local_world_size", _gpu_count_as_one),
        (auto_model, "apply_model_infrastructure", _infrastructure_on_cpu),
        (vlm_finetune, "initialize_distributed", _distributed_on_cpu),
    ]


@contextmanager
def cpu_patches() -> Iterator[bool]:
    """Scope in which NeMo AutoModel 0.7 runs on CPU with gloo; yields True when patches are active.

    A no-op (yielding False) when CUDA is available. Re-entrant: nested scopes share the outermost one.
    """
    global _depth
    if not cpu_only():
        yield False
        return
    with _lock:
        outermost = _depth == 0
        _depth += 1
    try:
        if not outermost:
            yield True
            return
        with ExitStack() as stack:
            for owner, name, make in _patch_targets():
                stack.enter_context(_swap(owner, name, make))
            torch.set_flush_denormal(True)
            stack.callback(torch.set_flush_denormal, False)
            logger.info("nemo_bard: no CUDA device; NeMo AutoModel runs on CPU with gloo")
            yield True
    finally:
        with _lock:
            _depth -= 1


def run_nemo_app(config: str, extra: list[str]) -> int:
    """Hand the YAML ``config`` (and NeMo-style ``extra`` arguments) to NeMo AutoModel's own ``automodel`` app in
    this process, inside :func:`cpu_patches`; returns its exit code."""
    # NeMo's app and the model classes load when a run starts, not when the CLI imports this module
    from nemo_automodel.cli import app

    import nemo_bard.models.modeling_bard_vl  # noqa: F401  registers bard_vl before NeMo reads a config.json

    argv = sys.argv
    sys.argv = ["automodel", str(config), *extra]
    try:
        with cpu_patches():
            result = app.main()
    finally:
        sys.argv = argv
    return int(result or 0)


__all__ = ["cpu_only", "cpu_patches", "run_nemo_app"]
