"""Batching: padding (`Collator`) and sequence packing that keeps samples from attending to each other.

Both collators take the items of `SupervisedDataset` (dicts), drop `None` and `SkippedSample` items, list the
skipped ones as `(id, reason)` under `batch["skipped"]` (not a model input: see `model_inputs`), and
return None when nothing is left. `pixel_values` holds the batch's images concatenated in the order their
placeholders appear row-major (the order the model consumes them), an empty (0, 3, H, W) tensor when the batch
has no image (see `_image_inputs`).

Packing (`PackingCollator`): samples are concatenated into rows of at most max_length tokens.
- `position_ids` restart at 0 for each sample, so RoPE sees the same positions as unpacked.
- attention is block-diagonal causal. mask="bool" gives a (rows, 1, L, L) bool mask, True = may attend, which
  transformers passes to SDPA unchanged (a 4D mask skips its own mask building). mask="float" gives the
  additive form (0 / dtype min) that the eager path needs: eager *adds* the mask to the scores, so a bool mask
  there would be silently wrong. mask="none" leaves attention_mask out: transformers >= 5 then derives the
  block-diagonal mask from the position_ids resets itself (sdpa/eager/flex), and flash_attention_2 turns them
  into cu_seqlens (varlen kernels). That detection needs `use_cache=False` in the forward call: the models
  default to config.use_cache=True, build a DynamicCache, and then skip the detection, so the samples silently
  attend to each other. The 4D masks are used as given, cache or not.
- padding at the end of a row is its own segment (positions 0.., attends only to itself), so no row of the
  mask is all-False (SDPA would return NaN there), and its labels are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from ..constants import IGNORE_INDEX
from .samples import SkippedSample

__all__ = [
    "BOOKKEEPING_KEYS",
    "Collator",
    "PackingCollator",
    "block_causal_mask",
    "model_inputs",
    "pack_samples",
    "padding_fraction",
]

# Batch entries that are not model inputs: pass the rest to the model with `model_inputs(batch)`.
BOOKKEEPING_KEYS = ("ids", "skipped", "n_samples", "seq_lengths", "token_sources")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without its bookkeeping entries (ids, skipped, n_samples, seq_lengths, token_sources), for
    `model(**...)`."""
    return {k: v for k, v in batch.items() if k not in BOOKKEEPING_KEYS}


def _split_skipped(samples: Sequence[Any]) -> tuple[list[dict], list[tuple[Any, str]]]:
    kept, skipped = [], []
    for s in samples:
        if s is None:
            skipped.append((None, "unknown"))
        elif isinstance(s, SkippedSample):
            skipped.append((s.id, s.reason))
        else:
            kept.append(s)
    return kept, skipped


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _image_inputs(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """{"pixel_values": ...}, or {"image_features": ...} for samples served from a feature cache.

    A batch without images keeps an empty (0, ...) tensor of its kind rather than None: the model then runs the
    tower and connector on one blank image for a zero loss term, so every rank takes part in ZeRO-3's
    collectives (VLMForConditionalGeneration._zero_image_term)."""
    if samples and "pixel_values" not in samples[0] and "image_features" not in samples[0]:
        return {}  # text-only datasets (language pretraining, vlm/data/text.py): the LLM alone gets the batch
    key = "image_features" if samples and "image_features" in samples[0] else "pixel_values"
    out = {key: torch.cat([s[key] for s in samples], dim=0)}
    if samples and "image_sizes" in samples[0]:
        # A tiled image policy: each image's (height, width), in the same order, lays out its crops.
        out["image_sizes"] = torch.cat([s["image_sizes"] for s in samples], dim=0)
    return out


class Collator:
    """Pads a list of samples into input_ids, attention_mask (B, L), labels (IGNORE_INDEX on padding),
    pixel_values, ids, token_sources ((B, L) the source index of each sample's tokens, -1 on padding: for the
    per-source loss) and skipped (see the module docstring)."""

    def __init__(
        self,
        pad_token_id: int,
        padding_side: Literal["right", "left"] = "right",
        pad_to_multiple_of: int | None = None,
    ):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any] | None:
        samples, skipped = _split_skipped(samples)
        if not samples:
            return None
        length = _round_up(max(len(s["input_ids"]) for s in samples), self.pad_to_multiple_of)
        n = len(samples)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        token_sources = torch.full((n, length), -1, dtype=torch.long)
        for row, s in enumerate(samples):
            k = len(s["input_ids"])
            cols = slice(0, k) if self.padding_side == "right" else slice(length - k, length)
            input_ids[row, cols] = s["input_ids"]
            labels[row, cols] = s["labels"]
            attention_mask[row, cols] = 1
            token_sources[row, cols] = s.get("source", 0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            **_image_inputs(samples),
            "ids": [s["id"] for s in samples],
            "skipped": skipped,
            "seq_lengths": [len(s["input_ids"]) for s in samples],
            "token_sources": token_sources,
        }


