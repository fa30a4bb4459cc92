"""Resumable epoch iteration: the position in a run's data is one number, the micro-batches done on this rank.

Shared by the language-model data (vlm/train/run_data.py) and stage 0's caption pairs (vlm/contrastive/data.py).
The per-epoch order depends only on seed and epoch, so a resumed run continues from the exact micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterator


class EpochBatches:
    """Resumable micro-batches: subclasses set `recipe`, `micro`, `sampler`, `batches_per_epoch` and `_batch`."""

    def epoch_of(self, micro_done: int) -> float:
        return micro_done / self.batches_per_epoch

    def remaining(self, micro_done: int) -> int:
        """Micro-batches `plan(micro_done)` yields."""
        return max(0, self.recipe.epochs * self.batches_per_epoch - micro_done)

    def plan(self, micro_done: int = 0) -> Iterator[list[int]]:
        """Each micro-batch's sample indices, from position `micro_done` to the end of the last epoch."""
        epoch, offset = divmod(micro_done, self.batches_per_epoch)
        for e in range(epoch, self.recipe.epochs):
            self.sampler.set_epoch(e)
            order = self.sampler.rank_order()
            for b in range(offset, self.batches_per_epoch):
                yield [int(i) for i in order[b * self.micro : (b + 1) * self.micro]]
            offset = 0

    def iterate(self, micro_done: int = 0) -> Iterator[dict]:
        """Micro-batches from position `micro_done` to the end of the last epoch, built in this process."""
        for indices in self.plan(micro_done):
            yield self._batch(indices)

    def _batch(self, indices: list[int]) -> dict:
        raise NotImplementedError
