"""What the two BARD stages share: pre-flight checks, the block layout, the live block size, exports.

NeMo AutoModel keeps model building and FSDP2 sharding, the optimizer and LR schedule, gradient
accumulation, clipping, checkpoint/resume, logging and the HF consolidated export. BARD changes the
batches and the forward + loss; how those plug into NeMo's loop is
:class:`~nemo_bard.integrations.nemo.BardNeMoRecipe`, whose hooks this class implements:

* :meth:`preflight`: validate the ``bard:`` / ``block_merge:`` / ``kd:`` sections, refuse what BARD cannot
  do, build the callbacks, the training dataset and the loss, all before any model loads;
* :meth:`prepare_step`: lay each collated micro-batch out as ``[prefix | clean | noisy]`` at the *current*
  block size with deterministic per-sample noise (:class:`~nemo_bard.data.layout.BlockLayout`), and count
  the optimizer step's global samples / loss tokens (all data-parallel ranks and micro-batches);
* :meth:`forward_loss`: implemented by the stage recipes (PBM: masked denoising; SWD: CE + top-k KD).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from nemo_bard.callbacks.base import BardCallback, CallbackList
from nemo_bard.callbacks.block_merge import BlockMergeCallback
from nemo_bard.callbacks.lr_horizon import ResumeLRHorizon
from nemo_bard.data.layout import BlockBatch, BlockLayout, FakeMedia
from nemo_bard.errors import DiskFullError
from nemo_bard.integrations.nemo import (
    BardNeMoRecipe,
    check_peft_and_checkpointing,
    checkpointed_modules,
    merge_lora_state_dict,
    noise_seed,
    training_dataset,
)
from nemo_bard.models.export import export_hf, full_state_dict
from nemo_bard.recipes.config import (
    CHECKED_KEYS,
    BardConfigError,
    BardSections,
    check_recipe_config,
    parse_bard_settings,
    to_plain,
)
from nemo_bard.rundir import disk_full_message

logger = logging.getLogger(__name__)

__all__ = ["BardRecipeBase"]


class BardRecipeBase(BardNeMoRecipe):
    """Block-layout batches, masked forward, global normalisation and callbacks for the BARD stages."""

    block_merge: BlockMergeCallback | None = None
    sections: BardSections

    # -------------------------------------------------------------------- pre-flight
    def preflight(self) -> None:
        """Config, data and loss checks that must fail before the model loads (stages extend)."""
        plain = {k: to_plain(self.cfg.get(k, None)) for k in CHECKED_KEYS}
        self.sections = check_recipe_config({k: v for k, v in plain.items() if v is not None})
        self.bard = self.sections.bard
        self.check_sections()
        self._check_mask_backend()
        check_peft_and_checkpointing(to_plain(self.cfg.get("peft", None)), to_plain(self.cfg.get("distributed", None)),
                                     self.cfg.get("quantization", None), cuda=torch.cuda.is_available())
        self.callbacks = CallbackList(self.build_callbacks())
        self.cfg.use_loss(self.build_loss())
        self._prepare_data()

    def check_sections(self) -> None:
        """Stage-specific section checks (the PBM refuses ``kd:``, the SWD ``block_merge:``)."""

    def reduction(self) -> str:
        """How the step's loss is normalised: ``sample_mean`` or ``token_mean`` (``bard.loss.reduction``)."""
        return self.bard.loss.reduction

    def build_loss(self) -> torch.nn.Module:
        """The stage's loss module (installed as NeMo's ``loss_fn``)."""
        raise NotImplementedError

    def build_callbacks(self) -> list[BardCallback]:
        """``block_merge:`` (PBM schedule; else the LR horizon on resume) plus the user's ``callbacks:`` list
        (``_target_`` entries)."""
        callbacks: list[BardCallback] = []
        merge = self.sections.block_merge
        if merge is not None:
            max_steps = self.cfg.get("step_scheduler.max_steps", None)
            self.block_merge = BlockMergeCallback(**merge.model_dump(),
                                                  max_steps=None if max_steps is None else int(max_steps))
            callbacks.append(self.block_merge)
        else:  # PBM's callback re-derives the LR horizon itself (per stage with reset_lr_schedule)
            callbacks.append(ResumeLRHorizon())
        for i, node in enumerate(self.cfg.get("callbacks", None) or []):
            if not hasattr(node, "instantiate"):
                raise BardConfigError(f"callbacks[{i}] must be a mapping with _target_")
            callbacks.append(node.instantiate())
        return callbacks

    def _check_mask_backend(self) -> None:
        """``bard.mask_backend: flex`` needs a GPU and the text decoder in FlexAttention mode."""
        if self.bard.mask_backend != "flex":
            return
        if not torch.cuda.is_available():
            raise BardConfigError("bard.mask_backend=flex needs a GPU (FlexAttention has no CPU backward); "
                                  "use bard.mask_backend=dense on CPU")
        attn = to_plain(self.cfg.get("model.attn_implementation", None))
        text_attn = attn.get("text_config") if isinstance(attn, dict) else attn
        if text_attn != "flex_attention":
            raise BardConfigError(
                "bard.mask_backend=flex needs the text decoder in flex mode: set model.attn_implementation="
                '{text_config: flex_attention, vision_config: sdpa, "": sdpa}'
            )

    def _prepare_data(self) -> None:
        """Build the training dataset now, so an empty or missing dataset fails before the model loads."""
        seed = int(self.cfg.get("seed", 42))
        if self.cfg.prepare_training_data(length_grouped=self.bard.length_grouped, seed=seed) is None:
            raise BardConfigError("no `dataset:` section; BARD training needs a dataset")
        if len(training_dataset(self.cfg)) == 0:
            raise BardConfigError("the training dataset is empty")

    # ------------------------------------------------------------------ after NeMo's setup
    def finish_setup(self) -> None:
        """Check the model is a bard_vl model, then build the block layout and the stage's extras."""
        model = self.model_parts[0]
        if getattr(model.config, "model_type", None) != "bard_vl":
            raise BardConfigError(
                f"model.pretrained_model_name_or_path is a {getattr(model.config, 'model_type', '?')!r} checkpoint; "
                "BARD training needs a bard_vl model. Convert it first: python -m nemo_bard.convert --src DIR --dst OUT"
            )
        self._build_layout(model)
        self._log_memory_savers(model)
        self.setup_stage()

    def _build_layout(self, model: torch.nn.Module) -> None:
        tok = self.processor.tokenizer
        pad_id = tok.convert_tokens_to_ids(self.bard.response_pad_token)
        if pad_id is None or pad_id == tok.unk_token_id:
            raise BardConfigError(f"bard.response_pad_token={self.bard.response_pad_token!r} is not in the tokenizer")
        mask_id = self.bard.mask_token_id if self.bard.mask_token_id is not None else model.config.mask_token_id
        first_block = (self.block_merge.stages[0].block_size if self.block_merge
                       else self.bard.block_size or int(model.config.block_size))
        self.layout = BlockLayout(
            block_size=first_block, mask_token_id=mask_id, pad_token_id=pad_id, max_length=self.bard.max_length,
            noise=self.bard.noise, clean_attention=self.bard.clean_attention,
            mask_backend=self.bard.mask_backend, pad_weight=self.bard.loss.pad_weight,
            min_loss_t=self.bard.loss.min_t, flex_compile=self.bard.flex_compile,
        )
        self.noise_seed = int(self.bard.seed if self.bard.seed is not None else self.cfg.get("seed", 42))

    @classmethod
    def for_model(cls, model: torch.nn.Module, processor: Any, bard: dict[str, Any] | None = None, *,
                  device: torch.device | str = "cpu", local_batch_size: int = 1,
                  optimizer: torch.optim.Optimizer | None = None,
                  callbacks: tuple[BardCallback, ...] = ()) -> "BardRecipeBase":
        """This stage's recipe around an already built bard_vl ``model`` on one process, without NeMo's setup: the
        layout and loss from the ``bard:`` section ``bard`` (checked by the schema), and the state NeMo's optimizer
        step reads, so :meth:`prepare_step`, :meth:`forward_loss` and the whole optimizer step run as in training.
        For benchmarks and tests (an SWD recipe also needs its ``teacher_model`` set)."""
        recipe = cls.standalone(model, device, local_batch_size, optimizer)
        recipe.bard, recipe.block_merge, recipe.processor = parse_bard_settings(bard or {}), None, processor
        recipe._build_layout(model)
        recipe.loss_fn = recipe.build_loss()
        recipe.callbacks = CallbackList(list(callbacks))
        return recipe

    def _log_memory_savers(self, model: torch.nn.Module) -> None:
        """Say what NeMo applied for ``distributed.activation_checkpointing`` and ``peft`` (and fail if asked-for
        activation checkpointing was silently skipped)."""
        if self.cfg.get("distributed.activation_checkpointing", False):
            wrapped = checkpointed_modules(model)
            if not wrapped:
                raise BardConfigError("distributed.activation_checkpointing is set but NeMo AutoModel checkpointed no "
                                      "module of this model; check distributed.strategy")
            logger.info("activation checkpointing: %d modules recompute their activations in backward", wrapped)
        if getattr(self, "peft_config", None) is not None:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            logger.info("LoRA (NeMo PEFT): %d trainable adapter parameters; stage exports are merged bard_vl models",
                        trainable)

    def setup_stage(self) -> None:
        """Stage-specific setup after the student is built (SWD builds its teacher here)."""

    # ------------------------------------------------------------------- live state
    @property
    def block_size(self) -> int:
        return self.layout.block_size

    def set_block_size(self, block_size: int) -> None:
        self.layout.block_size = int(block_size)

    @property
    def checkpoint_root(self) -> str:
        return str(self.checkpointer.config.checkpoint_dir)

    def export_model(self, out_dir: str | Path, block_size: int | None = None) -> Path:
        """Export the student as an HF ``bard_vl`` directory (collective; rank 0 writes), atomically and sharded at
        ``bard.export_max_shard_size``; with LoRA the adapters are merged into the exported weights; refused when
        the weights are not finite."""
        stages = self.block_merge.stages if self.block_merge is not None else []
        start = next((s.start for s in stages if s.block_size == block_size), 0)  # the stage (or run) exported
        self.check_trained_since(start, f"the export {out_dir} was not written")
        self.check_finite_weights(f"export {out_dir}")
        dtype = getattr(torch, self.bard.export_dtype) if self.bard.export_dtype else None
        model, state = self.model_parts[0], None
        if getattr(self, "peft_config", None) is not None:  # LoRA: a full model, adapters folded into the weights
            state = merge_lora_state_dict(model, full_state_dict(model))
        try:
            return export_hf(model, out_dir, self.processor, block_size=block_size, dtype=dtype,
                             max_shard_size=self.bard.export_max_shard_size, state_dict=state)
        except Exception as exc:  # noqa: BLE001  OSError or safetensors' SafetensorError; only disk full is translated
            full = disk_full_message(exc, out_dir)
            if full is None:
                raise
            raise DiskFullError(f"{full}: the export {out_dir} was not completed (nothing was published there); free "
                                "space, then resume with the same command") from exc

    def max_nonfinite_steps(self) -> int:
        return self.bard.max_nonfinite_steps

    def max_empty_steps(self) -> int:
        return self.bard.max_empty_steps

    def stage_of(self, step: int) -> tuple[int, int, str]:
        if self.block_merge is None:
            return super().stage_of(step)
        stage = self.block_merge.stages[self.block_merge.stage_index(step)]
        return stage.start, stage.end, f"stage B={stage.block_size} (steps {stage.start}-{stage.end - 1})"

    def reset_optimizer_state(self) -> None:
        for opt in self.optimizer:
            opt.state.clear()
        logger.info("optimizer state reset")

    def reset_lr_schedule(self, stage_steps: int, steps_into_stage: int = 0) -> None:
        """Restart warm-up and decay for a stage of ``stage_steps`` steps, positioned ``steps_into_stage`` in."""
        if not self.lr_scheduler:
            return
        warmup = int(self.cfg.get("lr_scheduler.lr_warmup_steps", 0) or 0)
        for sched in self.lr_scheduler:
            sched.lr_warmup_steps = min(warmup, max(stage_steps - 1, 0))
            sched.lr_decay_steps = stage_steps
            sched.num_steps = 0
            sched.step(steps_into_stage)

    # ---------------------------------------------------------------------- batches
    def build_block_batch(self, batch: dict[str, Any], step: int, microbatch: int, grad_acc: int) -> BlockBatch:
        """Lay out one processor micro-batch at the current block size with deterministic noise (a placeholder with
        no loss position when all its samples were dropped, so this rank still runs the step's collectives)."""
        n = int(batch["prefix_lens"].shape[0])
        lbs = int(self.cfg.get("step_scheduler.local_batch_size", 1))
        dp_rank, dp_size = self.dp_rank(), self.dp_size()
        seeds = [noise_seed(self.noise_seed, step, dp_rank, dp_size, lbs, grad_acc, microbatch, i) for i in range(n)]
        return self.layout.build(batch, seeds, self.model_parts[0].rope_positions, self.fake_media_for(batch),
                                 device=self.dist_env.device)

    def fake_media_for(self, batch: dict[str, Any]) -> list[FakeMedia]:
        """Fake image/video items so this micro-batch runs the vision tower whenever another DP rank's does.

        One small all-reduce per micro-batch; nothing at data-parallel size 1.
        """
        if self.dp_size() <= 1:
            return []
        local = torch.tensor([int("pixel_values" in batch), int("pixel_values_videos" in batch)])
        glob = self.dp_allreduce(local.clone(), op=torch.distributed.ReduceOp.MAX)
        config = self.model_parts[0].config
        return [FakeMedia.for_model(config, m + 1) for m in range(2) if glob[m] and not local[m]]

    def denominators(self, built: list[BlockBatch]) -> dict[str, float]:
        """Global sample / token counts of the optimizer step (all DP ranks, all micro-batches)."""
        local = torch.tensor([sum(b.num_loss_samples for b in built), sum(b.num_loss_tokens for b in built)],
                             dtype=torch.long)
        total = self.dp_allreduce(local)
        return {"samples": float(total[0]), "tokens": float(total[1])}

    def prepare_step(self, batches: list[dict[str, Any]], step: int) -> tuple[list[BlockBatch], float]:
        built = [self.build_block_batch(b, step, i, len(batches)) for i, b in enumerate(batches)]
        self.step_counts = self.denominators(built)
        key = "samples" if self.reduction() == "sample_mean" else "tokens"
        return built, self.step_counts[key]

    # ------------------------------------------------------------------- the step
    # forward_loss: implemented by the stage recipes (the hook is declared on BardNeMoRecipe)

    def step_metrics(
        self, built: list[BlockBatch], batches: list[dict[str, Any]], sums: dict[str, float]
    ) -> dict[str, float]:
        metrics = {"block_size": self.block_size, "num_samples": self.step_counts["samples"],
                   "num_loss_tokens": self.step_counts["tokens"], **self.summarize_stats(sums)}
        dropped = sum(b.num_dropped for b in built) + sum(int(b.get("num_skipped", 0)) for b in batches)
        if dropped:
            metrics["num_dropped_samples"] = dropped
        return metrics

    def summarize_stats(self, sums: dict[str, float]) -> dict[str, float]:
        """Turn summed statistics into logged metrics (subclasses extend)."""
        n = max(sums.get("num_positions", 0.0), 1.0)
        out = {}
        if "num_correct" in sums:
            out["masked_acc"] = sums["num_correct"] / n
        if "t_sum" in sums:
            out["mean_t"] = sums["t_sum"] / n
        return out

    def log_keys(self) -> tuple[str, ...]:
        return ("masked_acc", "mean_t")

    def validation_loss(self, batch: dict[str, Any], index: int) -> tuple[torch.Tensor, float]:
        """Validation with fixed noise (seeded by batch index); token-weighted."""
        b = self.build_block_batch(batch, step=-1 - index, microbatch=0, grad_acc=1)
        tokens = float(b.num_loss_tokens)
        denominator = tokens if self.reduction() == "token_mean" else float(b.num_loss_samples)
        loss, _ = self.forward_loss(self.model_parts[0], b, denominator=denominator, is_train=False)
        return loss.double().cpu() * tokens, tokens