def pack_samples(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group sample indices into rows of total length <= max_length: first-fit decreasing, deterministic.

    Rows are in creation order; inside a row, samples are in placement order (longest first).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens > max_length {max_length}; it cannot be packed")
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max_length - n)
    return rows


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) segment ids -> (B, 1, L, L) bool: True where query i may attend key j (same segment, j <= i)."""
    length = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return (same & causal)[:, None]


class PackingCollator:
    """Packs a list of samples into as few rows of <= max_length tokens as fit (see `pack_samples`).

    Output: input_ids, labels, position_ids (R, L); attention_mask per `mask` ("bool": (R, 1, L, L) True =
    attend, for SDPA; "float": additive (R, 1, L, L) in `dtype`, for eager; "none": no key, for
    flash_attention_2 or transformers' own packed detection from position_ids); pixel_values; ids (in packed
    order); token_sources (R, L) as in `Collator`; skipped; n_samples.
    """

    def __init__(
        self,
        pad_token_id: int,
        max_length: int,
        pad_to_multiple_of: int | None = None,
        mask: Literal["bool", "float", "none"] = "bool",
        dtype: torch.dtype = torch.float32,
    ):
        if mask not in ("bool", "float", "none"):
            raise ValueError(f"mask must be 'bool', 'float' or 'none', got {mask!r}")
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.mask = mask
        self.dtype = dtype

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any] | None:
        samples, skipped = _split_skipped(samples)
        if not samples:
            return None
        rows = pack_samples([len(s["input_ids"]) for s in samples], self.max_length)
        width = _round_up(
            max(sum(len(samples[i]["input_ids"]) for i in row) for row in rows), self.pad_to_multiple_of
        )
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((n, width), dtype=torch.long)
        segments = torch.zeros((n, width), dtype=torch.long)
        token_sources = torch.full((n, width), -1, dtype=torch.long)
        ordered: list[dict] = []
        for r, row in enumerate(rows):
            at = 0
            for seg, i in enumerate(row):
                s = samples[i]
                k = len(s["input_ids"])
                input_ids[r, at : at + k] = s["input_ids"]
                labels[r, at : at + k] = s["labels"]
                # The loss predicts labels[t + 1] from position t. Ignoring each sample's first label means
                # the previous sample's last token is never trained to predict this sample's first token;
                # unpacked, that first label is never a target either, so the loss is unchanged.
                labels[r, at] = IGNORE_INDEX
                position_ids[r, at : at + k] = torch.arange(k)
                segments[r, at : at + k] = seg
                token_sources[r, at : at + k] = s.get("source", 0)
                at += k
                ordered.append(s)
            position_ids[r, at:] = torch.arange(width - at)  # padding: one more segment of its own
            segments[r, at:] = len(row)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            **_image_inputs(ordered),  # row-major placeholder order = packed order
            "ids": [s["id"] for s in ordered],
            "skipped": skipped,
            "n_samples": len(ordered),
            "seq_lengths": [len(s["input_ids"]) for s in ordered],
            "token_sources": token_sources,
        }
        if self.mask != "none":
            allowed = block_causal_mask(segments)
            if self.mask == "bool":
                batch["attention_mask"] = allowed
            else:
                zero = torch.zeros((), dtype=self.dtype)
                batch["attention_mask"] = torch.where(allowed, zero, torch.finfo(self.dtype).min)
        return batch


def padding_fraction(
    lengths: Sequence[int],
    batch_size: int,
    pack: bool,
    max_length: int,
    pad_to_multiple_of: int | None = None,
) -> float:
    """Fraction of padding tokens when `lengths` (in loader order) are batched batch_size at a time, each
    batch padded to its longest row (pack=False: `Collator`), or packed into rows of <= max_length first
    (pack=True: `PackingCollator`). Mirrors the collators exactly: reportable without running them."""
    lengths = list(lengths)
    real = padded = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start : start + batch_size]
        if pack:
            row_lengths = [sum(chunk[i] for i in row) for row in pack_samples(chunk, max_length)]
        else:
            row_lengths = chunk
        real += sum(chunk)
        padded += len(row_lengths) * _round_up(max(row_lengths), pad_to_multiple_of)
    return 0.0 if padded == 0 else float(1 - real / padded)
