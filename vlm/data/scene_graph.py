"""CLEVR-style scene graphs for `vlm data synth --world scenes`: 1-6 objects, each with its own colour, shape, size
and position, none fully hidden (each keeps >= 60% of its pixels visible) and none touching an object of its own
colour (flat colours without outlines would merge into one blob); drawn with an optional background texture and
pixel noise.

Canvas: 64 px by default. Geometry is in fractions of the side: a small object's box is ~10 px, a large one
~17 px, two centres closer than ~4 px along an axis have no left/right (above/below) relation. To resolve six
objects the tower must see the image at 64 px: with patch 8 that is an 8 x 8 grid, 64 visual tokens per image
(the tiny presets' 32 px / patch 8 gives a 4 x 4 grid, 16 tokens, where a small object is under one patch).
The tower presets are unchanged; a recipe on this world sets the tower's image_size to 64.

A graph is plain JSON (the `scenes_<split>.jsonl` lines), so new probes can be generated from it later:
`{"id", "image", "width", "height", "background", "noise", "objects": [{"colour", "shape", "size", "box",
"centre", "visible"}, ...], "count"}`; `box` is [x0, y0, x1, y1] in inclusive pixels, `visible` the share of
the object's own pixels left uncovered by objects drawn after it (drawing order = list order).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .synth_text import COLOURS, SHAPES, SIZES

DEFAULT_CANVAS = 64
MIN_CANVAS = 48  # below this a small object is a few pixels and six no longer fit without heavy overlap
MAX_OBJECTS = 6
MIN_VISIBLE = (
    0.6  # each object keeps at least this share of its pixels visible: no full (or near-full) occlusion
)
RELATION_GAP = 0.06  # of the side: centres closer than this along an axis have no relation on that axis
BACKGROUNDS = ("plain", "grid", "stripes")
DEFAULT_HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("blue", "circle"),
    ("green", "square"),
)

_HALF_EXTENT = {"small": 0.08, "large": 0.13}
_PLACEMENT_TRIES = 50
_BACKGROUND_TONE = (236, 236, 236)  # texture lines: light grey, far from every object colour


def pair_of(obj: dict[str, Any]) -> str:
    """The object's colour-shape pair, "red circle": the unit of POPE objects and held-out combinations."""
    return f"{obj['colour']} {obj['shape']}"


def parse_pairs(value: str) -> tuple[tuple[str, str], ...]:
    """ "red:triangle,blue:circle" -> pairs; "" -> none. Unknown colours or shapes are errors."""
    pairs = []
    for item in (s.strip() for s in value.split(",")):
        if not item:
            continue
        colour, _, shape = item.partition(":")
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(
                f"held-out pair {item!r}: expected colour:shape with a colour in {', '.join(COLOURS)} and a shape "
                f"in {', '.join(SHAPES)}"
            )
        pairs.append((colour, shape))
    return tuple(pairs)


def _shape_mask(shape: str, box: Sequence[int], side: int) -> np.ndarray:
    mask = Image.new("L", (side, side), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, box, 255)
    return np.asarray(mask) > 0


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[int], fill: Any) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # triangle, apex up
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def visible_shares(objects: list[dict[str, Any]], side: int) -> list[float]:
    """Per object, the share of its pixels not covered by any object drawn after it."""
    masks = [_shape_mask(o["shape"], o["box"], side) for o in objects]
    covered = np.zeros((side, side), dtype=bool)
    shares = [0.0] * len(masks)
    for i in range(len(masks) - 1, -1, -1):
        area = int(masks[i].sum())
        shares[i] = float((masks[i] & ~covered).sum()) / max(area, 1)
        covered |= masks[i]
    return shares


def boxes_touch(a: Sequence[int], b: Sequence[int]) -> bool:
    """Boxes that overlap or share an edge: same-coloured objects there would merge into one blob (no
    outlines), so the generator keeps them apart."""
    return a[0] <= b[2] + 1 and b[0] <= a[2] + 1 and a[1] <= b[3] + 1 and b[1] <= a[3] + 1


def _attributes(rng: random.Random, banned: set[tuple[str, str]]) -> tuple[str, str, str]:
    while True:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if (colour, shape) not in banned:
            return colour, shape, rng.choice(SIZES)


