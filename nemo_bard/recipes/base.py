"""Shared BARD recipe machinery on top of NeMo AutoModel's ``FinetuneRecipeForVLM``.

NeMo keeps model building and FSDP2 sharding, the optimizer and LR schedule, gradient accumulation,
clipping, checkpoint/resume, logging and the HF consolidated export. BARD changes three things, and
this class overrides only those:

* batch building: the dataloader yields processor batches (``nemo_bard.data.collate``); each
  optimizer step lays them out at the *current* block size with per-sample noise
  (``nemo_bard.data.layout.BlockLayout``);
* forward + loss: one forward over ``[prefix | clean | noisy]`` with the block mask, logits only at
  the loss positions, loss normalised by global sample (or token) counts;
* callbacks: ``on_train_start`` / ``on_step_start`` / ``on_step_end`` / ``on_save`` / ``on_train_end``.

Subclasses implement :meth:`compute_loss`.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from nemo_automodel.components.distributed.utils import get_sync_ctx
from nemo_automodel.components.loggers.metric_logger import MetricsSample
from nemo_automodel.components.training.utils import (
    prepare_after_first_microbatch,
    prepare_for_final_backward,
    prepare_for_grad_accumulation,
    scale_grads_and_clip_grad_norm,
)
from nemo_automodel.recipes.vlm.finetune import FinetuneRecipeForVLM
from nemo_bard.callbacks.base import BardCallback, CallbackList
from nemo_bard.callbacks.block_merge import BlockMergeCallback, ScheduleError
from nemo_bard.cpu import apply_cpu_patches
from nemo_bard.data.layout import MODEL_INPUT_KEYS, BlockLayout, FakeMedia
from nemo_bard.loss.denoise import num_loss_samples
from nemo_bard.recipes.config import BardConfigError, BardSettings, parse_bard_settings, to_plain

logger = logging.getLogger(__name__)


class _PrebuiltDataset:
    """A dataset config whose ``build()`` returns a dataset built (and validated) before the model."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def build(self, **_: Any) -> Any:
        return self.dataset


def sample_seed(base: int, step: int, dp_rank: int, dp_size: int, lbs: int, grad_acc: int, mb: int, i: int) -> int:
    """Topology-independent per-sample noise seed (NeMo's dLLM convention, shifted by the BARD seed)."""
    from nemo_automodel.recipes.dllm.train_ft import corruption_sample_seed

    return corruption_sample_seed(base, step, dp_rank, dp_size, lbs, grad_acc, mb, i)


def run_main(recipe_cls: type, config_path: str | None = None) -> None:
    """Load ``-c cfg.yaml`` (+ ``--a.b=c`` overrides) the NeMo way, then set up and run ``recipe_cls``."""
    from nemo_automodel.components.config._arg_parser import parse_args_and_load_config

    recipe = recipe_cls(parse_args_and_load_config(config_path))
    recipe.setup()
    recipe.run_train_validation_loop()


