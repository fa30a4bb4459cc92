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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from tqdm import tqdm

from . import pope
from . import synth_text as text
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
FORMAT_VERSION = 1

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
        return asdict(self)

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


# ---- records -------------------------------------------------------------------------------------------


def _turns(pairs: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    """(question, answer) pairs -> LLaVA turns; the first human turn carries the image token."""
    turns: list[dict[str, str]] = []
    for i, (q, a) in enumerate(pairs):
        turns.append({"from": "human", "value": ("<image>\n" + q) if i == 0 else q})
        turns.append({"from": "gpt", "value": a})
    return turns


def _question_order(rng: random.Random, scene: Scene) -> list[str]:
    order = ["colour", "shape", "count"] + (["position"] if scene.count == 1 else [])
    rng.shuffle(order)
    return order


def _dialogue(qa: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The training dialogue: position is asked only of single shapes, so a position turn before the count turn
    would give the count away; such a dialogue drops its count question. Position must still come first
    sometimes: eval asks it first, and a tiny LLM does not carry a skill to a distance from the image it never
    saw in training."""
    kinds = [qt for qt, _, _ in qa]
    if "position" in kinds and kinds.index("position") < kinds.index("count"):
        return [t for t in qa if t[0] != "count"]
    return qa


@dataclass
class SceneText:
    """The text drawn for one scene: caption instruction and (question type, question, answer) triples."""

    instruction: str
    caption: str
    qa: list[tuple[str, str, str]]


def _scene_text(rng: random.Random, scene: Scene) -> SceneText:
    instruction = rng.choice(text.CAPTION_INSTRUCTIONS)
    cap = text.caption(scene.shape, scene.colour, scene.size, scene.quadrants)
    qa = [
        (qt, rng.choice(text.QUESTIONS[qt]), text.answer(qt, scene.shape, scene.colour, scene.quadrants))
        for qt in _question_order(rng, scene)
    ]
    return SceneText(instruction, cap, qa)


def iter_scenes(
    n: int, seed: int = 0, split: str = "train", image_sizes: Sequence[int] = DEFAULT_IMAGE_SIZES
) -> Iterator[tuple[Scene, SceneText]]:
    """Scenes (with their drawn text) of one split, without touching the disk."""
    for i in range(n):
        rng = _scene_rng(seed, split, i)
        scene_id = f"{split}-{i:06d}"
        scene = make_scene(rng, scene_id, f"images/{split}/{scene_id}.png", image_sizes)
        yield scene, _scene_text(rng, scene)


def _eval_fields(scene: Scene, answer: str, question_type: str) -> dict[str, Any]:
    return {
        "answers": [answer],
        "question_type": question_type,
        "num_objects": scene.count,
        "image_size": scene.width,
        "scene_id": scene.id,
    }


def _train_records(scene: Scene, st: SceneText) -> tuple[dict, dict]:
    cap = {"id": scene.id, "image": scene.image, "conversations": _turns([(st.instruction, st.caption)])}
    vqa = {
        "id": scene.id,
        "image": scene.image,
        "conversations": _turns((q, a) for _, q, a in _dialogue(st.qa)),
    }
    return cap, vqa


def _eval_records(scene: Scene, st: SceneText) -> tuple[list[dict], list[dict]]:
    """One question per record; the gpt turn is the reference answer."""
    cap = {
        "id": scene.id,
        "image": scene.image,
        "conversations": _turns([(st.instruction, st.caption)]),
        **_eval_fields(scene, st.caption, "caption"),
    }
    vqa = [
        {
            "id": f"{scene.id}-{qt}",
            "image": scene.image,
            "conversations": _turns([(q, a)]),
            **_eval_fields(scene, a, qt),
        }
        for qt, q, a in sorted(st.qa, key=lambda t: QUESTION_TYPES.index(t[0]))
    ]
    return [cap], vqa


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


FILES = (
    "scenes_train",
    "scenes_eval",
    "caption_train",
    "vqa_train",
    "caption_eval",
    "vqa_eval",
    "pope_eval",  # POPE-style yes/no hallucination probe over the eval scenes (vlm/data/pope.py)
)


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
            for scene, st in iter_scenes(count, seed, split, image_sizes):
                draw_scene(scene).save(root / scene.image, format="PNG")
                out[f"scenes_{split}"].append(scene.to_dict())
                if split == "train":
                    cap, vqa = _train_records(scene, st)
                    out["caption_train"].append(cap)
                    out["vqa_train"].append(vqa)
                else:
                    caps, vqas = _eval_records(scene, st)
                    out["caption_eval"] += caps
                    out["vqa_eval"] += vqas
                bar.update(1)
    out["pope_eval"] = pope.pope_records(out["scenes_eval"], seed)
    for name in FILES:
        _write_jsonl(paths[name], out[name])

    manifest = {
        "generator": "vlm.data.synth",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "image_sizes": list(image_sizes),
        "n_train_images": n,
        "n_eval_images": n_eval,
        "image_dirs": {"train": "images/train", "eval": "images/eval"},
        "files": {name: {"path": f"{name}.jsonl", "records": len(out[name])} for name in FILES},
        "answers": {qt: list(v) for qt, v in text.ANSWERS.items()},
    }
    paths["manifest"].write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return paths


def corpus_texts(n: int = 2000, seed: int = 0) -> list[str]:
    """Caption, instruction, question and answer strings for tokenizer training (no "<image>" token).

    Enumerates every template, answer and caption the generator can produce (so coverage is guaranteed,
    not sampled), followed by the text of n training scenes for realistic word frequencies.
    """
    texts: list[str] = list(text.CAPTION_INSTRUCTIONS)
    texts += [q for qs in text.QUESTIONS.values() for q in qs]
    texts += [a for answers in text.ANSWERS.values() for a in answers]
    for shape in SHAPES:
        for colour in COLOURS:
            for size in SIZES:
                for mask in range(1, 2 ** len(QUADRANTS)):
                    quads = [q for i, q in enumerate(QUADRANTS) if mask >> i & 1]
                    if len(quads) <= 3:
                        texts.append(text.caption(shape, colour, size, quads))
    for _, st in iter_scenes(n, seed, "train", DEFAULT_IMAGE_SIZES):
        texts += [st.instruction, st.caption]
        for _, q, a in st.qa:
            texts += [q, a]
    return texts