def _place(
    rng: random.Random, objects: list[dict], colour: str, shape: str, size: str, side: int
) -> dict | None:
    """One object at a random position whose addition hides no object (this one included) beyond the bound and
    touches no object of its colour."""
    half = _HALF_EXTENT[size] * side
    for _ in range(_PLACEMENT_TRIES):
        cx, cy = rng.uniform(half + 1, side - half - 2), rng.uniform(half + 1, side - half - 2)
        box = [round(cx - half), round(cy - half), round(cx + half), round(cy + half)]
        obj = {"colour": colour, "shape": shape, "size": size, "box": box}
        if any(o["colour"] == colour and boxes_touch(o["box"], box) for o in objects):
            continue
        shares = visible_shares([*objects, obj], side)
        if min(shares) >= MIN_VISIBLE:
            obj["centre"] = [round((box[0] + box[2]) / 2, 1), round((box[1] + box[3]) / 2, 1)]
            return obj
    return None


def make_graph(
    rng: random.Random,
    scene_id: str,
    image: str,
    side: int,
    banned: Iterable[tuple[str, str]] = (),
    texture: bool = False,
    noise: float = 0.0,
) -> dict[str, Any]:
    """A scene of 1-6 objects; pairs in `banned` never appear (the training side of the held-out split)."""
    banned = set(banned)
    n = rng.randint(1, MAX_OBJECTS)
    objects: list[dict[str, Any]] = []
    while len(objects) < n:
        obj = _place(rng, objects, *_attributes(rng, banned), side)
        if obj is None:  # no room left for this one: a smaller scene, not an overlapping one
            break
        objects.append(obj)
    for obj, share in zip(objects, visible_shares(objects, side), strict=True):
        obj["visible"] = round(share, 3)
    background = rng.choice(BACKGROUNDS) if texture else "plain"
    return {
        "id": scene_id,
        "image": image,
        "width": side,
        "height": side,
        "background": background,
        "noise": noise,
        "noise_seed": rng.randrange(2**31),
        "count": len(objects),
        "objects": objects,
    }


def _background(kind: str, side: int) -> Image.Image:
    img = Image.new("RGB", (side, side), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    step = max(side // 8, 4)
    for k in range(0, side, step) if kind != "plain" else ():
        draw.line((k, 0, k, side), fill=_BACKGROUND_TONE)
        if kind == "grid":
            draw.line((0, k, side, k), fill=_BACKGROUND_TONE)
    return img


def draw_graph(graph: dict[str, Any]) -> Image.Image:
    side = graph["width"]
    img = _background(graph["background"], side)
    draw = ImageDraw.Draw(img)
    for obj in graph["objects"]:
        _draw_shape(draw, obj["shape"], obj["box"], COLOURS[obj["colour"]])
    return add_noise(img, graph["noise"], graph["noise_seed"])


def add_noise(img: Image.Image, std: float, seed: int, grey: bool = False) -> Image.Image:
    """Gaussian pixel noise of `std` (0-255 units), drawn from `seed`; `grey` uses one draw for R, G and B."""
    if std <= 0:
        return img
    pixels = np.asarray(img, dtype=np.float32)
    shape = pixels.shape[:2] + (1,) if grey else pixels.shape
    pixels += np.random.default_rng(seed).normal(0.0, std, shape)  # in float32, as scenes always drew it
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def relation(a: dict[str, Any], b: dict[str, Any], rel: str, side: int) -> bool | None:
    """Whether a is `rel` (left/right/above/below) of b, by centres; None when too close to tell."""
    axis = 0 if rel in ("left", "right") else 1
    delta = a["centre"][axis] - b["centre"][axis]
    if abs(delta) < RELATION_GAP * side:
        return None
    return delta < 0 if rel in ("left", "above") else delta > 0


def region(obj: dict[str, Any], side: int) -> str:
    """The object's place in a 3 x 3 grid: "top left", "top", ..., "centre", ..., "bottom right"."""
    col, row = (min(int(c / side * 3), 2) for c in obj["centre"])
    vertical, horizontal = ("top", "", "bottom")[row], ("left", "", "right")[col]
    return " ".join(w for w in (vertical, horizontal) if w) or "centre"
