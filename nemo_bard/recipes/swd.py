"""Stage 2 — Stage-Wise Distillation.

``automodel finetune --config conf/bard_swd.yaml``: a large-block ``bard_vl`` student (a PBM stage
export, B8/B16/B32) learns from a frozen small-block ``bard_vl`` anchor (B4, possibly a larger model).
One corrupted batch in the student layout per micro-batch; the teacher sees the same tokens and
positions under a mask built at its own block size; both forwards compute logits only at the masked
noisy positions; loss = ce_weight * CE + kd_weight * top-k KD, token-mean over loss positions.

The teacher is built through NeMo's model builder with the student's distributed setup (FSDP2-sharded
like the student), kept in eval mode without gradients in the attribute ``teacher_model`` (which NeMo's
checkpointer skips), and optionally offloaded to CPU between forwards (GPU only).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from nemo_bard.data.layout import BlockBatch
from nemo_bard.integrations.nemo import ScopedModuleOffloading, build_frozen_model, run_main
from nemo_bard.loss.kd import TopKDistillationLoss, teacher_topk
from nemo_bard.recipes.base import BardRecipeBase
from nemo_bard.recipes.config import BardConfigError, KDSettings, check_teacher_student

logger = logging.getLogger(__name__)


def _pretrained_path(node: Any, section: str) -> str:
    path = node.get("pretrained_model_name_or_path", None) if node is not None else None
    if not path:
        raise BardConfigError(f"`{section}.pretrained_model_name_or_path` is required for SWD")
    return str(path)


class BardSWDRecipe(BardRecipeBase):
    """Distill a large-block student from a frozen small-block BARD anchor."""

    kd: KDSettings

    def check_sections(self) -> None:
        """SWD settings and the teacher/student checks (configs and tokenizers only, before any model loads)."""
        if self.sections.block_merge is not None:
            raise BardConfigError("block_merge is a PBM setting; remove it from the SWD config")
        self.kd = self.sections.kd or KDSettings()
        self.student_block, self.teacher_block = check_teacher_student(
            _pretrained_path(self.cfg.get("model", None), "model"),
            _pretrained_path(self.cfg.get("teacher_model", None), "teacher_model"),
            self.bard.block_size, self.kd.teacher_block_size,
        )
        self.bard.block_size = self.student_block
        if "reduction" in self.bard.loss.model_fields_set and self.bard.loss.reduction != "token_mean":
            raise BardConfigError(f"bard.loss.reduction={self.bard.loss.reduction}: SWD normalises its CE and KD "
                                  "losses by the loss positions (token_mean); set bard.loss.reduction: token_mean "
                                  "or remove the key")

    def reduction(self) -> str:
        return "token_mean"

    def build_loss(self) -> TopKDistillationLoss:
        return TopKDistillationLoss(self.kd.top_k, self.kd.temperature, self.kd.direction)

    def setup_stage(self) -> None:
        self.offload_teacher = bool(self.cfg.get("offload_teacher_model", False)) and torch.cuda.is_available()
        self.teacher_model = build_frozen_model(
            self.cfg.teacher_model, seed=int(self.cfg.get("seed", 42)), distributed_setup=self.distributed_setup,
            device="cpu" if self.offload_teacher else self.dist_env.device,
        )
        logger.info("SWD: student block %d, teacher block %d, top-%d %s KD, weights ce %.2f / kd %.2f",
                    self.student_block, self.teacher_block, self.kd.top_k, self.kd.direction,
                    self.kd.ce_weight, self.kd.kd_weight)

    def teacher_inputs(self, batch: BlockBatch) -> dict[str, Any]:
        """The student's tokens, positions and media with the attention mask rebuilt at the teacher block size."""
        mask = self.layout.mask(batch.prefix_lens, batch.resp_lens, batch.seq_len, self.teacher_block,
                                device=self.dist_env.device)  # same backend, device and compilation as the student's
        return {**batch.inputs, "attention_mask": mask}

    def forward_loss(
        self, model: torch.nn.Module, batch: BlockBatch, denominator: float, is_train: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss_mask = batch.loss_mask
        offload = ScopedModuleOffloading(self.teacher_model, enabled=True) if self.offload_teacher else nullcontext()
        with offload, torch.no_grad():
            t_logits = self.teacher_model(**self.teacher_inputs(batch), logits_mask=loss_mask).logits
            values, indices = teacher_topk(t_logits, self.kd.top_k)
            del t_logits
        s_logits = model(**batch.inputs, logits_mask=loss_mask).logits
        targets = batch.targets[loss_mask]
        ce_sum = F.cross_entropy(s_logits.float(), targets, reduction="sum")
        kd = self.loss_fn(s_logits, values, indices, denominator)
        loss = self.kd.ce_weight * ce_sum / max(denominator, 1.0) + self.kd.kd_weight * kd.loss
        with torch.no_grad():
            stats = {
                "ce_sum": ce_sum.double(),
                "kd_sum": kd.loss.double() * max(denominator, 1.0),
                "teacher_entropy_sum": kd.teacher_entropy_sum.double(),
                "top1_agree_sum": kd.top1_agree_sum.double(),
                "num_correct": (s_logits.argmax(-1) == targets).sum().double(),
                "num_positions": torch.tensor(float(targets.numel()), dtype=torch.float64),
                "t_sum": batch.mask_rates[loss_mask].double().sum(),
            }
        return loss, stats

    def summarize_stats(self, sums: dict[str, float]) -> dict[str, float]:
        out = super().summarize_stats(sums)
        n = max(sums.get("num_positions", 0.0), 1.0)
        out.update({"ce_loss": sums["ce_sum"] / n, "kd_loss": sums["kd_sum"] / n,
                    "teacher_entropy": sums["teacher_entropy_sum"] / n, "top1_agree": sums["top1_agree_sum"] / n})
        return out

    def log_keys(self) -> tuple[str, ...]:
        return ("ce_loss", "kd_loss", "masked_acc", "top1_agree", "teacher_entropy", "mean_t")

    def finish_training(self) -> None:
        """Export the trained student as ``<run>/student_b<B>`` (not after a stop by signal: resume first)."""
        if self.bard.export_final:
            self.export_model(f"{self.checkpoint_root}/student_b{self.student_block}", block_size=self.student_block)


def main(config_path: str | None = None) -> None:
    """Entry for ``python -m nemo_bard.recipes.swd -c cfg.yaml`` (NeMo's script-style launchers)."""
    run_main(BardSWDRecipe, config_path)


if __name__ == "__main__":
    import nemo_bard.models.modeling_bard_vl  # noqa: F401  (registers bard_vl with the Auto classes)

    main()
