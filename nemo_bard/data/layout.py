"""Block layout: processor batch -> BARD training batch (docs/method.md §2-§6).

``[prefix P | clean response R | noisy response R | batch padding]`` per sample, with the response
padded to a multiple of the block size with the pad token (default ``<|im_end|>``), mRoPE positions
over ``[prefix | clean]`` reused by the noisy copy, the §4 attention mask, per-sample noise (§5), and
loss positions / weights (§6). ``block_size`` is a plain attribute: the block-merge callback changes it
between steps.

Over-long samples: the response is truncated at a block boundary so that ``P + 2R <= max_length``;
a sample whose prompt leaves no room for one block is dropped (with its images) and counted. Image
tokens, which live in the prefix, are never cut.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import torch

from nemo_bard.attention.masks import CleanAttention, token_meta_mask, training_token_meta
from nemo_bard.data.noise import sample_noise
from nemo_bard.schema import NoiseSettings

logger = logging.getLogger(__name__)
MEDIA = (("pixel_values", "image_grid_thw", "n_images_per_sample"),
         ("pixel_values_videos", "video_grid_thw", "n_videos_per_sample"))

RopeFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class BlockBatch:
    """One BARD training micro-batch laid out at ``block_size`` (:meth:`BlockLayout.build`).

    ``inputs`` holds the model's forward keyword arguments as one mapping (like transformers' ``BatchFeature``):
    ``input_ids``, ``attention_mask`` (dense ``[N,1,L,L]`` or a FlexAttention ``BlockMask``), ``position_ids``
    (``[3,N,L]``), ``mm_token_type_ids`` and the processor's media tensors. The loss tensors are ``[N, L]``:
    ``targets`` (clean token at each loss position, -100 elsewhere), ``loss_mask`` (the masked noisy positions),
    ``loss_weights`` (1/t, times the padding factor on response padding) and ``mask_rates`` (t). The lengths and
    counts stay on the host, so the step's denominators and the SWD teacher's mask need no device sync.
    ``num_samples`` counts real samples: 0 for the placeholder a rank runs when all its samples were dropped.
    """

    inputs: dict[str, Any]
    targets: torch.Tensor
    loss_mask: torch.Tensor
    loss_weights: torch.Tensor
    mask_rates: torch.Tensor
    prefix_lens: torch.Tensor
    resp_lens: torch.Tensor
    block_size: int
    num_samples: int
    num_loss_tokens: int
    num_loss_samples: int
    num_dropped: int = 0
    num_skipped: int = 0

    @property
    def seq_len(self) -> int:
        """Columns of the layout (``max(P + 2R)`` plus any fake media tokens)."""
        return int(self.inputs["input_ids"].shape[1])


@dataclass(frozen=True)
class FakeMedia:
    """A minimal image (modality 1) or video (modality 2) that yields exactly one placeholder token."""

    modality: int
    token_id: int
    pixels: torch.Tensor
    grid_thw: torch.Tensor

    @classmethod
    def for_model(cls, config: Any, modality: int) -> "FakeMedia":
        """Zero pixels for a ``[1, merge, merge]`` patch grid of the model's vision tower."""
        vc = config.vision_config
        merge = vc.spatial_merge_size
        dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        token = config.image_token_id if modality == 1 else config.video_token_id
        return cls(modality, int(token), torch.zeros(merge * merge, dim), torch.tensor([[1, merge, merge]]))


