"""`anyres` (LLaVA-NeXT): a base thumbnail of the whole image, then a grid of tower-sized tiles.

The grid is the one of `grids` ((rows, cols) shapes) that shows the image at the most effective resolution, the
least padding breaking ties (LLaVA-NeXT's `select_best_resolution`, with a candidate of rows x cols tiles being
(cols * tile) x (rows * tile) px). The image is resized into that canvas keeping its aspect ratio, centred,
padded with the processor's mean colour (normalised: 0), and cut into tiles row-major. The base thumbnail is
the whole image resized to one tile (aspect not kept), as LLaVA-NeXT's base image. A learned newline vector
follows each row of tiles, so the LLM can tell the layout from the sequence alone.

Tokens per image: (1 + rows * cols) * tokens_per_crop + rows.
"""

from __future__ import annotations

import dataclasses
import math

from PIL import Image

from .base import ImagePolicy, ImagePolicyConfig, Layout
from .registry import register_image_policy

# LLaVA-NeXT's default pinpoints for a 336 px tower (336x672, 672x336, 672x672, 1008x336, 336x1008) as tiles.
DEFAULT_GRIDS = ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1))


def _grid_pair(value, index: int) -> list[int]:
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    )
    if not ok:
        raise ValueError(
            f"image_policy grids[{index}] must be [rows, cols] with two integers >= 1, got {value!r}"
        )
    return [int(value[0]), int(value[1])]


@dataclasses.dataclass
class AnyResConfig(ImagePolicyConfig):
    grids: list = dataclasses.field(default_factory=lambda: [list(g) for g in DEFAULT_GRIDS])

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.grids, (list, tuple)) or not self.grids:
            raise ValueError(
                f"image_policy grids must be a non-empty list of [rows, cols] shapes, got {self.grids!r}"
            )
        grids = [_grid_pair(g, i) for i, g in enumerate(self.grids)]
        seen = set()
        for i, g in enumerate(grids):
            if tuple(g) in seen:
                raise ValueError(f"image_policy grids[{i}] {g} is listed twice")
            seen.add(tuple(g))
        self.grids = grids  # lists, as config.json holds them


def best_grid(width: int, height: int, grids: list[list[int]], tile_size: int) -> tuple[int, int]:
    """(rows, cols) of the grid showing a width x height image at the most effective resolution."""
    best, best_key = None, None
    for rows, cols in grids:
        canvas_w, canvas_h = cols * tile_size, rows * tile_size
        scale = min(canvas_w / width, canvas_h / height)
        shown = min(int(width * scale) * int(height * scale), width * height)
        key = (shown, -(canvas_w * canvas_h - shown))  # most effective pixels, then least waste
        if best_key is None or key > best_key:
            best, best_key = (rows, cols), key
    return best


@register_image_policy("anyres")
class AnyResPolicy(ImagePolicy):
    config_class = AnyResConfig
    uses_newline = True
    tiled = True

    def layout(self, width: int, height: int, tile_size: int) -> Layout:
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height} px")
        if max(width, height) < tile_size:
            raise ValueError(
                f"image {width}x{height} px is smaller than one {tile_size} px tile on both sides; the anyres "
                f"policy needs at least one side of {tile_size} px or more"
            )
        return Layout(*best_grid(width, height, self.config.grids, tile_size))

    def layouts(self) -> list[Layout]:
        return [Layout(rows, cols) for rows, cols in self.config.grids]

    def crops(self, image: Image.Image, tile_size: int, fill: tuple[int, int, int]) -> list[Image.Image]:
        image = image.convert("RGB")
        width, height = image.size
        layout = self.layout(width, height, tile_size)
        base = image.resize((tile_size, tile_size), Image.Resampling.BICUBIC)
        canvas_w, canvas_h = layout.cols * tile_size, layout.rows * tile_size
        if canvas_w / width < canvas_h / height:
            new_w, new_h = canvas_w, min(canvas_h, math.ceil(height * canvas_w / width))
        else:
            new_w, new_h = min(canvas_w, math.ceil(width * canvas_h / height)), canvas_h
        canvas = Image.new("RGB", (canvas_w, canvas_h), fill)
        resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        canvas.paste(resized, ((canvas_w - new_w) // 2, (canvas_h - new_h) // 2))
        tiles = [
            canvas.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
            for r in range(layout.rows)
            for c in range(layout.cols)
        ]
        return [base, *tiles]
