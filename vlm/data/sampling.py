"""Distributed, resumable samplers: length-grouped (LLaVA's `group_by_length`, simplified) and plain shuffle.

Both build one *global* order per (seed, epoch), cut it into global batches of `batch_size x world_size`, and
give rank r the strided slice `global_batch[r::world_size]` of each. So:
- every rank yields the same number of indices (the order is padded by wrapping around to a whole number of
  global batches, or trimmed with drop_last), and the ranks' shards are disjoint apart from that padding;
- the union over ranks of one global batch does not depend on world_size as long as batch_size x world_size
  stays the same: pass batch_size = samples this rank contributes per optimizer step (micro batch x gradient
  accumulation) and a 1-process run sees the same global batches as an N-process one;
- resuming is exact: `state_dict()` / `load_state_dict()` or `skip(n)` restart the epoch's order at a sample
  position, and the resumed indices equal the rest of the uninterrupted sequence.

The position that `state_dict()` records is what this sampler has yielded. With DataLoader(num_workers=0) the
loader pulls indices only as batches are requested, so that equals what the trainer consumed. With workers > 0
the loader prefetches, so the sampler runs ahead: pass the trainer's own count, `state_dict(consumed=...)`.
Call `set_epoch(e)` at the start of each epoch; it keeps a loaded position when e is the loaded epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

__all__ = ["LengthGroupedSampler", "DistributedShuffleSampler"]


class _ResumableSampler(Sampler[int]):
    kind = "base"

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ):
        if num_samples < 1:
            raise ValueError("the sampler needs at least one sample")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, world_size={world_size}, rank={rank}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.drop_last = drop_last
        self.global_batch = batch_size * world_size
        if drop_last and num_samples < self.global_batch:
            raise ValueError(
                f"drop_last with {num_samples} samples < one global batch ({self.global_batch}): no data"
            )
        n_global = num_samples // self.global_batch if drop_last else -(-num_samples // self.global_batch)
        self.epoch_length = n_global * batch_size  # indices per rank per epoch
        self.epoch = 0
        self._start = 0  # where the next __iter__ begins (one-shot, set by load_state_dict / skip)
        self._position = 0  # indices of this epoch yielded so far, including a resumed start

    # -- order ---------------------------------------------------------------------------------------------
    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def _fit(self, order: np.ndarray) -> np.ndarray:
        """Trim (drop_last) or wrap-pad the order to whole global batches."""
        size = self.epoch_length * self.world_size
        return order[:size] if self.drop_last else np.resize(order, size)

    def _global_batches(self) -> np.ndarray:
        """(n_global_batches, global_batch) indices for the current epoch."""
        raise NotImplementedError

    def rank_order(self) -> np.ndarray:
        """This rank's full index order for the current epoch (ignores any resume position)."""
        batches = self._global_batches()
        return batches[:, self.rank :: self.world_size].reshape(-1)

    # -- iteration -----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[int]:
        order = self.rank_order()
        start, self._start = self._start, 0
        self._position = start
        for i in order[start:]:
            self._position += 1
            yield int(i)

    def __len__(self) -> int:
        return self.epoch_length - self._start

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._start = self._position = 0

    # -- resume --------------------------------------------------------------------------------------------
    def skip(self, num_samples: int) -> None:
        """Start the next iteration num_samples further into this epoch (this rank's samples, not batches)."""
        self._seek(self._start + num_samples)

    def _seek(self, position: int) -> None:
        if not 0 <= position <= self.epoch_length:
            raise ValueError(f"position {position} outside this epoch's {self.epoch_length} samples per rank")
        self._start = self._position = position

    def _identity(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
        }

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """{"epoch", "position", ...}. consumed: this rank's samples of the epoch that the trainer has used
        (default: what the sampler has yielded, exact for num_workers=0)."""
        position = self._position if consumed is None else consumed
        return {**self._identity(), "epoch": self.epoch, "position": position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mismatched = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if mismatched:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(
                f"cannot resume the data order: the sampler differs from the saved one ({detail}); the saved "
                f"position only means something for the same data, seed, batch size and process count"
            )
        self.epoch = int(state["epoch"])
        self._seek(int(state["position"]))


class DistributedShuffleSampler(_ResumableSampler):
    """A seeded permutation per epoch, sharded by global batch (see the module docstring)."""

    kind = "shuffle"

    def _global_batches(self) -> np.ndarray:
        order = self._fit(self._rng().permutation(self.num_samples))
        return order.reshape(-1, self.global_batch)


class LengthGroupedSampler(_ResumableSampler):
    """Batches of similar length, in random order, deterministic per (seed, epoch).

    A seeded permutation is cut into megabatches of `megabatch_mult` global batches; each megabatch is sorted
    by length (longest first) and cut into global batches, whose order is then shuffled. The global batch with
    the longest sample goes first, so an out-of-memory shows at step 1, not hours in. Within a global batch,
    ranks take strided slices of the sorted samples, so their lengths (and step times) stay balanced.
    """

    kind = "length_grouped"

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        megabatch_mult: int = 50,
    ):
        super().__init__(len(lengths), batch_size, seed, world_size, rank, drop_last)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.megabatch_mult = megabatch_mult

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "megabatch_mult": self.megabatch_mult}

    def _global_batches(self) -> np.ndarray:
        rng = self._rng()
        order = self._fit(rng.permutation(self.num_samples))
        mega = self.global_batch * self.megabatch_mult
        groups = []
        for start in range(0, len(order), mega):
            chunk = order[start : start + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            groups.append(chunk.reshape(-1, self.global_batch))
        batches = np.concatenate(groups)
        batches = batches[rng.permutation(len(batches))]
        longest = int(np.argmax(self.lengths[batches].max(axis=1)))
        batches[[0, longest]] = batches[[longest, 0]]
        return batches
