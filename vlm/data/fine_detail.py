"""The fine-detail task (issue 19): a large canvas holding one tiny digit, whose identity is the answer.

The digit is a 5x7 px bitmap glyph (1 px strokes) at the same place in one of the 2x2 cells of an 8 px grid
around the canvas centre, like one character printed on a form, on a `size` x `size` canvas (default 128) with
grey Gaussian pixel noise (default std 20). Under `anyres` with a 4x4 grid of 32 px tiles the cells lie at
the corners of the four middle tiles, at the canvas' native resolution, where one patch of the tiny tower holds
the whole glyph. (At arbitrary pixel offsets a 2-layer tower's patches split the strokes: a linear probe of its
frozen features reads 22% of digits there, 100% in the grid.) Resized to the tower's 32 px (the `single`
policy) the glyph is averaged over 4x4 px blocks. The ink and background levels vary per image, so the amount
of ink does not give the digit away.

Why the noise: without it the downscaled smudge still holds the digit. Probes of the frozen stage-0 tower
(`bench/detail_probe.py`) read 0.995 of clean 96 px digits through the single resize, and 0.93 (linear) / 0.99
(MLP) of clean 128 px ones; the 96 px `single` arm learned 0.53 of them in 3 epochs. Averaging 16 pixels shrinks
a stroke's contrast 16-fold but the noise only 4-fold: with std 20 the probes read 0.40 / 0.36 through the
resize and 0.96 from the native tile (std 10: 0.52 / 0.995; std 40: 0.25 / 0.84; BENCHMARKS.md, "High
resolution").

Training and held-out images come from separate seed streams, as in the other worlds; the records are
short-answer VQA (`question_type: digit`), so `vlm eval --task vqa` scores them with their own slice.

`detail_small_train` is a curriculum source: the same noisy digits on a 32 px canvas, the tiny tower's own
size, so each glyph is readable in one crop. Trained beside it, the LLM learns what a digit's patch means from
16 tokens and then finds it among the many of a tiled canvas; without it, a 96 px canvas stayed at chance
through 530-800 steps, with 4 candidate cells or 16. Nothing is evaluated at 32 px.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from . import synth_text as text
from .scene_graph import add_noise

DEFAULT_SIZE = 128
DEFAULT_NOISE = 20.0  # grey-level std: the strokes stay clear at native resolution, not once averaged 4x4
SMALL_SIZE = 32  # the curriculum canvas: the tiny tower's input size
GLYPH_W, GLYPH_H = 5, 7
QUESTION_TYPE = "digit"
DIGITS = tuple("0123456789")
FILES = ("detail_train", "detail_eval", "detail_small_train")
IMAGE_DIR = "images/detail"

# Classic 5x7 dot-matrix digits, one string of 5 columns per row ("#": ink).
_FONT = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}

# Training phrasings; the held-out ones recombine the same words and appear only in the eval file.
QUESTIONS = (
    "What digit is written in the image?",
    "Which digit is shown in the picture?",
    "Read the small digit in the image.",
    "What number is written in the picture?",
    "Which digit can you see?",
    "What is the tiny digit in the image?",
)
HELDOUT_QUESTIONS = (
    "Which number is shown in the image?",
    "What digit can you read in the picture?",
)
CELL = 8  # the grid the glyph sits in: the tiny tower's patch size
MIN_SIZE = 2 * CELL


def _rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"fine-detail/{seed}/{split}/{index}")


def draw_digit(
    digit: str, size: int, rng: random.Random, noise: float = DEFAULT_NOISE
) -> tuple[Image.Image, tuple[int, int]]:
    """A size x size canvas with `digit` drawn once at a random place and grey pixel noise of std `noise`;
    returns it and the glyph's top left."""
    background = rng.randint(200, 255)
    ink = rng.randint(0, 90)
    image = Image.new("RGB", (size, size), (background,) * 3)
    centre = size // 2 // CELL  # one of the 2x2 cells around the canvas centre
    x = CELL * rng.randrange(centre - 1, centre + 1) + 1  # the same place in every cell, as a font's box
    y = CELL * rng.randrange(centre - 1, centre + 1)
    pixels = image.load()
    for row, line in enumerate(_FONT[digit]):
        for col, cell in enumerate(line):
            if cell == "#":
                pixels[x + col, y + row] = (ink,) * 3
    return add_noise(image, noise, rng.randrange(2**31), grey=True), (x, y)


def _record(split: str, index: int, size: int, noise: float, rng: random.Random) -> tuple[dict, Image.Image]:
    digit = rng.choice(DIGITS)
    image, (x, y) = draw_digit(digit, size, rng, noise)
    heldout = split == "eval" and rng.random() < 0.5
    question = rng.choice(HELDOUT_QUESTIONS if heldout else QUESTIONS)
    rid = f"detail-{split}-{index:06d}"
    record = {
        "id": rid,
        "image": f"{IMAGE_DIR}/{split}/{rid}.png",
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}\n{text.SHORT_ANSWER}"},
            {"from": "gpt", "value": digit},
        ],
        "question_type": QUESTION_TYPE,
        "image_size": size,
        "glyph_box": [x, y, GLYPH_W, GLYPH_H],
    }
    if split == "eval":
        record["phrasing"] = "heldout" if heldout else "seen"
    return record, image


def _check_args(n: int, n_eval: int, size: int, noise: float) -> None:
    for name, value in (("--fine-detail", n), ("fine-detail eval count", n_eval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive number of images, got {value!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(f"--fine-detail-size must be an integer >= {MIN_SIZE} px, got {size!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= 255:
        raise ValueError(f"--fine-detail-noise must be a pixel std in 0-255, got {noise!r}")


def generate(
    root: str | Path,
    n: int,
    seed: int = 0,
    n_eval: int | None = None,
    size: int = DEFAULT_SIZE,
    noise: float = DEFAULT_NOISE,
    progress: bool = True,
) -> dict[str, Path]:
    """Write n training and n_eval held-out digit images with their records under root, and list the two
    files in root's manifest.json (which `vlm data synth` has written just before). Returns their paths."""
    n_eval = max(1, n // 5) if n_eval is None else n_eval
    _check_args(n, n_eval, size, noise)
    root = Path(root)
    paths = {name: root / f"{name}.jsonl" for name in FILES}
    n_small = max(1, n // 2)
    splits = (("train", n, size), ("eval", n_eval, size), ("small_train", n_small, SMALL_SIZE))
    with tqdm(total=n + n_eval + n_small, desc="fine-detail images", unit="img", disable=not progress) as bar:
        for split, count, side in splits:
            (root / IMAGE_DIR / split).mkdir(parents=True, exist_ok=True)
            lines = []
            for i in range(count):
                record, image = _record(split, i, side, noise, _rng(seed, split, i))
                image.save(root / record["image"], format="PNG")
                lines.append(json.dumps(record, ensure_ascii=False))
                bar.update(1)
            paths[f"detail_{split}"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    counts = {f"detail_{s}": count for s, count, _ in splits}
    _add_to_manifest(root / "manifest.json", counts, size, noise)
    return paths


def _add_to_manifest(path: Path, counts: dict[str, int], size: int, noise: float) -> None:
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    files = manifest.setdefault("files", {})
    for name, count in counts.items():
        files[name] = {"path": f"{name}.jsonl", "records": count}
    manifest["fine_detail"] = {
        "canvas": size,
        "small_canvas": SMALL_SIZE,
        "glyph": [GLYPH_W, GLYPH_H],
        "noise": noise,
        "answers": list(DIGITS),
        "questions": list(QUESTIONS),
        "heldout_questions": list(HELDOUT_QUESTIONS),
    }
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
