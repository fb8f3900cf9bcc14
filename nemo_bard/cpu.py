"""Run NeMo AutoModel 0.7 recipes on a CPU-only host (tests, CI, the offline demo).

NeMo AutoModel 0.7 assumes CUDA in a few places. :func:`apply_cpu_patches`
neutralises exactly those, and does nothing when CUDA is available:

1. ``torch.cuda.reset_peak_memory_stats`` raises without a GPU (called at recipe
   setup and after every logged step) -> no-op.
2. ``torch.cuda.current_device`` raises (``auto_model.from_pretrained`` builds a
   ``torch.device("cuda", current_device())`` for the unused pipeline path) -> 0.
3. ``apply_model_infrastructure`` moves weights to that CUDA device -> forced to CPU.
4. ``initialize_distributed`` would use NCCL and leave ``DistInfo.device=None``
   -> gloo backend and ``device=cpu``.
5. ``torch.distributed.run.determine_local_world_size("gpu")`` (the interactive
   launcher's device count) raises ``Cuda is not available`` -> 1, so
   ``automodel cfg.yaml`` runs the recipe in-process; multi-process CPU runs use
   ``--nproc-per-node N`` (torchrun with gloo).

It also turns on flush-to-zero for denormal floats: early in training Adam's second
moments of a small model are denormal, which made the BARD training-benchmark step 3.6x slower
on this CPU (3.44 s vs 0.95 s).

The BARD recipes, the ``automodel`` front door and the tests call it; user code
rarely needs to.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)
_applied = False


def cpu_only() -> bool:
    """True when no CUDA device can be used."""
    return not torch.cuda.is_available()


def apply_cpu_patches() -> bool:
    """Apply the CPU patches once. Returns True when patches are active (no CUDA), False otherwise."""
    global _applied
    if not cpu_only():
        return False
    if _applied:
        return True

    torch.set_flush_denormal(True)
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None
    torch.cuda.current_device = lambda: 0

    import torch.distributed.run as tdrun

    original_world_size = tdrun.determine_local_world_size

    @functools.wraps(original_world_size)
    def determine_local_world_size(nproc_per_node: str) -> int:
        if nproc_per_node == "gpu":
            return 1
        return original_world_size(nproc_per_node)

    tdrun.determine_local_world_size = determine_local_world_size

    import nemo_automodel._transformers.auto_model as auto_model

    original_infra = auto_model.apply_model_infrastructure

    @functools.wraps(original_infra)
    def apply_model_infrastructure(*args, **kwargs):
        kwargs["device"] = torch.device("cpu")
        return original_infra(*args, **kwargs)

    auto_model.apply_model_infrastructure = apply_model_infrastructure

    import nemo_automodel.components.distributed.init_utils as init_utils

    original_init = init_utils.initialize_distributed

    @functools.wraps(original_init)
    def initialize_distributed(backend="gloo", timeout_minutes=1):
        info = original_init(backend="gloo", timeout_minutes=timeout_minutes)
        return init_utils.DistInfo("gloo", info.rank, info.world_size, torch.device("cpu"), info.is_main)

    init_utils.initialize_distributed = initialize_distributed
    for mod_name in ("nemo_automodel.recipes.vlm.finetune", "nemo_automodel.recipes.vlm.kd"):
        import importlib

        mod = importlib.import_module(mod_name)
        if hasattr(mod, "initialize_distributed"):
            mod.initialize_distributed = initialize_distributed

    _applied = True
    logger.info("nemo_bard.cpu: no CUDA device; NeMo AutoModel runs on CPU with gloo")
    return True
