"""`single`: one crop per image, the image processor's own resize (and centre crop): the stack's behaviour
before image policies existed, and what a checkpoint without an `image_policy` key means."""

from __future__ import annotations

import dataclasses

from PIL import Image

from .base import ImagePolicy, ImagePolicyConfig, Layout
from .registry import register_image_policy


@dataclasses.dataclass
class SingleConfig(ImagePolicyConfig):
    pass


@register_image_policy("single")
class SinglePolicy(ImagePolicy):
    config_class = SingleConfig

    def layout(self, width: int, height: int, tile_size: int) -> Layout:
        return Layout()

    def layouts(self) -> list[Layout]:
        return [Layout()]

    def crops(self, image: Image.Image, tile_size: int, fill: tuple[int, int, int]) -> list[Image.Image]:
        return [image]  # the image processor resizes it exactly as before policies existed