class BardRecipeBase(FinetuneRecipeForVLM):
    """Block-layout batches, masked forward, global normalisation and callbacks for the BARD stages."""

    block_merge: BlockMergeCallback | None = None

    # ------------------------------------------------------------------ setup
    def _validate_before_setup(self) -> None:
        """Config checks that must fail before the model loads (subclasses extend)."""
        self.bard = parse_bard_settings(to_plain(self.cfg.get("bard", None)))
        max_steps = self.cfg.get("step_scheduler.max_steps", None)
        callbacks: list[BardCallback] = []
        merge_cfg = self.cfg.get("block_merge", None)
        if merge_cfg is not None:
            merge_kwargs = to_plain(merge_cfg)
            merge_kwargs.pop("_target_", None)
            try:
                self.block_merge = BlockMergeCallback(**merge_kwargs)
            except TypeError as exc:
                raise BardConfigError(f"block_merge: {exc}") from None
            if max_steps is not None and self.block_merge.total_steps != int(max_steps):
                raise ScheduleError(
                    f"block_merge.schedule steps sum to {self.block_merge.total_steps} but "
                    f"step_scheduler.max_steps={max_steps}; make them equal"
                )
            callbacks.append(self.block_merge)
        for i, node in enumerate(self.cfg.get("callbacks", None) or []):
            if not hasattr(node, "instantiate"):
                raise BardConfigError(f"callbacks[{i}] must be a mapping with _target_")
            callbacks.append(node.instantiate())
        self.callbacks = CallbackList(callbacks)
        if self.cfg.get("loss_fn", None) is None:
            # NeMo's setup builds a token loss; BARD computes its own, so any default will do.
            self.cfg._raw.set_by_dotted("loss_fn._target_", "nemo_automodel.components.loss.masked_ce.MaskedCrossEntropy")
        if int(self.cfg.get("distributed.cp_size", 1) or 1) > 1 or int(self.cfg.get("distributed.pp_size", 1) or 1) > 1:
            raise BardConfigError("BARD recipes need distributed.cp_size=1 and pp_size=1 (custom block masks)")
        self._check_mask_backend()
        self._prebuild_dataset()

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

    def _prebuild_dataset(self) -> None:
        """Build the training dataset now so an empty/missing dataset fails before the model loads."""
        dl_cfg = self.cfg.vlm_dataloader
        if dl_cfg is None:
            raise BardConfigError("no `dataset:` section; BARD training needs a dataset")
        dataset = dl_cfg.dataset_config.build()
        if len(dataset) == 0:
            raise BardConfigError("the training dataset is empty")
        dl_cfg.dataset_config = _PrebuiltDataset(dataset)
        self._install_length_grouping(dl_cfg)

    def _install_length_grouping(self, dl_cfg: Any) -> None:
        """Swap the dataloader's sampler for a length-grouped one when the dataset has a ``length`` column."""
        if not self.bard.length_grouped:
            return
        original_build = dl_cfg.build
        recipe = self

        def build(**kwargs: Any):
            from torchdata.stateful_dataloader import StatefulDataLoader

            from nemo_automodel.components.datasets.vlm.loader import VlmDataloaderBuild
            from nemo_bard.data.sampler import LengthGroupedSampler

            result = original_build(**kwargs)
            lengths = getattr(result.dataloader.dataset, "lengths", None)
            if lengths is None:
                return result
            dl = result.dataloader
            sampler = LengthGroupedSampler(
                lengths, kwargs["batch_size"], kwargs["dp_world_size"], kwargs["dp_rank"],
                seed=int(recipe.cfg.get("seed", 42)), mult=recipe.bard.length_group_mult,
            )
            logger.info("length-grouped sampling over the dataset's 'length' column (%d samples/rank)", len(sampler))
            loader = StatefulDataLoader(
                dl.dataset, sampler=sampler, batch_size=kwargs["batch_size"], collate_fn=dl.collate_fn,
                num_workers=dl.num_workers, pin_memory=dl.pin_memory, drop_last=True,
            )
            return VlmDataloaderBuild(dataloader=loader, processor=result.processor)

        object.__setattr__(dl_cfg, "build", build)

    def setup(self) -> None:
        """Validate BARD settings, run NeMo's VLM setup, then build the block layout."""
        apply_cpu_patches()
        self._validate_before_setup()
        super().setup()
        model = self.model_parts[0]
        if getattr(model.config, "model_type", None) != "bard_vl":
            raise BardConfigError(
                f"model.pretrained_model_name_or_path is a {getattr(model.config, 'model_type', '?')!r} checkpoint; "
                "BARD training needs a bard_vl model. Convert it first: python -m nemo_bard.convert --src DIR --dst OUT"
            )
        tok = self.processor.tokenizer
        pad_id = tok.convert_tokens_to_ids(self.bard.response_pad_token)
        if pad_id is None or pad_id == tok.unk_token_id:
            raise BardConfigError(f"bard.response_pad_token={self.bard.response_pad_token!r} is not in the tokenizer")
        mask_id = self.bard.mask_token_id if self.bard.mask_token_id is not None else model.config.mask_token_id
        first_block = (self.block_merge.stages[0].block_size if self.block_merge
                       else self.bard.block_size or int(model.config.block_size))
        self.layout = BlockLayout(
            block_size=first_block, mask_token_id=mask_id, pad_token_id=pad_id, max_length=self.bard.max_length,
            noise=self.bard.noise, clean_attention=self.bard.clean_attention, mask_backend=self.bard.mask_backend,
            pad_weight=self.bard.loss.pad_weight, min_loss_t=self.bard.loss.min_t, flex_compile=self.bard.flex_compile,
        )
        self.noise_seed = int(self.bard.seed if self.bard.seed is not None else self.cfg.get("seed", 42))
        self.setup_stage()

    def setup_stage(self) -> None:
        """Stage-specific setup after the student is built (SWD builds its teacher here)."""

    # ------------------------------------------------------------ live state
    @property
    def block_size(self) -> int:
        return self.layout.block_size

    def set_block_size(self, block_size: int) -> None:
        self.layout.block_size = int(block_size)

    @property
    def checkpoint_root(self) -> str:
        return str(self.checkpointer.config.checkpoint_dir)

    def export_model(self, out_dir: str | Path, block_size: int | None = None) -> Path:
        """Export the student as an HF ``bard_vl`` directory (collective; rank 0 writes)."""
        from nemo_bard.models.export import export_hf

        dtype = getattr(torch, self.bard.export_dtype) if self.bard.export_dtype else None
        return export_hf(self.model_parts[0], out_dir, self.processor, block_size=block_size, dtype=dtype)

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

    # ---------------------------------------------------------------- batches
    def build_block_batch(self, batch: dict[str, Any], step: int, microbatch: int, grad_acc: int) -> dict[str, Any]:
        """Lay out one processor micro-batch at the current block size with deterministic noise."""
        n = int(batch["prefix_lens"].shape[0])
        lbs = int(self.cfg.get("step_scheduler.local_batch_size", 1))
        dp_rank, dp_size = self._get_dp_rank(), self._get_dp_group_size()
        seeds = [sample_seed(self.noise_seed, step, dp_rank, dp_size, lbs, grad_acc, microbatch, i) for i in range(n)]
        built = self.layout.build(batch, seeds, self.model_parts[0].rope_positions, self.fake_media_for(batch))
        if built["num_samples"] == 0:
            raise BardConfigError(
                f"every sample of a micro-batch was dropped (over bard.max_length={self.bard.max_length} or bad "
                "media); raise bard.max_length or filter the data"
            )
        return built

    def _model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        device = self.dist_env.device
        out = {}
        for k in MODEL_INPUT_KEYS:
            if k in batch:
                v = batch[k]
                out[k] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        return out

    def fake_media_for(self, batch: dict[str, Any]) -> list[FakeMedia]:
        """Fake image/video items so this micro-batch runs the vision tower whenever another DP rank's does.

        One small all-reduce per micro-batch; nothing at data-parallel size 1.
        """
        if self._get_dp_group_size() <= 1:
            return []
        local = torch.tensor([int("pixel_values" in batch), int("pixel_values_videos" in batch)])
        glob = self._dp_allreduce(local.clone(), op=torch.distributed.ReduceOp.MAX)
        config = self.model_parts[0].config
        return [FakeMedia.for_model(config, m + 1) for m in range(2) if glob[m] and not local[m]]

    # --------------------------------------------------------------- the step
    def compute_loss(
        self, model: torch.nn.Module, batch: dict[str, Any], denominator: float, is_train: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (loss to backpropagate, detached summable statistics). Implemented by the stage recipes."""
        raise NotImplementedError

    def denominators(self, built: list[dict[str, Any]]) -> dict[str, float]:
        """Global sample / token counts of the optimizer step (all DP ranks, all micro-batches)."""
        local = torch.tensor(
            [sum(num_loss_samples(b["loss_mask"]) for b in built), sum(int(b["loss_mask"].sum()) for b in built)],
            dtype=torch.long,
        )
        total = self._dp_allreduce(local)
        return {"samples": float(total[0]), "tokens": float(total[1])}

    def _run_train_optim_step(self, batches: list[dict[str, Any]], max_grad_norm: float | None = None):
        step = self.step_scheduler.step
        self.callbacks.on_step_start(self, step)
        built = [self.build_block_batch(b, step, i, len(batches)) for i, b in enumerate(batches)]
        counts = self.denominators(built)
        denominator = counts["samples"] if self.bard.loss.reduction == "sample_mean" else counts["tokens"]
        model = self.model_parts[0]
        prepare_for_grad_accumulation(self.model_parts, pp_enabled=False)
        losses, stats = [], {}
        for i, b in enumerate(built):
            last = i == len(built) - 1
            if last:
                prepare_for_final_backward(self.model_parts, pp_enabled=False)
            sync = get_sync_ctx(model, last, defer_fsdp_grad_sync=getattr(self.distributed_config, "defer_fsdp_grad_sync", True))
            with sync:
                loss, st = self.compute_loss(model, b, denominator, is_train=True)
                (loss * self._get_dp_group_size(include_cp=True)).backward()
            losses.append(loss.detach())
            for k, v in st.items():
                stats[k] = stats.get(k, 0.0) + v.detach().double()
            if i == 0:
                prepare_after_first_microbatch()
        grad_norm = scale_grads_and_clip_grad_norm(
            max_grad_norm=max_grad_norm, model_parts=self.model_parts, norm_type=2.0, pp_enabled=False,
            device_mesh=self.device_mesh, foreach=True, dp_group_size=self._get_dp_group_size(include_cp=True),
            grad_norm_backend=self.cfg.get("clip_grad_norm.backend", "triton"),
        )
        self.checkpointer.maybe_wait_for_staging()
        for opt in self.optimizer:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            for sched in self.lr_scheduler:
                sched.step(1)

        now = time.perf_counter()
        elapsed, self.timestamp = now - self.timestamp, now
        reduced = self._dp_allreduce(torch.stack([torch.stack(losses).sum().double().cpu()] + [v.cpu() for v in stats.values()]))
        tokens = self._dp_allreduce(torch.tensor(sum(int(b["input_ids"].numel()) for b in built)))
        metrics = {
            "loss": float(reduced[0]),
            "grad_norm": float(grad_norm) if not isinstance(grad_norm, float) else grad_norm,
            "lr": self.optimizer[0].param_groups[0]["lr"],
            "block_size": self.block_size,
            "tps": float(tokens) / max(elapsed, 1e-9),
            "num_samples": counts["samples"],
            "num_loss_tokens": counts["tokens"],
            "mem": torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else 0.0,
        }
        metrics.update(self.summarize_stats(dict(zip(stats, reduced[1:].tolist()))))
        dropped = sum(b["num_dropped"] for b in built) + sum(int(b.get("num_skipped", 0)) for b in batches)
        if dropped:
            metrics["num_dropped_samples"] = dropped
        sample = MetricsSample(step=step, epoch=self.step_scheduler.epoch, metrics=metrics)
        self.callbacks.on_step_end(self, step, metrics)
        return sample

    def summarize_stats(self, sums: dict[str, float]) -> dict[str, float]:
        """Turn summed statistics into logged metrics (subclasses extend)."""
        n = max(sums.get("num_positions", 0.0), 1.0)
        out = {}
        if "num_correct" in sums:
            out["masked_acc"] = sums["num_correct"] / n
        if "t_sum" in sums:
            out["mean_t"] = sums["t_sum"] / n
        return out

    # ---------------------------------------------------- loop, save, logging
    def run_train_validation_loop(self):
        self.callbacks.on_train_start(self)
        result = super().run_train_validation_loop()
        self.callbacks.on_train_end(self)
        return result

    def save_checkpoint(self, epoch, step, train_loss, val_loss=None, best_metric_key="default"):
        super().save_checkpoint(epoch, step, train_loss, val_loss, best_metric_key=best_metric_key)
        if self.checkpointer.config.enabled:
            self.callbacks.on_save(self, str(Path(self.checkpoint_root) / f"epoch_{epoch}_step_{step}"))

    @torch.no_grad()
    def _run_validation_epoch(self, val_dataloader):
        """Validation loss with fixed noise (seeded by batch index), token-mean."""
        for mp in self.model_parts:
            mp.eval()
        total, count = torch.zeros((), dtype=torch.float64), 0.0
        for i, batch in enumerate(val_dataloader):
            b = self.build_block_batch(batch, step=-1 - i, microbatch=0, grad_acc=1)
            tokens = float(b["loss_mask"].sum())
            samples = float(num_loss_samples(b["loss_mask"]))
            denominator = tokens if self.bard.loss.reduction == "token_mean" else samples
            loss, _ = self.compute_loss(self.model_parts[0], b, denominator=denominator, is_train=False)
            total += loss.double().cpu() * tokens
            count += tokens
        total = self._dp_allreduce(total)
        count = float(self._dp_allreduce(torch.tensor(count, dtype=torch.float64)))
        return MetricsSample(
            step=self.step_scheduler.step, epoch=self.step_scheduler.epoch,
            metrics={"val_loss": float(total) / max(count, 1.0), "lr": self.optimizer[0].param_groups[0]["lr"],
                     "num_label_tokens": int(count), "mem": 0.0},
        )

    def log_train_metrics(self, log_data) -> None:
        if not self.dist_env.is_main:
            return
        from nemo_automodel.recipes.vlm import finetune as nemo_vlm

        if self.step_scheduler.is_remote_logging_step:
            if nemo_vlm._HAS_WANDB and nemo_vlm.wandb.run is not None:
                nemo_vlm.wandb.log(log_data.to_dict(), step=self.step_scheduler.step)
            if nemo_vlm._HAS_MLFLOW and nemo_vlm.mlflow.active_run() is not None:
                nemo_vlm.mlflow.log_metrics(nemo_vlm.to_float_metrics(log_data.to_dict()), step=log_data.step)
        self.metric_logger_train.log(log_data)
        m = log_data.metrics
        extras = " | ".join(f"{k} {m[k]:.4f}" for k in self.log_keys() if k in m)
        logging.info(
            "step %d | epoch %d | block %d | loss %.4f | %s | grad_norm %.4f | lr %.2e | tps %.1f",
            log_data.step, log_data.epoch, m["block_size"], m["loss"], extras, m["grad_norm"], m["lr"], m["tps"],
        )

    def log_keys(self) -> tuple[str, ...]:
        return ("masked_acc", "mean_t")