def collated_batch(prefix_ids: torch.Tensor, prefix_lens: torch.Tensor, responses: Sequence[Sequence[int]], *,
                   mm_token_type_ids: torch.Tensor | None = None, media: Mapping[str, torch.Tensor] | None = None,
                   n_images: Sequence[int] | None = None, n_videos: Sequence[int] | None = None,
                   rows: Sequence[int] | None = None, num_skipped: int = 0) -> dict[str, Any]:
    """A collated micro-batch, the mapping :meth:`BlockLayout.build` reads (the collate's output; the one place its
    keys are spelled): right-padded prompt ids and lengths, their ``mm_token_type_ids`` (default: all text), the
    response ids (padded with -1) and lengths, the processor's media tensors (``pixel_values``, ``image_grid_thw``,
    ``pixel_values_videos``, ``video_grid_thw``) with the images and videos per sample, the dataset rows (-1:
    none) and the count of rows the collate skipped."""
    n = len(responses)
    response_ids = torch.full((n, max((len(r) for r in responses), default=0)), -1, dtype=torch.long)
    for i, r in enumerate(responses):
        response_ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    count = lambda values: torch.tensor(list(values) if values is not None else [0] * n, dtype=torch.long)  # noqa: E731
    return {
        "prefix_ids": prefix_ids, "prefix_lens": prefix_lens,
        "mm_token_type_ids": torch.zeros_like(prefix_ids) if mm_token_type_ids is None else mm_token_type_ids,
        "response_ids": response_ids, "response_lens": torch.tensor([len(r) for r in responses], dtype=torch.long),
        "n_images_per_sample": count(n_images), "n_videos_per_sample": count(n_videos),
        "rows": torch.tensor(list(rows) if rows is not None else [-1] * n, dtype=torch.long),
        "num_skipped": num_skipped, **(media or {}),
    }


