"""Deterministic synthetic scenes: 1-3 copies of one coloured shape on white, one copy per quadrant.

The task is known to be learnable by a tiny model with a random frozen tower (see
shared/notes/tiny-model-learning.md). Each scene draws from its own RNG seeded by (seed, split, index), so
the output is byte-identical for a seed, train and eval never share a stream, and scene i does not depend
on n (a run with n=100 is a prefix of one with n=2000).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from tqdm import tqdm

from . import multi_image, pope
from . import synth_mix as mix
from . import synth_para as para
from . import synth_text as text
from .synth_records import SceneText, eval_records, scene_text, train_records
from .synth_text import COLOURS, QUADRANTS, QUESTION_TYPES, SHAPES, SIZES

__all__ = [
    "COLOURS",
    "SHAPES",
    "QUADRANTS",
    "SIZES",
    "QUESTION_TYPES",
    "Scene",
    "SceneText",
    "make_scene",
    "draw_scene",
    "iter_scenes",
    "generate",
    "corpus_texts",
]

DEFAULT_IMAGE_SIZES: tuple[int, ...] = (32, 48, 64)
MIN_IMAGE_SIZE = 16  # below this a small shape is a couple of pixels and the quadrant margins vanish
FORMAT_VERSION = 2  # 2: paraphrased captions, 5 references, the stage 2 mix, lm_train, held-out phrasings

# Geometry as fractions of the image side, so a 64 px image resized to 32 px is the same picture.
_HALF_EXTENT = {"small": 0.14, "large": 0.20}  # half the bounding box; small is still 9 px at 32 px
_MARGIN = 0.05  # keeps every shape strictly inside its quadrant
# Quadrant centres as (x, y) fractions, in QUADRANTS order.
_QUADRANT_CENTRES = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}


@dataclass
class Scene:
    id: str
    image: str  # relative to the output directory (the image root)
    width: int
    height: int
    shape: str
    colour: str
    size: str
    quadrants: list[str]  # canonical QUADRANTS order
    count: int
    boxes: list[list[int]]  # per copy, same order as quadrants: [x0, y0, x1, y1], inclusive pixel bounds

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its recursive deep copy was a third of `corpus_texts`' time.
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def _scene_rng(seed: int, split: str, index: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so this is stable across runs and PYTHONHASHSEED.
    return random.Random(f"vlm.synth/{seed}/{split}/{index}")


def make_scene(rng: random.Random, scene_id: str, image: str, image_sizes: Sequence[int]) -> Scene:
    side = rng.choice(list(image_sizes))
    shape = rng.choice(SHAPES)
    colour = rng.choice(list(COLOURS))
    size = rng.choice(SIZES)
    count = rng.randint(1, 3)
    quadrants = [QUADRANTS[i] for i in sorted(rng.sample(range(len(QUADRANTS)), count))]
    half = _HALF_EXTENT[size] * side
    jitter = max(0.0, (0.25 - _MARGIN) * side - half)  # how far the centre may move inside the quadrant
    boxes = []
    for q in quadrants:
        fx, fy = _QUADRANT_CENTRES[q]
        cx = fx * side + rng.uniform(-jitter, jitter)
        cy = fy * side + rng.uniform(-jitter, jitter)
        boxes.append([round(cx - half), round(cy - half), round(cx + half), round(cy + half)])
    return Scene(scene_id, image, side, side, shape, colour, size, quadrants, count, boxes)


def draw_scene(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.width, scene.height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    fill = COLOURS[scene.colour]
    for x0, y0, x1, y1 in scene.boxes:
        if scene.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif scene.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # triangle, apex up; its bounding-box centre lies inside it
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img


# ---- writing -------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # a crash never leaves a half-written file under the real name


def _check_args(n: int, n_eval: int, image_sizes: Sequence[int]) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (number of training images) must be an integer >= 1, got {n!r}")
    if not isinstance(n_eval, int) or n_eval < 0:
        raise ValueError(f"n_eval must be an integer >= 0, got {n_eval!r}")
    if not image_sizes or any(not isinstance(s, int) or s < MIN_IMAGE_SIZE for s in image_sizes):
        raise ValueError(
            f"image_sizes must be a non-empty list of integers >= {MIN_IMAGE_SIZE}, got {image_sizes!r}"
        )


def default_n_eval(n: int) -> int:
    return max(n // 10, 50)


def iter_scenes(
    n: int, seed: int = 0, split: str = "train", image_sizes: Sequence[int] = DEFAULT_IMAGE_SIZES
) -> Iterator[tuple[Scene, SceneText]]:
    """Scenes (with their drawn text) of one split, without touching the disk."""
    for i in range(n):
        rng = _scene_rng(seed, split, i)
        scene_id = f"{split}-{i:06d}"
        scene = make_scene(rng, scene_id, f"images/{split}/{scene_id}.png", image_sizes)
        yield scene, scene_text(rng, scene)


# Every file `generate` writes, by name (<name>.jsonl). Training: stage 1 reads caption_train, stage 2 mixes the
# STAGE2_SOURCES by weight (stages/stage2*.yaml), `make lm` reads lm_train. Eval: held-out scenes only.
STAGE2_SOURCES = (
    "vqa_train",  # short-answer VQA, LLaVA-1.5's single-word-or-phrase instruction, multi-turn per image
    "yesno_train",  # balanced yes/no existence, POPE-style negatives, from training scenes (pope.py)
    "caption_train",  # short captions, one paraphrase per sample (also stage 1's data)
    "describe_train",  # detailed descriptions: every object with colour, size, shape and position
    "conversation_train",  # multi-turn talk about one image, full-sentence answers
    "text_train",  # text-only instruction samples, no image (LLaVA mixes in ShareGPT text)
)
FILES = (
    "scenes_train",
    "scenes_eval",
    *STAGE2_SOURCES,
    "lm_train",  # text-only language-pretraining corpus (`make lm`): descriptions, dialogue, instructions
    "caption_eval",  # 5 reference captions per image (COCO-style)
    "describe_eval",  # 5 reference detailed descriptions per image
    "vqa_eval",  # one question per record; `phrasing`: seen or heldout (a wording no training record uses)
    "pope_eval",  # POPE-style yes/no hallucination probe over the eval scenes (vlm/data/pope.py)
    "multi_train",  # 2 or 4 training scenes per record, one short-answer question about them (multi_image.py)
    "multi_eval",  # the same from eval scenes, one question each; `question_type` multi_*, `num_images`
)


def _manifest(seed: int, image_sizes: tuple[int, ...], n: int, n_eval: int, out: dict[str, list]) -> dict:
    return {
        "generator": "vlm.data.synth",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "image_sizes": list(image_sizes),
        "n_train_images": n,
        "n_eval_images": n_eval,
        "image_dirs": {"train": "images/train", "eval": "images/eval"},
        "files": {name: {"path": f"{name}.jsonl", "records": len(out[name])} for name in FILES},
        "stage2_sources": list(STAGE2_SOURCES),
        "answers": {qt: list(v) for qt, v in text.ANSWERS.items()},
        "short_answer_instruction": text.SHORT_ANSWER,
        "heldout_questions": {qt: list(v) for qt, v in text.HELDOUT_QUESTIONS.items()},
        "multi_image": multi_image.manifest_entry("shapes"),
    }


def generate(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    n_eval: int | None = None,
    image_sizes: Sequence[int] = DEFAULT_IMAGE_SIZES,
    progress: bool = True,
) -> dict[str, Path]:
    """Write n training and n_eval held-out scenes plus their LLaVA records under out_dir.

    Returns paths keyed by "root", "manifest", "images_train", "images_eval" and the FILES names.
    """
    n_eval = default_n_eval(n) if n_eval is None and isinstance(n, int) else n_eval
    image_sizes = tuple(image_sizes)
    _check_args(n, n_eval, image_sizes)
    root = Path(out_dir)
    paths: dict[str, Path] = {"root": root, "manifest": root / "manifest.json"}
    for split in ("train", "eval"):
        paths[f"images_{split}"] = root / "images" / split
        paths[f"images_{split}"].mkdir(parents=True, exist_ok=True)
    paths.update({name: root / f"{name}.jsonl" for name in FILES})

    out: dict[str, list[dict]] = {name: [] for name in FILES}
    with tqdm(total=n + n_eval, desc="synth images", unit="img", disable=not progress) as bar:
        for split, count in (("train", n), ("eval", n_eval)):
            records = train_records if split == "train" else eval_records
            for scene, st in iter_scenes(count, seed, split, image_sizes):
                draw_scene(scene).save(root / scene.image, format="PNG")
                out[f"scenes_{split}"].append(scene.to_dict())
                for name, recs in records(scene, st, seed).items():
                    out[name] += recs
                bar.update(1)
    out["yesno_train"] = pope.training_records(out["scenes_train"], seed)
    out["pope_eval"] = pope.pope_records(out["scenes_eval"], seed)
    out |= multi_image.records("shapes", out["scenes_train"], out["scenes_eval"], seed)
    for name in FILES:
        _write_jsonl(paths[name], out[name])
    manifest = _manifest(seed, image_sizes, n, n_eval, out)
    paths["manifest"].write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return paths


def _covering_facts() -> Iterator[para.Facts]:
    """Scenes whose paraphrases, taken together, use every word any paraphrase can: each shape and size at each
    count, every quadrant, every colour."""
    subsets = [(q,) for q in QUADRANTS] + [QUADRANTS[:2], QUADRANTS[1:]]
    for i, (shape, size, quads) in enumerate((s, z, q) for s in SHAPES for z in SIZES for q in subsets):
        yield para.Facts(shape, list(COLOURS)[i % len(COLOURS)], size, tuple(quads))


def _fixed_texts() -> list[str]:
    texts = list(text.CAPTION_INSTRUCTIONS) + list(text.DESCRIBE_INSTRUCTIONS) + [text.SHORT_ANSWER]
    for questions in (text.QUESTIONS, text.HELDOUT_QUESTIONS):  # held-out wordings are vocabulary too
        texts += [q for qs in questions.values() for q in qs]
    texts += [q.format(pope.with_article(o)) for q in text.YESNO_QUESTIONS for o in pope.ALL_OBJECTS]
    texts += [a for answers in text.ANSWERS.values() for a in answers] + ["yes", "no"]
    for shape in SHAPES:
        for colour in COLOURS:
            for size in SIZES:
                for mask in range(1, 2 ** len(QUADRANTS)):
                    quads = [q for i, q in enumerate(QUADRANTS) if mask >> i & 1]
                    if len(quads) <= 3:
                        texts.append(text.caption(shape, colour, size, quads))
    for f in _covering_facts():
        texts += list(para.variants("caption", f)) + list(para.variants("description", f))
    return texts + mix.corpus_strings()


def _record_texts(records: Iterable[dict]) -> Iterator[str]:
    for r in records:
        for turn in r["conversations"]:
            yield turn["value"].replace("<image>\n", "")


def corpus_texts(n: int = 2000, seed: int = 0) -> list[str]:
    """Text for tokenizer training (no "<image>" token): every instruction, question (held-out ones included),
    answer and caption the generator can emit, and every word of every paraphrase (so coverage is guaranteed,
    not sampled), followed by the training text of n scenes for realistic word frequencies.
    """
    texts = _fixed_texts()
    scenes = []
    for scene, st in iter_scenes(n, seed, "train", DEFAULT_IMAGE_SIZES):
        scenes.append(scene.to_dict())
        for records in train_records(scene, st, seed).values():
            texts += _record_texts(records)
    return texts + list(_record_texts(pope.training_records(scenes, seed)))
