"""Padding-token fraction with and without packing, on the synthetic data and on LLaVA-665K-like lengths.

    .venv/bin/python bench/padding_report.py [--data data/synth/vqa_train.jsonl --checkpoint checkpoints/base-mlp]

Lengths are token counts with the image placeholders included. The LLaVA-like distribution is a simulation,
not the real file: 94% of samples carry one 576-token image (CLIP ViT-L/14-336) plus lognormal text around a
median of 120 tokens (multi-turn conversations make a long tail), 6% are text-only (ShareGPT-like, median 400),
all capped at max_length 2048. Padding is counted exactly as the collators would produce it
(`vlm.data.collate.padding_fraction`) for batches in random order, length-grouped order (LLaVA's
group_by_length) and packed into rows of <= max_length.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from vlm.data.collate import padding_fraction
from vlm.data.sampling import LengthGroupedSampler

IMAGE_TOKENS = 576


def llava_like_lengths(n: int = 20000, max_length: int = 2048, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    with_image = rng.random(n) < 0.94
    text = np.where(
        with_image, rng.lognormal(np.log(120), 0.9, n), rng.lognormal(np.log(400), 0.8, n)
    ).astype(int)
    lengths = np.clip(text + 8, 8, None) + with_image * IMAGE_TOKENS
    return np.minimum(lengths, max_length).tolist()


def report(lengths: list[int], batch_size: int, max_length: int, seed: int = 0) -> dict[str, float]:
    """Padding fractions of random-order batches, length-grouped batches and packed random-order batches."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    shuffled = [lengths[i] for i in order]
    grouped = LengthGroupedSampler(lengths, batch_size, seed).rank_order()
    return {
        "random": padding_fraction(shuffled, batch_size, pack=False, max_length=max_length),
        "length_grouped": padding_fraction(
            [lengths[i] for i in grouped], batch_size, pack=False, max_length=max_length
        ),
        "packed": padding_fraction(shuffled, batch_size, pack=True, max_length=max_length),
    }


def synthetic_lengths(
    path: str, checkpoint: str, template: str = "chatml", max_length: int = 512
) -> list[int]:
    """Token counts (placeholders included) of a LLaVA JSONL under a checkpoint's processor."""
    from vlm.data.records import load_llava_dataset
    from vlm.data.samples import SupervisedDataset
    from vlm.processing import VLMProcessor

    processor = VLMProcessor.from_pretrained(checkpoint)
    records = load_llava_dataset(path)
    return SupervisedDataset(records, processor, template, max_length=max_length, check_images=False).lengths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="a LLaVA JSONL to measure too")
    parser.add_argument("--checkpoint", default="checkpoints/base-mlp", help="whose processor counts tokens")
    parser.add_argument("--template", default="chatml")
    args = parser.parse_args()
    rows = {"llava-like (b=16, L=2048)": report(llava_like_lengths(), 16, 2048)}
    if args.data:
        lengths = synthetic_lengths(args.data, args.checkpoint, args.template, 512)
        rows[f"{args.data} (b=32, L=512)"] = report(lengths, 32, 512)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
