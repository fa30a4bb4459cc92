"""Micro-batches through a torch DataLoader: image decode, preprocessing and collation in worker processes.

The order stays the trainer's: `PlanSampler` yields, in the main process, the index lists of
`EpochBatches.plan(micro_done)` (a function of seed, epoch and the resume position only), and each worker turns
one list into one collated micro-batch (`MicroBatches`). The DataLoader hands batches back in sampler order
whatever the worker count, so num_workers=0 and num_workers=N yield the same batches, and a resumed run yields
the rest of the uninterrupted sequence.

Errors travel as data: a `SampleError` raised in a worker (on_bad_sample=raise) comes back inside `_Failed`
and is raised again in the trainer, unchanged, so the message still names the sample and the file.

Worker RNGs: the loader's `generator` is seeded from (seed, rank, resume position); torch derives each worker's
torch, `random` and NumPy seeds from it and the worker id, so they are fixed for a given run start, and batches
go to workers round-robin, so any augmentation drawing from them is reproducible (tested). (A resumed
run reseeds from its own start position: reproducible, but not the uninterrupted run's draws.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .samples import SampleError

__all__ = ["MicroBatches", "PlanSampler", "loader_seed", "micro_batch_loader"]

PREFETCH_FACTOR = 2  # micro-batches each worker keeps ready: one in flight while the step runs, one spare


@dataclass
class _Failed:
    """A worker's SampleError (or an all-skipped micro-batch), raised again in the main process."""

    error: Exception


class MicroBatches(Dataset):
    """Item `indices` (a list of sample indices) = those samples, loaded and collated into one micro-batch."""

    def __init__(self, dataset: Dataset, collate):
        self.dataset, self.collate = dataset, collate

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> dict | _Failed:
        try:
            items = [self.dataset[i] for i in indices]
        except SampleError as err:
            return _Failed(err)
        batch = self.collate(items)
        if batch is None:
            # Skip mode dropped every sample; the ranks must step together, so stop clearly.
            ids = [getattr(item, "id", None) for item in items]  # all are SkippedSample here
            return _Failed(ValueError(f"every sample of a micro-batch was unreadable: {ids}"))
        return batch


class PlanSampler(Sampler[list[int]]):
    """Yields the precomputed plan's index lists (runs in the main process; the plan is lazy)."""

    def __init__(self, plan: Iterable[list[int]], length: int):
        self.plan, self.length = plan, length

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.plan)

    def __len__(self) -> int:
        return self.length


def _as_is(batch):  # module level: workers must unpickle the collate_fn
    return batch


def micro_batch_loader(
    dataset: Dataset,
    collate,
    plan: Iterable[list[int]],
    length: int,
    num_workers: int,
    seed: int,
    pin_memory: bool = False,
) -> Iterator[dict]:
    """Collated micro-batches for `plan` (index lists), in plan order, loaded by `num_workers` processes
    (0: in this process). A worker's SampleError is raised here."""
    generator = torch.Generator()
    # Seeded explicitly: without a generator, every DataLoader iterator draws its base seed from the global
    # torch RNG, which would shift the training RNG (dropout) by one draw per loader.
    generator.manual_seed(seed)
    loader = DataLoader(
        MicroBatches(dataset, collate),
        sampler=PlanSampler(plan, length),
        batch_size=None,  # the sampler's items are whole micro-batches
        collate_fn=_as_is,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=PREFETCH_FACTOR if num_workers > 0 else None,
        pin_memory=pin_memory,
        generator=generator,
    )
    for batch in loader:
        if isinstance(batch, _Failed):
            raise batch.error
        yield batch


def loader_seed(seed: int, rank: int, micro_done: int) -> int:
    """The loader generator's seed: a function of the run's seed, the rank and where this run starts."""
    return int(np.random.SeedSequence([seed, rank, micro_done]).generate_state(1)[0])
