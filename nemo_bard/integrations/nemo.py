"""NeMo AutoModel 0.7.0: the one module (with :mod:`nemo_bard.integrations.cpu`) that touches its internals.

What BARD needs from NeMo AutoModel, in one place:

* :class:`NeMoBardVLForConditionalGeneration`: the training flavour of ``bard_vl`` (NeMo's checkpointing
  mixin, sharding plan and capability declaration on top of the transformers-only model), registered
  in NeMo's model registry under the bard_vl architecture names.
* :class:`BardNeMoRecipe`: NeMo's ``FinetuneRecipeForVLM`` with BARD plugged into its training step the
  way NeMo's own dLLM recipe plugs in: NeMo keeps the optimizer step (TP-replica gradient sync,
  clipping, MoE/FP8 hooks, LR schedule), logging and the per-step peak-memory reset; BARD supplies the
  batch layout and the forward + loss of each micro-batch, through public hooks a subclass implements.
* :class:`BardRecipeConfig`: NeMo's typed recipe config whose training dataloader (NeMo's VLM builder,
  with the dataset built in pre-flight and NeMo's length-grouped sampler) and loss are BARD's.
* :func:`build_frozen_model` (the SWD teacher), :func:`noise_seed`, :func:`run_main`.
* Activation checkpointing and LoRA are NeMo's (``distributed.activation_checkpointing``, ``peft:``):
  :func:`check_peft_and_checkpointing` refuses what NeMo cannot do for BARD before any model loads,
  :func:`checkpointed_modules` reports what NeMo wrapped, :func:`apply_activation_checkpointing` applies
  NeMo's single-device checkpointing to a plain model (benchmarks), and :func:`merge_lora_state_dict`
  folds NeMo's LoRA adapters into a gathered state dict (merged stage exports).

Faults (``BardNeMoRecipe``): the run directory is locked for the life of the run
(:class:`nemo_bard.rundir.RunLock`); an optimizer step with a non-finite loss or gradient is skipped and
counted, too many in a row end the run (:class:`~nemo_bard.integrations.guards.NonFiniteGuard`), and so do
too many empty steps (every row skipped or dropped); a stage that never trained, or ends with skipped non-finite
steps, stops the run at its last step, before that step's checkpoint and the stage export (the guard's counters
are saved beside each checkpoint, so a resumed run judges the same way); no checkpoint is written from
non-finite weights; a full disk during a save is reported as such; SIGTERM /
SIGINT finish the step, save a checkpoint and stop with :class:`nemo_bard.errors.RunStopped`
(:class:`~nemo_bard.integrations.guards.StopSignals`); ``training.jsonl`` is flushed at every step.
"""

from __future__ import annotations

import atexit
import dataclasses
import glob
import json
import logging
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from nemo_automodel.components._peft.lora import LinearLoRA, PeftConfig
from nemo_automodel.components._peft.module_matcher import ModuleMatcher
from nemo_automodel.components.distributed.config import FSDP2Config
from nemo_automodel.components.distributed.model_parallelizer import _parallelize_unsharded_fsdp2
from nemo_automodel.recipes.dllm.train_ft import corruption_sample_seed
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torchdata.stateful_dataloader import StatefulDataLoader

from nemo_bard.integrations import check_version

check_version("nemo_automodel")

from nemo_automodel import register_architecture  # noqa: E402
from nemo_automodel.components.config._arg_parser import parse_args_and_load_config  # noqa: E402
from nemo_automodel.components.config.loader import ConfigNode  # noqa: E402
from nemo_automodel.components.datasets.llm.length_grouped_sampler import LengthGroupedSampler  # noqa: E402
from nemo_automodel.components.datasets.vlm.collate_fns import default_collate_fn  # noqa: E402
from nemo_automodel.components.datasets.vlm.loader import VlmDataloaderBuild, VlmDataloaderConfig  # noqa: E402
from nemo_automodel.components.distributed.utils import get_sync_ctx  # noqa: E402
from nemo_automodel.components.loggers.metric_logger import MetricsSample  # noqa: E402
from nemo_automodel.components.loss.masked_ce import MaskedCrossEntropy  # noqa: E402
from nemo_automodel.components.models.qwen3_vl.model import (  # noqa: E402
    Qwen3VLForConditionalGeneration as NeMoQwen3VLForConditionalGeneration,
)
from nemo_automodel.components.training.utils import ScopedModuleOffloading  # noqa: E402
from nemo_automodel.recipes._typed_config import RecipeConfig  # noqa: E402
from nemo_automodel.recipes.vlm.finetune import FinetuneRecipeForVLM, build_model  # noqa: E402

from nemo_bard.callbacks.base import CallbackList  # noqa: E402
from nemo_bard.data.collate import decode_videos  # noqa: E402
from nemo_bard.data.layout import BlockBatch  # noqa: E402
from nemo_bard.data.media import VideoSampling  # noqa: E402
from nemo_bard.errors import BardConfigError, DiskFullError, RunStopped, TrainingDiverged, run_reported  # noqa: E402
from nemo_bard.integrations.cpu import cpu_patches  # noqa: E402
from nemo_bard.integrations.guards import EmptyTraining, NonFiniteGuard, StopSignals, all_finite  # noqa: E402
from nemo_bard.models.constants import ARCHITECTURE_ALIASES  # noqa: E402
from nemo_bard.models.modeling_bard_vl import BardVLForConditionalGeneration  # noqa: E402
from nemo_bard.rundir import RunLock, disk_full_message  # noqa: E402

