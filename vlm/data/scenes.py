"""`vlm data synth --world scenes`: CLEVR-style scenes with question families and a held-out-pair split.

Writes the same layout as the shapes world (vlm/data/synth.py: FILES, manifest.json, images/{train,eval}), so
the stage recipes run on `--out data/scenes` unchanged; the scene files hold full scene graphs (scene_graph.py)
from which new probes can be generated later.

The tower must see 64 px to resolve six objects: at patch 8 that is 64 visual tokens per image (the tiny
presets' 32 px give 16). See scene_graph.py for the geometry.

Held-out combinations (as CLEVR's CoGenT): colour-shape pairs in `heldout_pairs` never appear in training scenes,
nor in any training text (no question or yes/no negative names one, so "held-out pair -> no" is not learnable);
eval scenes draw every pair, and each eval question says whether it involves one (`pair: heldout | seen`), so
`vlm eval` reports the drop as the slices pair=heldout vs pair=seen.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import multi_image, pope, scene_records, scene_text
from . import scene_questions as sq
from . import synth_text as text
from .scene_graph import (
    DEFAULT_CANVAS,
    DEFAULT_HELDOUT_PAIRS,
    MIN_CANVAS,
    draw_graph,
    make_graph,
)
from .synth import FILES, STAGE2_SOURCES, _scene_rng, _write_jsonl, default_n_eval

FORMAT_VERSION = 1
_DEFAULT_HELDOUT = {f"{c} {s}" for c, s in DEFAULT_HELDOUT_PAIRS}
# Sample lengths at a 64 px tower (64 visual tokens), tiny tokenizer: the stage 2 sources fit the recipes' 256,
# but a six-object caption sample is up to ~141 tokens, past stage1.yaml's 128: stage 1 on this world needs
# max_length=160 on its command line (tests/test_scenes.py measures both).
MAX_LENGTH = {"stage1": 160, "stage2": 256}
VISUAL_TOKENS_NOTE = "64 px at patch 8 -> 8 x 8 = 64 visual tokens per image (tiny presets: 32 px -> 16)"


def _check_args(n: int, n_eval: int, canvas: Sequence[int], noise: float) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (number of training images) must be an integer >= 1, got {n!r}")
    if not isinstance(n_eval, int) or n_eval < 0:
        raise ValueError(f"n_eval must be an integer >= 0, got {n_eval!r}")
    if not canvas or any(not isinstance(s, int) or s < MIN_CANVAS for s in canvas):
        raise ValueError(
            f"scene image sizes must be integers >= {MIN_CANVAS} (six objects must fit), got {canvas!r}"
        )
    if noise < 0:
        raise ValueError(f"noise must be >= 0 (a pixel standard deviation), got {noise!r}")


def iter_graphs(
    n: int,
    seed: int = 0,
    split: str = "train",
    canvas: Sequence[int] = (DEFAULT_CANVAS,),
    heldout_pairs: Sequence[tuple[str, str]] = DEFAULT_HELDOUT_PAIRS,
    texture: bool = False,
    noise: float = 0.0,
) -> Iterator[dict[str, Any]]:
    """Scene graphs of one split; training scenes never hold a held-out pair. Scene i does not depend on n."""
    banned = tuple(heldout_pairs) if split == "train" else ()
    for i in range(n):
        rng = _scene_rng(seed, f"scenes/{split}", i)
        scene_id = f"{split}-{i:06d}"
        side = rng.choice(list(canvas))
        yield make_graph(rng, scene_id, f"images/{split}/{scene_id}.png", side, banned, texture, noise)


def _manifest(args: dict[str, Any], out: dict[str, list]) -> dict[str, Any]:
    return {
        "generator": "vlm.data.scenes",
        "world": "scenes",
        "format_version": FORMAT_VERSION,
        **args,
        "visual_tokens": VISUAL_TOKENS_NOTE,
        "max_length": MAX_LENGTH,
        "image_dirs": {"train": "images/train", "eval": "images/eval"},
        "files": {name: {"path": f"{name}.jsonl", "records": len(out[name])} for name in FILES},
        "stage2_sources": list(STAGE2_SOURCES),
        "families": list(sq.FAMILIES),
        "answers": {f: list(v) for f, v in sq.ANSWERS.items()},
        "multi_image": multi_image.manifest_entry("scenes"),
    }


def generate(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    n_eval: int | None = None,
    image_sizes: Sequence[int] = (DEFAULT_CANVAS,),
    heldout_pairs: Sequence[tuple[str, str]] = DEFAULT_HELDOUT_PAIRS,
    texture: bool = False,
    noise: float = 0.0,
    progress: bool = True,
) -> dict[str, Path]:
    """Write n training and n_eval eval scenes plus their records under out_dir (keys as synth.generate)."""
    n_eval = default_n_eval(n) if n_eval is None and isinstance(n, int) else n_eval
    image_sizes = tuple(image_sizes)
    _check_args(n, n_eval, image_sizes, noise)
    root = Path(out_dir)
    paths: dict[str, Path] = {"root": root, "manifest": root / "manifest.json"}
    for split in ("train", "eval"):
        paths[f"images_{split}"] = root / "images" / split
        paths[f"images_{split}"].mkdir(parents=True, exist_ok=True)
    paths.update({name: root / f"{name}.jsonl" for name in FILES})

    heldout = {f"{c} {s}" for c, s in heldout_pairs}
    world = {"canvas": image_sizes, "heldout_pairs": heldout_pairs, "texture": texture, "noise": noise}
    out: dict[str, list[dict]] = {name: [] for name in FILES}
    with tqdm(total=n + n_eval, desc="scene images", unit="img", disable=not progress) as bar:
        for split, count in (("train", n), ("eval", n_eval)):
            for graph in iter_graphs(count, seed, split, **world):
                draw_graph(graph).save(root / graph["image"], format="PNG")
                out[f"scenes_{split}"].append(graph)
                made = (
                    scene_records.train_records(graph, seed, heldout)
                    if split == "train"
                    else scene_records.eval_records(graph, seed, heldout)
                )
                for name, recs in made.items():
                    out[name] += recs
                bar.update(1)
    out["yesno_train"] = pope.scene_training_records(out["scenes_train"], seed, heldout)
    out["pope_eval"] = pope.scene_pope_records(out["scenes_eval"], out["scenes_train"], seed, heldout)
    out |= multi_image.records("scenes", out["scenes_train"], out["scenes_eval"], seed, heldout)
    for name in FILES:
        _write_jsonl(paths[name], out[name])
    args = {"seed": seed, "n_train_images": n, "n_eval_images": n_eval, "image_sizes": list(image_sizes)}
    args |= {"heldout_pairs": [f"{c}:{s}" for c, s in heldout_pairs], "texture": texture, "noise": noise}
    manifest = _manifest(args, out)
    paths["manifest"].write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return paths


def corpus_texts(n: int = 500, seed: int = 0) -> list[str]:
    """Text for a tokenizer of this world: instructions, yes/no wordings, answers and template words, then the
    training text of n scenes (so every question wording occurs). Not yet wired into `vlm init`, whose tiny
    tokenizer learns the shapes world's corpus (the `vlm.tokenizer_corpora` entry point "synthetic")."""
    texts = scene_text.corpus_strings() + scene_records.corpus_strings() + multi_image.corpus_strings()
    texts += [a for answers in sq.ANSWERS.values() for a in answers]
    texts += list(text.CAPTION_INSTRUCTIONS + text.DESCRIBE_INSTRUCTIONS) + [text.SHORT_ANSWER]
    texts += [q.format(pope.with_article(o)) for q in text.YESNO_QUESTIONS for o in pope.ALL_OBJECTS]
    for graph in iter_graphs(n, seed, "train"):
        for records in scene_records.train_records(graph, seed, _DEFAULT_HELDOUT).values():
            for r in records:
                texts += [t["value"].replace("<image>\n", "") for t in r["conversations"]]
    return texts