def select_samples(batch: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """Keep the samples where ``keep`` is True, including their media rows."""
    out = dict(batch)
    for key in ("prefix_ids", "prefix_lens", "mm_token_type_ids", "response_ids", "response_lens",
                "n_images_per_sample", "n_videos_per_sample", "rows"):
        if key in out and isinstance(out[key], torch.Tensor):
            out[key] = out[key][keep]
    for pix_key, grid_key, count_key in MEDIA:
        if pix_key not in batch:
            continue
        grid, counts = batch[grid_key], batch[count_key]
        owner = torch.repeat_interleave(torch.arange(counts.numel()), counts)  # sample of each image
        keep_item = keep[owner]
        rows_per_item = grid.prod(-1)
        keep_rows = torch.repeat_interleave(keep_item, rows_per_item)
        if keep_item.any():
            out[pix_key], out[grid_key] = batch[pix_key][keep_rows], grid[keep_item]
        else:
            out.pop(pix_key)
            out.pop(grid_key)
    return out


@dataclass
class BlockLayout:
    """Builds BARD training batches at the current ``block_size``. The recipes build it from the validated
    ``bard:`` section (``BardSettings``); it does not check its values again.

    Args:
        block_size: B (changed live by ``BlockMergeCallback``).
        mask_token_id: id written into masked noisy positions.
        pad_token_id: response padding token (default: ``<|im_end|>``'s id, set by the recipe).
        max_length: longest ``P + 2R`` per sample (None: no limit).
        noise: noise prior (§5; SWD uses one rate per sample).
        clean_attention: ``block_causal`` (default, released checkpoints) or ``causal`` (ablation).
        mask_backend: ``dense`` (``[N,1,L,L]`` bool for SDPA/eager) or ``flex`` (a FlexAttention BlockMask).
        pad_weight: loss weight factor of response padding positions (§6: 0.5, i.e. t doubled).
        min_loss_t: optional clamp ``t >= min_loss_t`` inside the 1/t weight (None: no clamp).
        flex_compile: build Flex ``BlockMask`` objects with a compiled ``create_block_mask`` (GPU).
    """

    block_size: int
    mask_token_id: int
    pad_token_id: int
    max_length: int | None = None
    noise: NoiseSettings = field(default_factory=NoiseSettings)
    clean_attention: CleanAttention = "block_causal"
    mask_backend: Literal["dense", "flex"] = "dense"
    pad_weight: float = 0.5
    min_loss_t: float | None = None
    flex_compile: bool = False

    def response_lengths(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded response lengths R (multiples of B, truncated to fit) and a keep-mask for droppable samples."""
        b = self.block_size
        real = batch["response_lens"]
        padded = (real + b - 1) // b * b
        if self.max_length is None:
            return padded, torch.ones_like(real, dtype=torch.bool)
        room = (self.max_length - batch["prefix_lens"]) // (2 * b) * b
        return torch.minimum(padded, room.clamp_min(0)), room >= b

    def mask(self, prefix_lens: torch.Tensor, resp_lens: torch.Tensor, seq_len: int, block_size: int | None = None,
             device: torch.device | str | None = None) -> Any:
        """The attention mask of a laid-out batch at ``block_size`` (default: the live one), built on ``device``
        with this layout's backend, clean-attention mode and compilation (student and SWD teacher alike)."""
        kind, block = training_token_meta(prefix_lens, resp_lens, block_size or self.block_size, seq_len)
        if device is not None:
            kind, block = kind.to(device), block.to(device)
        return token_meta_mask(kind, block, self.clean_attention, self.mask_backend, self.flex_compile)

    def build(
        self, batch: dict[str, Any], seeds: list[int], rope_fn: RopeFn, fake_media: list[FakeMedia] = (),
        device: torch.device | str | None = None,
    ) -> BlockBatch:
        """Lay out, mask and noise a processor batch (the collate's mapping). ``seeds``: one noise seed per sample.

        The layout is computed on the CPU; every tensor the model and the loss read is then placed on
        ``device`` (default: the CPU) and the attention mask (dense or a Flex ``BlockMask``) is built there;
        lengths and counts stay on the host (see :class:`BlockBatch`).

        ``fake_media`` appends one isolated placeholder token per item after the batch (kind PAD: nothing
        attends it, it attends only itself), with its pixels, so this micro-batch runs the vision tower
        like the other data-parallel ranks' (FSDP needs every rank to run the same sharded modules).
        When every sample was dropped, the result is :meth:`placeholder`.
        """
        b = self.block_size
        resp_pad, keep = self.response_lengths(batch)
        num_dropped = int((~keep).sum())
        if num_dropped:
            logger.warning("dropped %d over-long sample(s): prompt + 2 blocks exceed max_length=%s",
                           num_dropped, self.max_length)
            batch = select_samples(batch, keep)
            resp_pad, seeds = resp_pad[keep], [s for s, k in zip(seeds, keep.tolist()) if k]
        p, r, real = batch["prefix_lens"], resp_pad, batch["response_lens"].clamp(max=resp_pad)
        n = p.shape[0]
        if n == 0:
            return self.placeholder(rope_fn, fake_media, device, num_dropped, batch.get("num_skipped", 0))
        width = int(r.max())
        cols = torch.arange(width)[None]
        resp = batch["response_ids"][:, :width] if batch["response_ids"].shape[1] >= width else torch.nn.functional.pad(
            batch["response_ids"], (0, width - batch["response_ids"].shape[1]), value=-1)
        clean = torch.where(cols < real[:, None], resp, torch.full_like(resp, self.pad_token_id))
        t, masked = sample_noise(r, b, width, seeds, self.noise)
        masked &= cols < r[:, None]
        noisy = torch.where(masked, torch.full_like(clean, self.mask_token_id), clean)

        length = int((p + 2 * r).max()) + len(fake_media)
        idx = torch.arange(length)[None]
        off_c, off_n = idx - p[:, None], idx - (p + r)[:, None]
        in_p, in_c = idx < p[:, None], (off_c >= 0) & (off_c < r[:, None])
        in_n = (off_n >= 0) & (off_n < r[:, None])
        take = lambda src, off: src.gather(1, off.clamp(0, src.shape[1] - 1))  # noqa: E731
        prefix_ids = batch["prefix_ids"]
        input_ids = torch.where(in_p, take(prefix_ids, idx.expand(n, -1)), torch.zeros_like(idx.expand(n, -1)))
        input_ids = torch.where(in_c, take(clean, off_c), input_ids)
        input_ids = torch.where(in_n, take(noisy, off_n), input_ids)
        mm = torch.where(in_p, take(batch["mm_token_type_ids"], idx.expand(n, -1)), torch.zeros_like(input_ids))

        # mRoPE positions over [prefix | clean]; the noisy copy reuses the clean positions
        pc_len = int((p + r).max())
        pc_mask = (idx[:, :pc_len] < (p + r)[:, None]).long()
        pos_pc, _ = rope_fn(
            input_ids[:, :pc_len] * pc_mask, pc_mask, mm[:, :pc_len],
            batch.get("image_grid_thw"), batch.get("video_grid_thw"),
        )
        pos = torch.zeros(3, n, length, dtype=torch.long)
        pos[:, :, :pc_len] = pos_pc * pc_mask
        noisy_src = (p[:, None] + off_n).clamp(0, pc_len - 1).expand(3, -1, -1)
        pos = torch.where(in_n[None], pos_pc.gather(2, noisy_src), pos)

        loss_mask = in_n & take(masked, off_n)
        tok_t = take(t, off_n).to(torch.float32)
        t_eff = tok_t if self.min_loss_t is None else tok_t.clamp_min(self.min_loss_t)
        weights = torch.where(loss_mask, 1.0 / t_eff.clamp_min(1e-12), torch.zeros_like(t_eff))
        is_pad = in_n & (off_n >= real[:, None])
        weights = torch.where(is_pad, weights * self.pad_weight, weights)
        targets = torch.where(loss_mask, take(clean, off_n), torch.full_like(input_ids, -100))

        inputs: dict[str, Any] = {"input_ids": input_ids, "position_ids": pos, "mm_token_type_ids": mm}
        for pix_key, grid_key, _ in MEDIA:
            if pix_key in batch:
                inputs[pix_key], inputs[grid_key] = batch[pix_key], batch[grid_key]
        for j, fake in enumerate(fake_media):
            col = length - len(fake_media) + j
            input_ids[0, col], mm[0, col] = fake.token_id, fake.modality
            pix_key, grid_key, _ = MEDIA[fake.modality - 1]
            if pix_key in inputs:
                raise ValueError(f"fake {pix_key} requested for a micro-batch that already has {pix_key}")
            inputs[pix_key], inputs[grid_key] = fake.pixels, fake.grid_thw
        mask_rates = torch.where(loss_mask, tok_t, torch.zeros_like(tok_t))
        num_loss_tokens, num_loss_samples = int(loss_mask.sum()), int(loss_mask.any(-1).sum())  # on the host
        move = (lambda t: t) if device is None else (lambda t: t.to(device, non_blocking=True))  # noqa: E731
        inputs = {k: move(v) for k, v in inputs.items()}
        inputs["attention_mask"] = self.mask(p, r, length, b, device)
        return BlockBatch(
            inputs=inputs, targets=move(targets), loss_mask=move(loss_mask), loss_weights=move(weights),
            mask_rates=move(mask_rates), prefix_lens=p, resp_lens=r, block_size=b, num_samples=n,
            num_loss_tokens=num_loss_tokens, num_loss_samples=num_loss_samples, num_dropped=num_dropped,
            num_skipped=batch.get("num_skipped", 0),
        )

    def placeholder(self, rope_fn: RopeFn, fake_media: list[FakeMedia] = (), device: torch.device | str | None = None,
                    num_dropped: int = 0, num_skipped: int = 0) -> BlockBatch:
        """A micro-batch with no sample: one block of padding and no loss position, which a rank whose samples were
        all dropped still runs, so that it takes part in the forward and backward the other data-parallel ranks
        run (FSDP collectives). ``num_samples`` is 0; the drop counts are carried."""
        pad = self.pad_token_id
        one = collated_batch(torch.tensor([[pad]]), torch.tensor([1]), [[pad]])
        built = dataclasses.replace(self, max_length=None).build(one, [0], rope_fn, fake_media, device)
        return dataclasses.replace(
            built, targets=torch.full_like(built.targets, -100), loss_mask=torch.zeros_like(built.loss_mask),
            loss_weights=torch.zeros_like(built.loss_weights), mask_rates=torch.zeros_like(built.mask_rates),
            num_samples=0, num_loss_tokens=0, num_loss_samples=0, num_dropped=num_dropped, num_skipped=num_skipped)
