"""A run's data: sources -> encoded samples -> (mixed) -> sampled per rank -> collated micro-batches.

The position in the data is one number, `micro_batches_done` on this rank, so a resumed run continues from the
exact micro-batch the checkpoint was written after (the per-epoch order depends only on seed and epoch).
"""

from __future__ import annotations

import logging

from ..data.collate import Collator, PackingCollator
from ..data.epochs import EpochBatches
from ..data.records import load_llava_dataset
from ..data.samples import SupervisedDataset, mix_datasets
from ..data.sampling import DistributedShuffleSampler, LengthGroupedSampler
from ..templates import resolve_template
from .recipe import Recipe

log = logging.getLogger("vlm.train")


class TrainData(EpochBatches):
    def __init__(
        self, recipe: Recipe, processor, rank: int, world_size: int, attn_implementation: str = "sdpa"
    ):
        self.recipe = recipe
        self.micro = recipe.micro_batch_size
        self.dataset = self._dataset(recipe, processor)
        accum = recipe.gradient_accumulation(world_size)
        # One sampler batch = this rank's share of one optimizer step, so the global batches are the same for
        # any process count with the same global batch size.
        per_step = self.micro * accum
        if recipe.group_by_length and not recipe.pack:
            self.sampler = LengthGroupedSampler(self.dataset.lengths, per_step, recipe.seed, world_size, rank)
        else:  # packing works better on shuffled lengths (the packer groups them itself)
            self.sampler = DistributedShuffleSampler(
                len(self.dataset), per_step, recipe.seed, world_size, rank
            )
        self.batches_per_epoch = self.sampler.epoch_length // self.micro
        pad_id = getattr(
            processor, "tokenizer", processor
        ).pad_token_id  # a processor, or a tokenizer (text data)
        self.collate = self._collator(recipe, pad_id, attn_implementation)

    @staticmethod
    def _dataset(recipe: Recipe, processor):
        parts = []
        template = resolve_template(recipe.template, processor.chat_template)
        for source in recipe.data:
            records = load_llava_dataset(source.path, image_root=source.image_root)
            parts.append(
                SupervisedDataset(
                    records,
                    processor,
                    template,
                    max_length=recipe.max_length,
                    on_error=recipe.on_bad_sample,
                )
            )
        if len(parts) == 1:
            return parts[0]
        return mix_datasets(parts, [s.weight for s in recipe.data], seed=recipe.seed)

    @staticmethod
    def _collator(recipe: Recipe, pad_id: int, attn_implementation: str):
        if not recipe.pack:
            return Collator(pad_id)
        # flash-attn reads sample boundaries from position_ids; eager adds the mask to the scores (float mask);
        # SDPA takes a boolean block-diagonal mask.
        mask = {"flash_attention_2": "none", "eager": "float"}.get(attn_implementation, "bool")
        return PackingCollator(pad_id, max_length=recipe.max_length, mask=mask)

    def _batch(self, indices: list[int]) -> dict:
        items = [self.dataset[i] for i in indices]
        batch = self.collate(items)
        if batch is None:
            # Skip mode dropped every sample of this micro-batch; the ranks must step together, so stop clearly.
            ids = [getattr(item, "id", None) for item in items]  # all are SkippedSample here
            raise ValueError(f"every sample of a micro-batch was unreadable: {ids}")
        return batch

    def skipped_report(self) -> dict[str, int]:
        """Skipped samples by reason: at encoding (bad records) and at image loading (this process)."""
        return dict(self.dataset.skip_report())


def build_train_data(
    recipe: Recipe, processor, rank: int, world_size: int, attn_implementation: str = "sdpa"
):
    return TrainData(recipe, processor, rank, world_size, attn_implementation)
