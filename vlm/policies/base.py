"""The interface every image policy implements, its typed config base, and patch pooling."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from PIL import Image

from ..registry import RegisteredConfig


@dataclasses.dataclass
class ImagePolicyConfig(RegisteredConfig):
    """Base of each policy's typed config; subclasses add their own fields. A field's default is what a
    config.json without it means (an old checkpoint has no `image_policy` at all: `single`, pool 1)."""

    kind: ClassVar[str] = "image policy"

    # Average-pool each crop's patch grid by `pool` x `pool` before the connector (1: off). It divides the
    # tokens of the linear/mlp connectors by pool**2; the Q-Former and Perceiver keep their query count.
    pool: int = 1

    def __post_init__(self):
        if isinstance(self.pool, bool) or not isinstance(self.pool, int) or self.pool < 1:
            raise ValueError(f"image_policy pool must be an integer >= 1, got {self.pool!r}")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one image is cut: the base crop, then a `rows` x `cols` grid of tiles (0 x 0: the base crop only)."""

    rows: int = 0
    cols: int = 0

    @property
    def n_crops(self) -> int:
        return 1 + self.rows * self.cols


class ImagePolicy:
    """Turns one image into tower crops (PIL images the image processor then normalises), and the connector's
    per-crop outputs back into the image's token sequence. Crops are in sequence order: the base crop first,
    then the tiles row-major; with `uses_newline`, a learned newline vector follows each row of tiles."""

    config_class: ClassVar[type[ImagePolicyConfig]]
    uses_newline: ClassVar[bool] = False
    # Whether the layout depends on the image: the processor then also emits `image_sizes` (height, width).
    tiled: ClassVar[bool] = False

    def __init__(self, config: ImagePolicyConfig):
        self.config = config

    # -- what subclasses define --------------------------------------------------------------------------------
    def layout(self, width: int, height: int, tile_size: int) -> Layout:
        raise NotImplementedError

    def layouts(self) -> list[Layout]:
        """Every layout the policy can choose (sizes the worst case: vLLM's encoder cache, dummy inputs)."""
        raise NotImplementedError

    def crops(self, image: Image.Image, tile_size: int, fill: tuple[int, int, int]) -> list[Image.Image]:
        """The image's crops; `fill`: the padding colour (the processor's mean, which normalises to 0)."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------------------
    def num_tokens(self, width: int, height: int, tile_size: int, tokens_per_crop: int) -> int:
        return self.layout_tokens(self.layout(width, height, tile_size), tokens_per_crop)

    def layout_tokens(self, layout: Layout, tokens_per_crop: int) -> int:
        return layout.n_crops * tokens_per_crop + (layout.rows if self.uses_newline else 0)

    def largest_layout(self, tokens_per_crop: int) -> Layout:
        return max(self.layouts(), key=lambda lay: self.layout_tokens(lay, tokens_per_crop))

    def assemble(
        self, crop_embeds: torch.Tensor, layout: Layout, newline: torch.Tensor | None
    ) -> torch.Tensor:
        """(n_crops, N, D) connector outputs of one image -> (num_tokens, D): base, then each row of tiles
        (its tiles left to right) followed by `newline` when the policy uses one."""
        if crop_embeds.shape[0] != layout.n_crops:
            raise ValueError(
                f"the {layout.rows}x{layout.cols} layout takes {layout.n_crops} crops, got {crop_embeds.shape[0]}"
            )
        if not self.uses_newline or layout.rows == 0:
            return crop_embeds.reshape(-1, crop_embeds.shape[-1])
        if newline is None:
            raise ValueError(f"image policy {self.config.type!r} needs the connector's image_newline vector")
        parts = [crop_embeds[0]]
        row_tile = newline.to(crop_embeds.dtype).reshape(1, -1)
        for r in range(layout.rows):
            row = crop_embeds[1 + r * layout.cols : 1 + (r + 1) * layout.cols]
            parts += [row.reshape(-1, row.shape[-1]), row_tile]
        return torch.cat(parts, dim=0)


def pool_patches(features: torch.Tensor, pool: int) -> torch.Tensor:
    """(B, P, D) features of a square patch grid -> (B, P / pool**2, D), averaged over pool x pool blocks."""
    if pool == 1:
        return features
    batch, n, dim = features.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(
            f"image_policy pool {pool} needs a square patch grid, got {n} features (a kept CLS token? use "
            f"vision_feature_select_strategy 'default')"
        )
    grid = features.transpose(1, 2).reshape(batch, dim, side, side)
    pooled = torch.nn.functional.avg_pool2d(grid, pool)
    return pooled.flatten(2).transpose(1, 2)


def pooled_patch_count(num_patches: int, pool: int) -> int:
    """Features per crop after `pool_patches`; the pool must divide the grid's side exactly."""
    if pool == 1:
        return num_patches
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"image_policy pool {pool} needs a square patch grid, got {num_patches} patches (a kept CLS token? "
            f"use vision_feature_select_strategy 'default')"
        )
    if side % pool:
        raise ValueError(
            f"image_policy pool {pool} must divide the tower's patch grid side ({side} patches per side)"
        )
    return (side // pool) ** 2
