"""A run's data: sources -> encoded samples -> (mixed) -> sampled per rank -> collated micro-batches.

The position in the data is one number, `micro_batches_done` on this rank, so a resumed run continues from the
exact micro-batch the checkpoint was written after (the per-epoch order depends only on seed and epoch).
Images are decoded and preprocessed in `recipe.num_workers` DataLoader worker processes (vlm/data/loader.py).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..data.collate import Collator, PackingCollator
from ..data.encoded_index import EncodingIndex, resolve_data_cache
from ..data.epochs import EpochBatches
from ..data.loader import loader_seed, micro_batch_loader
from ..data.records import load_llava_dataset
from ..data.samples import EncodedRecords, SupervisedDataset, mix_datasets
from ..data.sampling import DistributedShuffleSampler, LengthGroupedSampler
from ..templates import resolve_template
from .recipe import Recipe

log = logging.getLogger("vlm.train")


class TrainData(EpochBatches):
    def __init__(
        self, recipe: Recipe, processor, rank: int, world_size: int, attn_implementation: str = "sdpa"
    ):
        self.recipe, self.rank = recipe, rank
        self.micro = recipe.micro_batch_size
        self.load_skipped: Counter[str] = Counter()  # counted from the batches, so exact for any num_workers
        started = time.time()
        self.dataset = self._dataset(recipe, processor)
        if rank == 0:
            log.info("training data: %d samples ready in %.1f s", len(self.dataset), time.time() - started)
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
            encoded = _encoded(recipe, source, processor, template)
            records = load_llava_dataset(source.path, image_root=source.image_root) if encoded is None else []
            parts.append(
                SupervisedDataset(
                    records,
                    processor,
                    template,
                    max_length=recipe.max_length,
                    on_error=recipe.on_bad_sample,
                    encoded=encoded,
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

    def iterate(self, micro_done: int = 0) -> Iterator[dict]:
        """Micro-batches from position `micro_done` to the end of the last epoch, from the DataLoader."""
        for batch in micro_batch_loader(
            self.dataset,
            self.collate,
            self.plan(micro_done),
            self.remaining(micro_done),
            num_workers=self.recipe.num_workers,
            seed=loader_seed(self.recipe.seed, self.rank, micro_done),
            pin_memory=torch.cuda.is_available(),
        ):
            self.load_skipped.update(reason for _, reason in batch["skipped"])
            yield batch

    def skipped_report(self) -> dict[str, int]:
        """Skipped samples by reason: at encoding (bad records) and at image loading (any process)."""
        return dict(_encoding_skips(self.dataset) + self.load_skipped)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _encoded(recipe: Recipe, source, processor, template: str) -> EncodedRecords | None:
    """The source's encoded records from the persisted index (vlm/data/encoded_index.py): built by each node's
    local rank 0 while the others wait, then read by all; None when recipe.data_cache is off."""
    if recipe.data_cache is None:
        return None
    index = EncodingIndex(
        resolve_data_cache(recipe.data_cache),
        source.path,
        source.image_root,
        processor,
        template,
        recipe.max_length,
    )
    if not index.exists() and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        encoded = index.build()
        _barrier()
        return encoded
    _barrier()
    return index.load() if index.exists() else index.build()  # a root this rank's node 0 could not write


def _encoding_skips(dataset) -> Counter[str]:
    """Construction-time skips of a dataset, a MixedDataset or a CachedFeatureDataset around either."""
    if hasattr(dataset, "datasets"):
        return sum((_encoding_skips(d) for d in dataset.datasets), Counter())
    if hasattr(dataset, "dataset"):
        return _encoding_skips(dataset.dataset)
    return Counter(dataset.skipped)


def build_train_data(
    recipe: Recipe, processor, rank: int, world_size: int, attn_implementation: str = "sdpa"
):
    return TrainData(recipe, processor, rank, world_size, attn_implementation)
