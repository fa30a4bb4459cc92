"""Image-caption pairs for stage 0, and the image loading shared by training, zero-shot, retrieval and embedding.

Pairs come from LLaVA caption records (the first assistant turn is the caption), e.g. data/synth/caption_*.jsonl.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

from PIL import Image

from ..data.epochs import EpochBatches
from ..data.sampling import DistributedShuffleSampler
from .model import tokenize

log = logging.getLogger("vlm.contrastive")


@dataclasses.dataclass(frozen=True)
class Pair:
    id: str
    image: str  # absolute path
    caption: str


def open_image(path: str | Path) -> Image.Image:
    """An RGB image, or a ValueError naming the file and what is wrong with it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except OSError as err:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise ValueError(f"unreadable image {path}: {err}") from None


def load_pairs(path: str | Path, image_root: str | Path | None = None) -> list[Pair]:
    """(id, image, caption) from a LLaVA caption file; records without one image or an answer are errors."""
    from ..data.records import load_llava_dataset

    pairs = []
    for record in load_llava_dataset(path, image_root=image_root):
        answers = [t["value"] for t in record["conversations"] if t["from"] in ("gpt", "assistant")]
        if len(record["images"]) != 1 or not answers:
            raise ValueError(f"{path}: record {record['id']!r} needs exactly one image and a caption answer")
        pairs.append(Pair(record["id"], record["images"][0], answers[0].strip()))
    if not pairs:
        raise ValueError(f"{path}: no image-caption pairs")
    return pairs


def readable(pairs: list[Pair], on_bad: str) -> tuple[list[Pair], Counter]:
    """Checked once up front, so every micro-batch is full (ranks gather equal-sized batches)."""
    good, skipped = [], Counter()
    for pair in pairs:
        try:
            with Image.open(pair.image) as img:
                img.verify()
        except (OSError, SyntaxError) as err:
            if on_bad == "raise":
                raise ValueError(
                    f"sample {pair.id}: unreadable image {pair.image} ({err}); fix it or set on_bad_sample=skip"
                ) from None
            skipped["unreadable image"] += 1
            continue
        good.append(pair)
    return good, skipped


class PairData(EpochBatches):
    """Micro-batches of (pixel_values, input_ids, attention_mask), resumable like vlm/train/run_data.TrainData."""

    def __init__(self, recipe, tokenizer, image_processor, rank: int, world_size: int):
        self.recipe, self.tokenizer, self.image_processor = recipe, tokenizer, image_processor
        self.micro = recipe.micro_batch_size
        pairs = [p for source in recipe.data for p in load_pairs(source.path, source.image_root)]
        self.pairs, self.skipped = readable(pairs, recipe.on_bad_sample)
        per_step = self.micro * recipe.gradient_accumulation(world_size)
        self.sampler = DistributedShuffleSampler(len(self.pairs), per_step, recipe.seed, world_size, rank)
        self.batches_per_epoch = self.sampler.epoch_length // self.micro

    def _batch(self, indices: list[int]) -> dict:
        return self.batch([self.pairs[i] for i in indices])

    def batch(self, pairs: list[Pair]) -> dict:
        pixels = self.image_processor([open_image(p.image) for p in pairs], return_tensors="pt")
        texts = tokenize(self.tokenizer, [p.caption for p in pairs], self.recipe.max_length)
        return {"ids": [p.id for p in pairs], "pixel_values": pixels["pixel_values"], **texts}

    def skipped_report(self) -> dict[str, int]:
        return dict(self.skipped)