logger = logging.getLogger(__name__)

PROGRESS_FILE = "bard_progress.json"  # the training guard's counters, saved with each checkpoint


# ---------------------------------------------------------------------------------------------- model
class NeMoBardVLForConditionalGeneration(BardVLForConditionalGeneration, NeMoQwen3VLForConditionalGeneration):
    """``bard_vl`` for NeMo AutoModel training: the BARD forward plus what NeMo's Qwen3-VL class adds
    (``HFCheckpointingMixin`` for sharded HF-format checkpoints, tied-embedding handling, the sharding
    plan). Same weights and forward as :class:`BardVLForConditionalGeneration`; the block masks rule out
    context, tensor and pipeline parallelism, which the capabilities below declare."""

    @dataclass(frozen=True)
    class ModelCapabilities:
        """Parallelism BARD supports: FSDP2 data parallelism only."""

        supports_tp: bool = False
        supports_cp: bool = False
        supports_pp: bool = False
        supports_ep: bool = False
        supports_thd: bool = False
        supports_cp_vision_frame_sharding: bool = False


for _name in ARCHITECTURE_ALIASES:
    register_architecture(_name, NeMoBardVLForConditionalGeneration, exist_ok=True)


# -------------------------------------------------------------------------------------- data and loss
@dataclass(frozen=True, eq=False)
class Prebuilt:
    """A component config whose ``build()`` returns an object BARD built before NeMo's setup."""

    value: Any

    def build(self, *args: Any, **kwargs: Any) -> Any:
        return self.value


class ColumnLengthGroupedSampler(LengthGroupedSampler):
    """NeMo's (LLM) length-grouped sampler reading the lengths from the dataset's ``lengths`` (its ``length``
    column) instead of every sample's ``input_ids``: BARD rows are conversations, tokenized by the collate.

    It sorts by length, shards the order across data-parallel ranks (the ranks' k-th batches have similar
    lengths), shuffles batch-sized chunks per epoch and is stateful for resume. NeMo's VLM
    ``LengthGroupedSampler`` does not fit: it estimates lengths by loading every sample (images included),
    expects a dataset already sharded per rank and moves a tensor to CUDA when filtering long samples.
    """

    @staticmethod
    def _compute_lengths(dataset: Any) -> list[int]:
        return [int(n) for n in dataset.lengths]


@dataclass
class BardVlmDataloaderConfig(VlmDataloaderConfig):
    """NeMo's VLM input pipeline (processor, dataset, collate, loader options as configured); with
    ``length_grouped_seed`` set and a dataset that knows its ``lengths``, batches come from
    :class:`ColumnLengthGroupedSampler` instead of NeMo's ``DistributedSampler``. NeMo 0.7's VLM builder
    has no sampler option, so the built dataset and collate are re-wrapped with the same loader options."""

    length_grouped_seed: int | None = None

    def build(self, **kwargs: Any) -> VlmDataloaderBuild:
        result = super().build(**kwargs)
        dataset = result.dataloader.dataset
        if self.length_grouped_seed is None or getattr(dataset, "lengths", None) is None:
            return result
        sampler = ColumnLengthGroupedSampler(
            dataset, batch_size=kwargs["batch_size"], seed=self.length_grouped_seed,
            num_replicas=kwargs["dp_world_size"], rank=kwargs["dp_rank"],
        )
        logger.info("length-grouped batches from the dataset's 'length' column (%d samples on this rank)", len(sampler))
        loader = StatefulDataLoader(
            dataset, sampler=sampler, batch_size=kwargs["batch_size"], collate_fn=result.dataloader.collate_fn,
            num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.persistent_workers,
            prefetch_factor=self.prefetch_factor, drop_last=self.drop_last,
        )
        return VlmDataloaderBuild(dataloader=loader, processor=result.processor)


class BardRecipeConfig(RecipeConfig):
    """NeMo's typed recipe config, except that the training dataloader and the loss are the ones BARD
    prepared before NeMo's setup (:meth:`prepare_training_data`, :meth:`use_loss`)."""

    def __init__(self, raw: Any) -> None:
        super().__init__(raw)
        self.training_data: BardVlmDataloaderConfig | None = None
        self.training_loss: torch.nn.Module | None = None

    def prepare_training_data(self, *, length_grouped: bool, seed: int) -> BardVlmDataloaderConfig | None:
        """Resolve ``dataset:`` / ``dataloader:`` with NeMo's resolver and build the dataset now, so a missing
        or empty dataset fails before the model loads. None when there is no ``dataset:`` section."""
        node = self.get("dataset", None)
        if node is None:
            return None
        base = self.resolve_vlm_dataloader(
            node, self.get("dataloader", None), processor_node=self.get("processor", None),
            packed_sequence_node=self.get("packed_sequence", None),
        )
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        fields["dataset_config"] = Prebuilt(base.dataset_config.build())
        self.training_data = BardVlmDataloaderConfig(**fields, length_grouped_seed=seed if length_grouped else None)
        return self.training_data

    def use_loss(self, loss: torch.nn.Module) -> None:
        """The loss module NeMo's setup installs as the recipe's ``loss_fn``."""
        self.training_loss = loss

    @property
    def vlm_dataloader(self) -> BardVlmDataloaderConfig | None:
        return self.training_data

    @property
    def loss_fn(self) -> Prebuilt | None:
        return None if self.training_loss is None else Prebuilt(self.training_loss)


