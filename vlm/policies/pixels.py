"""Images -> pixel values under a policy: the crops each image becomes, normalised by the tower's processor.

Shared by the HF processor (training, `generate`) and the vLLM plugin, so both feed the tower the same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from .base import ImagePolicy


def tile_size_of(image_processor) -> int:
    """The square side (px) of the processor's output, found by processing a blank image."""
    pixels = image_processor(images=[Image.new("RGB", (8, 8))], return_tensors="pt")["pixel_values"]
    height, width = int(pixels.shape[-2]), int(pixels.shape[-1])
    if height != width:
        raise ValueError(
            f"image policies need a square tower input, the image processor gives {width}x{height}"
        )
    return height


def fill_colour(image_processor) -> tuple[int, int, int]:
    """The processor's mean as an RGB colour: padding in that colour normalises to (about) zero."""
    mean = getattr(image_processor, "image_mean", None) or (0.0, 0.0, 0.0)
    return tuple(int(round(255 * float(m))) for m in mean)


def policy_pixels(
    policy: ImagePolicy, image_processor, images: Sequence[Image.Image], tile_size: int, **kwargs: Any
) -> dict[str, Any]:
    """The image processor's output for every image's crops, concatenated in image order (n_crops, 3, S, S);
    a tiled policy adds `image_sizes` (n_images, 2) as (height, width), from which the layout is recomputed.
    The `single` policy is exactly the image processor on the images, as before policies existed."""
    if not policy.tiled:
        return image_processor(images, **kwargs)
    fill = fill_colour(image_processor)
    crops = [crop for image in images for crop in policy.crops(image, tile_size, fill)]
    out = image_processor(crops, **kwargs)
    sizes = [[image.height, image.width] for image in images]
    out["image_sizes"] = (
        torch.tensor(sizes, dtype=torch.long) if kwargs.get("return_tensors") == "pt" else sizes
    )
    return out
