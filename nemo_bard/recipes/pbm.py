"""Stage 1 — Progressive Block Merging.

``automodel finetune --config conf/bard_pbm.yaml``: masked-denoising fine-tuning of a ``bard_vl``
model with the block size growing on the ``block_merge`` schedule (4 -> 8 -> 16 -> 32 in one run).
"""

from __future__ import annotations

import torch

from nemo_bard.data.layout import BlockBatch
from nemo_bard.integrations.nemo import run_main
from nemo_bard.loss.denoise import MaskedDenoisingLoss
from nemo_bard.recipes.base import BardRecipeBase
from nemo_bard.recipes.config import BardConfigError


class BardPBMRecipe(BardRecipeBase):
    """NeMo VLM fine-tuning with the BARD block layout and the 1/t-weighted masked-denoising loss."""

    def check_sections(self) -> None:
        if self.sections.kd is not None:
            raise BardConfigError("kd is an SWD setting; remove it from the PBM config")

    def build_loss(self) -> MaskedDenoisingLoss:
        return MaskedDenoisingLoss(self.bard.loss)

    def forward_loss(
        self, model: torch.nn.Module, batch: BlockBatch, denominator: float, is_train: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss_mask = batch.loss_mask
        out = model(**batch.inputs, logits_mask=loss_mask)
        sample_ids = loss_mask.nonzero()[:, 0]
        res = self.loss_fn(out.logits, batch.targets[loss_mask], batch.loss_weights[loss_mask], sample_ids,
                           int(loss_mask.shape[0]), denominator)
        stats = {
            "num_correct": res.num_correct.double(),
            "num_positions": res.num_positions.double(),
            "t_sum": batch.mask_rates[loss_mask].double().sum(),
        }
        return res.loss, stats


def main(config_path: str | None = None) -> None:
    """Entry for ``python -m nemo_bard.recipes.pbm -c cfg.yaml`` (NeMo's script-style launchers)."""
    run_main(BardPBMRecipe, config_path)


if __name__ == "__main__":
    import nemo_bard.models.modeling_bard_vl  # noqa: F401  (registers bard_vl with the Auto classes)

    main()