def training_dataset(cfg: BardRecipeConfig) -> Any:
    """The dataset :meth:`BardRecipeConfig.prepare_training_data` built."""
    return cfg.training_data.dataset_config.value


# -------------------------------------------------------------------------------------------- recipe
class BardNeMoRecipe(FinetuneRecipeForVLM):
    """NeMo's VLM fine-tuning recipe with BARD's batches, forward + loss, validation and callbacks.

    How NeMo's loop maps onto the hooks a subclass implements:

    ==========================================  ===================================================
    NeMo                                        BARD
    ==========================================  ===================================================
    ``setup``                                   :meth:`preflight`, NeMo's setup, :meth:`finish_setup`
    ``run_train_validation_loop`` start / end   ``callbacks.on_train_start`` / ``on_train_end``
    ``_run_train_optim_step`` start             ``callbacks.on_step_start``, :meth:`prepare_step`
    ``_forward_backward_step`` per micro-batch  :meth:`forward_loss`
    ``_run_train_optim_step`` end               :meth:`step_metrics`, ``callbacks.on_step_end``
    ``save_checkpoint``                         ``callbacks.on_save``
    ``_run_validation_epoch`` per batch         :meth:`validation_loss`
    ``log_train_metrics``                       NeMo's loggers, plus a line of :meth:`log_keys`
    ==========================================  ===================================================

    Everything else in the optimizer step is NeMo's. ``setup`` and the training loop run inside
    :func:`~nemo_bard.integrations.cpu.cpu_patches` (a no-op with CUDA). A micro-batch's loss must
    already be normalised by the step's global denominator (:meth:`prepare_step`), so NeMo's sum over
    micro-batches and data-parallel ranks is the step loss.
    """

    callbacks: CallbackList = CallbackList()

    def __init__(self, cfg: Any) -> None:
        raw = cfg._raw if isinstance(cfg, RecipeConfig) else cfg
        super().__init__(BardRecipeConfig(raw))

    @classmethod
    def standalone(cls, model: torch.nn.Module, device: torch.device | str = "cpu", local_batch_size: int = 1,
                   optimizer: torch.optim.Optimizer | None = None) -> "BardNeMoRecipe":
        """This recipe around an already built ``model`` on one process, without NeMo's setup: just the state NeMo's
        optimizer step reads (NeMo's own unit tests build recipes this way). For benchmarks and tests."""
        recipe = cls.__new__(cls)
        recipe.cfg = BardRecipeConfig(ConfigNode({"step_scheduler": {"local_batch_size": local_batch_size}}))
        recipe.model_parts = [model]
        recipe.optimizer = [optimizer or torch.optim.SGD(model.parameters(), lr=0.0)]
        recipe.lr_scheduler = None
        recipe.device_mesh = recipe.moe_mesh = recipe.distributed_config = recipe.pp = None
        recipe.pp_enabled = False
        recipe.checkpointer = SimpleNamespace(maybe_wait_for_staging=lambda: None)
        recipe.step_scheduler = SimpleNamespace(step=0, epoch=0, is_remote_logging_step=False)
        recipe.dist_env = SimpleNamespace(device=torch.device(device), is_main=True, rank=0, world_size=1)
        recipe.timestamp = time.perf_counter()
        return recipe

    # ------------------------------------------------------------- hooks for subclasses
    def preflight(self) -> None:
        """Checks that must fail before NeMo's setup loads anything (config, data, files)."""

    def finish_setup(self) -> None:
        """Setup after NeMo's (model, optimizer, dataloader and checkpoint restore are in place)."""

    def prepare_step(self, batches: list[dict[str, Any]], step: int) -> tuple[list[BlockBatch], float]:
        """Lay out the step's collated micro-batches; returns them and the loss denominator."""
        raise NotImplementedError

    def forward_loss(
        self, model: torch.nn.Module, batch: BlockBatch, denominator: float, is_train: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward one micro-batch; returns (loss to backpropagate, detached summable statistics)."""
        raise NotImplementedError

    def step_metrics(
        self, built: list[BlockBatch], batches: list[dict[str, Any]], sums: dict[str, float]
    ) -> dict[str, float]:
        """Metrics logged with NeMo's (``sums``: the statistics summed over micro-batches and ranks)."""
        return {}

    def validation_loss(self, batch: dict[str, Any], index: int) -> tuple[torch.Tensor, float]:
        """(token-weighted loss sum, token count) of one validation batch."""
        raise NotImplementedError

    def log_keys(self) -> tuple[str, ...]:
        """Metrics printed after NeMo's step line."""
        return ()

    def max_nonfinite_steps(self) -> int:
        """Skipped (non-finite) optimizer steps in a row that end the run."""
        return 5

    def max_empty_steps(self) -> int:
        """Empty optimizer steps in a row (every row skipped or dropped) that end the run."""
        return 10

    def finish_training(self) -> None:
        """After the last step of a run that was not stopped early (final exports)."""

    def stage_of(self, step: int) -> tuple[int, int, str]:
        """``(first step, end step, name)`` of the stage that trains ``step`` (one stage: the whole run)."""
        end = getattr(self.step_scheduler, "max_steps", None)
        return 0, (step + 2 if end is None else int(end)), "the trained model"

    # ------------------------------------------------------------ data-parallel helpers
    def dp_rank(self) -> int:
        return int(self._get_dp_rank())

    def dp_size(self) -> int:
        return int(self._get_dp_group_size())

    def dp_allreduce(self, tensor: torch.Tensor, op: Any = torch.distributed.ReduceOp.SUM) -> torch.Tensor:
        """All-reduce over the data-parallel group (a no-op without one); returns a CPU tensor."""
        return self._dp_allreduce(tensor, op=op)

    # ------------------------------------------------------------------ NeMo overrides
    def setup(self) -> None:
        self._lock_run_dir()
        with cpu_patches():
            self.preflight()
            super().setup()
            self._install_stop_signals()
            self.finish_setup()
            self._restore_progress()

    def run_train_validation_loop(self) -> None:
        with cpu_patches():
            self.callbacks.on_train_start(self)
            super().run_train_validation_loop()
            guard = getattr(self, "_bard_guard", None)
            if guard is not None and guard.total and self.dist_env.is_main:
                logger.warning("%d optimizer step(s) of this run were skipped for a non-finite loss or gradients; if "
                               "the result is poor, lower optimizer.lr", guard.total)
            self._raise_if_stopped()
            self.callbacks.on_train_end(self)
            self.finish_training()

    def save_checkpoint(self, epoch: int, step: int, train_loss: float, val_loss: Any = None,
                        best_metric_key: str = "default") -> None:
        path = f"{self.checkpointer.config.checkpoint_dir}/epoch_{epoch}_step_{step}"
        if self.checkpointer.config.enabled:
            self.check_finite_weights(f"checkpoint {path}")
        try:
            super().save_checkpoint(epoch, step, train_loss, val_loss, best_metric_key=best_metric_key)
        except BaseException as exc:  # noqa: BLE001  torch's CheckpointException derives from BaseException
            full = None if isinstance(exc, (KeyboardInterrupt, SystemExit)) else disk_full_message(exc, path)
            if full is None:
                raise
            raise DiskFullError(
                f"{full}: the checkpoint of step {step} was not completed and is not published (LATEST still names "
                "the previous one); free space or point checkpoint.checkpoint_dir elsewhere, then resume with the "
                "same command"
            ) from exc
        self._flush_metric_logs()
        if self.checkpointer.config.enabled:
            self._save_progress(path)
            self._bard_last_checkpoint = path
            self.callbacks.on_save(self, path)

    def _load_checkpoint_tracked_state(self, ckpt_dir: str) -> Any:
        # NeMo resolves restore_from / LATEST / the newest checkpoint itself; remember which one it restores, and
        # the LR schedule the current config built (the restore replaces it with the checkpoint's horizon).
        self._bard_configured_lr = [(s.lr_warmup_steps, s.lr_decay_steps, s.wd_incr_steps)
                                    for s in (self.lr_scheduler or [])]
        self._bard_restored = str(ckpt_dir)
        return super()._load_checkpoint_tracked_state(ckpt_dir)

    @property
    def restored_checkpoint(self) -> str | None:
        """The checkpoint directory this run resumed from (None for a fresh start)."""
        return getattr(self, "_bard_restored", None)

    def rederive_lr_schedule(self) -> tuple[int, int] | None:
        """Put the restored LR scheduler back on the horizon the current config gives (warm-up, decay and weight-decay
        steps as NeMo builds them from ``lr_scheduler`` and ``step_scheduler.max_steps``), at the restored step.

        Returns (old decay steps, new decay steps), or None when nothing was restored or nothing changed.
        """
        configured = getattr(self, "_bard_configured_lr", None)
        if not self.lr_scheduler or not configured:
            return None
        old = int(self.lr_scheduler[0].lr_decay_steps)
        if all((s.lr_warmup_steps, s.lr_decay_steps, s.wd_incr_steps) == c for s, c in zip(self.lr_scheduler,
                                                                                             configured)):
            return None
        for sched, (warmup, decay, wd_incr) in zip(self.lr_scheduler, configured):
            steps = sched.num_steps
            sched.lr_warmup_steps, sched.lr_decay_steps, sched.wd_incr_steps = warmup, decay, wd_incr
            sched.num_steps = 0
            sched.step(increment=steps)  # writes the re-derived LR into the optimizer
        return old, int(self.lr_scheduler[0].lr_decay_steps)

    def _run_train_optim_step(self, batches: list[dict[str, Any]], max_grad_norm: float | None = None) -> MetricsSample:
        step = self.step_scheduler.step
        self.callbacks.on_step_start(self, step)
        built, self._bard_denominator = self.prepare_step(batches, step)
        self._bard_built = built
        self._bard_stats: list[dict[str, torch.Tensor]] = []
        guard = self._nonfinite_guard()
        guard.begin_step(empty=self._bard_denominator == 0)
        # NeMo's step reads only each micro-batch's labels (its tps and num_label_tokens): the loss targets. The
        # forward (_forward_backward_step) takes the laid-out BlockBatch of the same index.
        sample = super()._run_train_optim_step([{"labels": b.targets} for b in built], max_grad_norm)
        sample.metrics.update(self.step_metrics(built, batches, self._reduce_stats(self._bard_stats)))
        lost = [0, 0]
        if self._bard_denominator == 0:  # an empty step (on every rank): count its lost rows on all ranks
            local = torch.tensor([sum(int(b.get("num_skipped", 0)) for b in batches),
                                  sum(b.num_dropped for b in built)], dtype=torch.long)
            lost = [int(x) for x in self.dp_allreduce(local)]
        try:
            sample.metrics.update(guard.end_step(step, sample.metrics.get("block_size", "-"),
                                                 self.cfg.get("optimizer.lr", None), *lost))
            start, end, name = self.stage_of(step)
            if step == end - 1:  # a stage that never trained, or ends diverging, is neither exported nor checkpointed
                self.check_trained_since(start, f"the export of {name} and the checkpoint of step {step} were not "
                                         "written", next_step=step + 1)
        except (TrainingDiverged, EmptyTraining) as exc:
            self._bard_diverged = exc  # raised once NeMo has logged this step (log_train_metrics), before a checkpoint
        self.callbacks.on_step_end(self, step, sample.metrics)
        repoll_stop_signal(self.step_scheduler)
        return sample

    # ------------------------------------------------------------------ faults
    def _nonfinite_guard(self) -> NonFiniteGuard:
        guard = getattr(self, "_bard_guard", None)
        if guard is None:
            max_op = torch.distributed.ReduceOp.MAX
            guard = self._bard_guard = NonFiniteGuard(
                params=lambda: (p for part in self.model_parts for p in part.parameters()),
                any_rank=lambda flag: bool(self.dp_allreduce(flag.to(torch.int32).reshape(1), op=max_op)[0]),
                max_consecutive=self.max_nonfinite_steps(), max_empty=self.max_empty_steps(),
            )
        guard.attach(self.optimizer)
        return guard

    def _save_progress(self, path: str) -> None:
        """Write the guard's counters next to checkpoint ``path`` (global rank 0), so a resumed run still knows whether
        the stage it continues has trained."""
        guard = getattr(self, "_bard_guard", None)
        if guard is None or int(os.environ.get("RANK", "0") or 0) != 0 or not os.path.isdir(path):
            return
        with open(os.path.join(path, PROGRESS_FILE), "w") as f:
            json.dump(guard.progress(), f)

    def _restore_progress(self) -> None:
        """Load the counters saved with the checkpoint this run resumed from (none: a fresh run, or an older one)."""
        step = int(getattr(self.step_scheduler, "step", 0) or 0)
        root = self.cfg.get("checkpoint.checkpoint_dir", None)
        if step == 0 or root is None:
            return
        saved = sorted(glob.glob(os.path.join(str(root), f"epoch_*_step_{step - 1}", PROGRESS_FILE)))
        if saved:
            with open(saved[-1]) as f:
                self._nonfinite_guard().restore(json.load(f))

    def check_trained_since(self, start: int, outcome: str, next_step: int | None = None) -> None:
        """Refuse to write the model trained from step ``start`` on when it did not train (``outcome``: what is then
        not written, e.g. ``"the export X was not written"``).

        :class:`EmptyTraining` (exit 2) when this process ran every step from ``start`` up to ``next_step`` (default:
        the scheduler's next step) and none updated the weights (every row skipped or dropped);
        :class:`TrainingDiverged` (exit 3) when the last steps were non-finite (skipped): the weights are those of a
        run on its way to diverging. A process resumed after ``start`` checks only the non-finite streak.
        """
        guard = getattr(self, "_bard_guard", None)
        if guard is None or guard.first_step is None:
            return
        next_step = self.step_scheduler.step if next_step is None else next_step
        if guard.consecutive:
            raise TrainingDiverged(
                f"training diverged: the last {guard.consecutive} optimizer step(s) before step {next_step} had a "
                f"non-finite loss or gradients and were skipped; {outcome}. Lower optimizer.lr (keep "
                "clip_grad_norm.max_norm set) or check the data, then resume from the last checkpoint with the same "
                "command"
            )
        if guard.first_step <= start and (guard.last_trained_step is None or guard.last_trained_step < start):
            raise EmptyTraining(
                f"no training data reached the model: every optimizer step from step {start} to {next_step - 1} had "
                f"every row skipped or dropped ({guard.empty_skipped} skipped for unreadable media with "
                f"skip_bad_samples, {guard.empty_dropped} dropped as longer than bard.max_length); {outcome}. Fix the "
                "image/video paths (relative paths resolve against dataset.root_dir) or raise bard.max_length"
            )

    def check_finite_weights(self, what: str) -> None:
        """Raise :class:`TrainingDiverged` (on every rank) if any trained weight is NaN/inf, before writing ``what``."""
        ok = all_finite(p.detach() for part in self.model_parts for p in part.parameters())
        if self.dp_allreduce((~ok).to(torch.int32).reshape(1), op=torch.distributed.ReduceOp.MAX)[0]:
            raise TrainingDiverged(
                f"the model weights hold NaN/inf at step {self.step_scheduler.step}; {what} was not written. Lower "
                "optimizer.lr (or check the data) and resume from the last checkpoint with the same command"
            )

    def _lock_run_dir(self) -> None:
        """Hold the run directory for the life of the process (global rank 0; a launcher may hold it already)."""
        run_dir = self.cfg.get("checkpoint.checkpoint_dir", None)
        if run_dir is None or int(os.environ.get("RANK", "0") or 0) != 0:
            return
        lock = RunLock(str(run_dir)).acquire()
        atexit.register(lock.release)

    def _install_stop_signals(self) -> None:
        """Swap NeMo's SIGTERM-only preemption handler for :class:`StopSignals` (SIGTERM and SIGINT too)."""
        sched = getattr(self, "step_scheduler", None)
        old = getattr(sched, "sig_handler", None)
        if old is None or isinstance(old, StopSignals):
            return  # preemption_signal: null turns signal handling off
        sigs = list(dict.fromkeys([*old.sigs, signal.SIGTERM, signal.SIGINT]))
        pending = bool(getattr(old, "_signal_received", False))  # a SIGTERM during NeMo's setup
        old.release()
        sched.sig_handler = StopSignals(sig=sigs, group=old.group).__enter__()
        if pending:
            sched.sig_handler.received, sched.sig_handler._signal_received = old.sigs[0], True

    def _raise_if_stopped(self) -> None:
        """After NeMo's loop: a stop by signal before ``max_steps`` becomes :class:`RunStopped` (checkpoint saved)."""
        sched = self.step_scheduler
        if not getattr(sched, "sigterm_flag", False) or sched.step >= sched.max_steps:
            return
        signum = getattr(sched.sig_handler, "received", None) or signal.SIGTERM
        last = getattr(self, "_bard_last_checkpoint", None)
        saved = f"checkpoint {last} saved" if last else "checkpointing is disabled, nothing was saved"
        raise RunStopped(f"stopped by signal {signal.Signals(signum).name} after step {sched.step - 1} ({saved}); "
                         "resume with the same command", signum)

    def _flush_metric_logs(self) -> None:
        """Write NeMo's buffered metric records (it keeps up to 100 in memory) to training/validation.jsonl."""
        if getattr(self, "dist_env", None) is not None and self.dist_env.is_main:
            for name in ("metric_logger_train", "metric_logger_valid"):
                metric_logger = getattr(self, name, None)
                if metric_logger is not None:
                    metric_logger.flush()

    def _forward_backward_step(self, idx: int, batch: dict[str, Any], *, loss_buffer: list, num_label_tokens: int,
                               num_batches: int, is_train: bool = True) -> None:
        model = self.model_parts[0]
        sync = get_sync_ctx(model, idx == num_batches - 1,
                            defer_fsdp_grad_sync=getattr(self.distributed_config, "defer_fsdp_grad_sync", True))
        with sync if is_train else nullcontext():
            loss, stats = self.forward_loss(model, self._bard_built[idx], self._bard_denominator, is_train)
            loss_buffer.append(loss.detach().clone())
            if is_train:
                self._bard_guard.add_loss(loss)
                (loss * self._get_dp_group_size(include_cp=True)).backward()
        self._bard_stats.append({k: v.detach().double() for k, v in stats.items()})

    def _reduce_stats(self, per_batch: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        if not per_batch or not per_batch[0]:
            return {}
        keys = list(per_batch[0])
        local = torch.stack([sum(s[k] for s in per_batch).cpu() for k in keys])  # one device sync per step
        return dict(zip(keys, self.dp_allreduce(local).tolist()))

    @torch.no_grad()
    def _run_validation_epoch(self, val_dataloader: Any) -> MetricsSample:
        for part in self.model_parts:
            part.eval()
        total, count = torch.zeros((), dtype=torch.float64), 0.0
        for i, batch in enumerate(val_dataloader):
            loss_sum, tokens = self.validation_loss(batch, i)
            total += loss_sum.double().cpu()
            count += tokens
        total = self.dp_allreduce(total)
        count = float(self.dp_allreduce(torch.tensor(count, dtype=torch.float64)))
        return MetricsSample(
            step=self.step_scheduler.step, epoch=self.step_scheduler.epoch,
            metrics={"val_loss": float(total) / max(count, 1.0), "lr": self.optimizer[0].param_groups[0]["lr"],
                     "num_label_tokens": int(count), "mem": torch.cuda.max_memory_allocated() / 1024**3},
        )

    def log_train_metrics(self, log_data: MetricsSample) -> None:
        super().log_train_metrics(log_data)  # W&B / MLflow / training.jsonl, NeMo's line, peak-memory reset
        if self.dist_env.is_main:
            m = log_data.metrics
            extras = " | ".join(f"{k} {m[k]:.4f}" for k in self.log_keys() if k in m)
            logging.info("step %d | block %s | %s", log_data.step, m.get("block_size", "-"), extras)
        self._flush_metric_logs()  # a killed run keeps every logged step
        diverged, self._bard_diverged = getattr(self, "_bard_diverged", None), None
        if diverged is not None:
            raise diverged

    def log_val_metrics(self, log_data: MetricsSample) -> None:
        super().log_val_metrics(log_data)
        self._flush_metric_logs()


# ------------------------------------------------------------------------------------------- helpers
def repoll_stop_signal(sched: Any) -> None:
    """Let NeMo's check after this step see a stop signal that arrived during it.

    NeMo's ``StepScheduler`` asks its signal handler at most once per step, and its epoch loop asks before the
    first step of an epoch: a SIGTERM arriving during that step would be seen only after the next one (one step
    late; at a run's last step, not at all). Forgetting that earlier answer makes the checkpoint check after the
    step ask again. Every rank calls this at the same point, so the (collective) question stays in step.
    """
    if getattr(sched, "_sig_polled_step", None) == getattr(sched, "step", None):
        sched._sig_polled_step = None


def build_frozen_model(cfg_model: Any, *, seed: int, distributed_setup: Any, device: Any) -> torch.nn.Module:
    """Build a model from its config node with NeMo's VLM builder and the student's distributed setup,
    frozen in eval mode (what NeMo's VLM KD recipe does for its teacher)."""
    model = build_model(cfg_model, cfg_freeze=None, cfg_peft=None, seed=seed, distributed_setup=distributed_setup)
    if device is not None:
        model = model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def noise_seed(base: int, step: int, dp_rank: int, dp_size: int, lbs: int, grad_acc: int, mb: int, i: int) -> int:
    """Topology-independent per-sample noise seed (NeMo's dLLM corruption seed, shifted by the BARD seed)."""
    return corruption_sample_seed(base, step, dp_rank, dp_size, lbs, grad_acc, mb, i)


# ------------------------------------------------------------ activation checkpointing and LoRA
LORA_TARGET = "nemo_automodel.components._peft.lora.PeftConfig"


def check_peft_and_checkpointing(peft: dict | None, distributed: dict | None, quantization: Any = None,
                                 cuda: bool = False) -> None:
    """Refuse, before any model loads, the ``peft:`` / ``distributed.activation_checkpointing`` combinations
    NeMo AutoModel 0.7 cannot do for BARD; each error is one line naming the key.

    ``peft``: NeMo's LoRA (``PeftConfig``) with keys it knows, target/exclude/match-all rules its module
    matcher accepts, no DoRA (NeMo cannot fold DoRA into base weights, and every BARD stage export is a
    merged ``bard_vl`` model), no quantized base (same reason), Triton kernels only with CUDA. Activation
    checkpointing: not with ``megatron_fsdp`` on several ranks (NeMo 0.7 skips it there with a log line).
    """
    distributed = distributed or {}
    ac = distributed.get("activation_checkpointing", False)
    if ac and distributed.get("strategy", "fsdp2") == "megatron_fsdp":
        raise BardConfigError(
            f"distributed.activation_checkpointing={ac}: NeMo AutoModel 0.7's Megatron-FSDP backend does not "
            "checkpoint activations on several ranks (it skips them); use distributed=fsdp2 or turn it off"
        )
    if peft is None:
        return

    if not isinstance(peft, dict):
        raise BardConfigError(f"peft must be a mapping (e.g. peft=lora), got {peft!r}")
    target = peft.get("_target_")  # a dotted path, or already the class (NeMo's config loader resolves it)
    if target not in (PeftConfig, PeftConfig.from_dict, LORA_TARGET, f"{LORA_TARGET}.from_dict"):
        name = target if isinstance(target, str) or target is None else f"{target.__module__}.{target.__qualname__}"
        raise BardConfigError(f"peft._target_={name}: BARD supports NeMo AutoModel's LoRA ({LORA_TARGET}; "
                              "see conf/peft/lora.yaml)")
    fields = [f.name for f in dataclasses.fields(PeftConfig)]
    unknown = [k for k in peft if k != "_target_" and k not in fields]
    if unknown:
        raise BardConfigError(f"unknown key peft.{unknown[0]} (valid: {', '.join(fields)})")
    if peft.get("use_dora"):
        raise BardConfigError("peft.use_dora=true: NeMo AutoModel cannot merge DoRA adapters into the base weights "
                              "and every BARD stage export is a merged bard_vl model; use LoRA (peft.use_dora=false)")
    if quantization is not None:
        raise BardConfigError("quantization with peft: NeMo AutoModel cannot merge adapters into quantized base "
                              "weights and every BARD stage export is a merged bard_vl model; remove quantization")
    if peft.get("use_triton") and not cuda:
        raise BardConfigError("peft.use_triton=true needs a GPU (Triton LoRA kernels); set peft.use_triton=false")
    try:
        ModuleMatcher(peft.get("target_modules") or [], peft.get("exclude_modules") or [],
                      bool(peft.get("match_all_linear", False)))
    except ValueError as exc:
        raise BardConfigError(f"peft.target_modules / peft.exclude_modules / peft.match_all_linear: {exc}") from None


def checkpointed_modules(model: torch.nn.Module) -> int:
    """Sub-modules NeMo wrapped for activation checkpointing (or decoder layers under HF's own checkpointing)."""
    wrapped = sum(isinstance(m, CheckpointWrapper) for m in model.modules())
    if not wrapped and getattr(model, "is_gradient_checkpointing", False):
        wrapped = sum(bool(getattr(m, "gradient_checkpointing", False)) for m in model.modules())
    return wrapped


def apply_activation_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """NeMo AutoModel's activation checkpointing for a model on one device: exactly what its FSDP2 path applies
    at world size 1 with ``distributed.activation_checkpointing: true`` (NeMo's Qwen3-VL parallelizer; the
    attention and MLP of every vision block and decoder layer re-run in backward). For the benchmarks, which
    build plain (transformers) models."""
    setup = SimpleNamespace(strategy_config=FSDP2Config(activation_checkpointing=True),
                            activation_checkpointing=True, reapply_trainability=None)
    return _parallelize_unsharded_fsdp2(model, setup, parallelizer=NeMoQwen3VLForConditionalGeneration.parallelizer)


def _state_key(module_name: str) -> str:
    """A module's prefix in a (gathered) state dict: wrapper segments (activation checkpointing) dropped."""
    return ".".join(p for p in module_name.split(".") if p not in ("_checkpoint_wrapped_module", "_orig_mod"))


@torch.no_grad()
def merge_lora_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold NeMo's LoRA adapters into the base weights of ``model``'s full state dict (gathered, e.g. on CPU):
    ``W + (alpha / dim) * B @ A`` in fp32, cast back to ``W``'s dtype; the adapter tensors are dropped. The
    model itself is not changed (training goes on with its adapters). An empty ``state`` (the ranks that do
    not write) stays empty."""
    if not state:
        return state
    out = dict(state)
    for name, module in model.named_modules():
        if not isinstance(module, LinearLoRA):
            continue
        key = _state_key(name)
        a, b = out.pop(f"{key}.lora_A.weight"), out.pop(f"{key}.lora_B.weight")
        weight = out[f"{key}.weight"]
        out[f"{key}.weight"] = (weight.float() + module.scale * (b.float() @ a.float())).to(weight.dtype)
    left = [k for k in out if any(part.startswith("lora_") for part in k.split("."))]
    if left:
        raise RuntimeError(f"adapter tensors that cannot be merged into a bard_vl export: {left[:3]}")
    return out


def run_main(recipe_cls: type, config_path: str | None = None) -> None:
    """Load ``-c cfg.yaml`` (+ ``--a.b=c`` overrides) the NeMo way, then set up and run ``recipe_cls``.

    Errors a user acts on end the process with one line and their exit code (:mod:`nemo_bard.errors`)."""

    def run() -> None:
        with cpu_patches():
            recipe = recipe_cls(parse_args_and_load_config(config_path))
            recipe.setup()
            recipe.run_train_validation_loop()

    code = run_reported(recipe_cls.__name__, run)
    if code:
        raise SystemExit(code)


def ar_sft_collate_fn(examples: list[dict | None], processor: Any, **kwargs: Any) -> dict[str, Any]:
    """NeMo AutoModel's default VLM SFT collate for *autoregressive* training on the same rows.

    Used by the offline demo to train the "pretrained" AR model with NeMo's own ``FinetuneRecipeForVLM``.
    It calls ``nemo_automodel``'s ``default_collate_fn`` unchanged and only makes its pre-shifted
    ``labels`` contiguous (0.7.0 returns a strided view that ``MaskedCrossEntropy`` cannot ``view``
    when the batch holds more than one sample). Rows dropped by the dataset (``None``) are skipped.
    Videos reach it as decoded frames (NeMo's collate passes the processor no frame metadata).
    """
    sampling = VideoSampling.from_processor(getattr(processor, "video_processor", None))
    rows = []
    for e in examples:
        if e is not None:
            conversation = decode_videos(e["conversation"], sampling)
            for m in conversation:
                for it in m["content"] if isinstance(m.get("content"), list) else []:
                    if it.get("type") == "video":
                        it["video"] = it["video"].frames
            rows.append({**e, "conversation": conversation})
    batch = default_collate_fn(rows, processor, **kwargs)
    batch["labels"] = batch["labels"].contiguous()
    return batch


__all__ = [
    "BardNeMoRecipe",
    "BardRecipeConfig",
    "BardVlmDataloaderConfig",
    "ColumnLengthGroupedSampler",
    "MaskedCrossEntropy",
    "NeMoBardVLForConditionalGeneration",
    "Prebuilt",
    "ScopedModuleOffloading",
    "apply_activation_checkpointing",
    "ar_sft_collate_fn",
    "build_frozen_model",
    "check_peft_and_checkpointing",
    "checkpointed_modules",
    "merge_lora_state_dict",
    "noise_seed",
    "run_main",
    "training_dataset",
]
