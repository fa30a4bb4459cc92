"""POPE-style object-hallucination probe built from the synthetic scenes' ground truth.

An "object" is a coloured shape ("red circle"); a scene contains exactly one kind. Per scene and per
negative-sampling split, one positive question ("Is there a <its object> in the image?" -> yes) and one negative
(-> no), so every split is balanced like POPE's. Negatives, following POPE (Li et al., 2023):

- random: any absent object, uniformly;
- popular: the absent object that appears in the most scenes of the set (ties broken by name);
- adversarial: an absent object that shares the colour or the shape of the present one. POPE's adversarial
  negatives co-occur most often with the ground truth; here a scene holds one kind of object, so co-occurrence
  is empty and attribute similarity is the closest analogue (and the likeliest confusion).

Scenes of the CLEVR-style world (`"objects"` in the scene: several objects each) follow POPE more closely
(`scene_pope_records`): per image up to 3 ground-truth objects and as many absent ones per split, with popularity
and co-occurrence counted over the TRAINING scenes, never the evaluated ones: popular negatives are the absent
objects most frequent in training, adversarial ones those that co-occur most often with the image's objects.

Each scene draws from its own RNG seeded by (seed, scene id), so records do not depend on the set's order.
The question carries LLaVA-1.5's short-answer instruction, as its POPE eval prompt does.

`training_records` builds the stage 2 yes/no source the same way from TRAINING scenes: per scene one yes and one
no question about the same image (the pair teaches attribute binding), the negative's split cycling through
SPLITS, the wording drawn from `synth_text.YESNO_QUESTIONS`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Collection, Iterable
from typing import Any

from .synth_text import COLOURS, SHAPES, SHORT_ANSWER, YESNO_QUESTIONS

SPLITS = ("random", "popular", "adversarial")
QUESTION = YESNO_QUESTIONS[0]  # POPE's own wording: "Is there {} in the image?"
ALL_OBJECTS = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)


def scene_object(scene: dict[str, Any]) -> str:
    return f"{scene['colour']} {scene['shape']}"


def popularity(scenes: list[dict[str, Any]]) -> list[str]:
    """Objects by how many scenes contain them, most first; ties by name so the order is stable."""
    counts = Counter(scene_object(s) for s in scenes)
    return sorted(ALL_OBJECTS, key=lambda o: (-counts[o], o))


def negative(split: str, present: str, rng: random.Random, ranking: list[str]) -> str:
    absent = [o for o in ALL_OBJECTS if o != present]
    if split == "random":
        return rng.choice(absent)
    if split == "popular":
        return next(o for o in ranking if o != present)
    if split == "adversarial":
        colour, shape = present.split(" ")
        return rng.choice([o for o in absent if o.startswith(colour + " ") or o.endswith(" " + shape)])
    raise ValueError(f"unknown POPE split {split!r}; expected one of {SPLITS}")


def with_article(obj: str) -> str:
    return ("an " if obj[0] in "aeiou" else "a ") + obj


def _conversation(template: str, obj: str, label: str) -> list[dict[str, str]]:
    question = template.format(with_article(obj))
    return [
        {"from": "human", "value": f"<image>\n{question}\n{SHORT_ANSWER}"},
        {"from": "gpt", "value": label},
    ]


def _record(scene: dict[str, Any], split: str, obj: str, label: str) -> dict[str, Any]:
    return {
        "id": f"{scene['id']}-pope-{split}-{label}",
        "image": scene["image"],
        "conversations": _conversation(QUESTION, obj, label),
        "answers": [label],
        "question_type": "pope",
        "pope_split": split,
        "object": obj,
        "num_objects": scene["count"],
        "image_size": scene["width"],
        "scene_id": scene["id"],
    }


def pope_records(scenes: Iterable[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """One yes and one no question per scene and split (3 splits), in scene order."""
    scenes = list(scenes)
    ranking = popularity(scenes)
    records = []
    for scene in scenes:
        rng = random.Random(f"vlm.pope/{seed}/{scene['id']}")
        present = scene_object(scene)
        for split in SPLITS:
            records.append(_record(scene, split, present, "yes"))
            records.append(_record(scene, split, negative(split, present, rng, ranking), "no"))
    return records


def training_records(scenes: Iterable[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Per scene a yes and a no question (in random order), negatives as POPE's splits, varied wording."""
    scenes = list(scenes)
    ranking = popularity(scenes)
    records = []
    for i, scene in enumerate(scenes):
        rng = random.Random(f"vlm.yesno/{seed}/{scene['id']}")
        present = scene_object(scene)
        split = SPLITS[i % len(SPLITS)]
        pair = [("yes", present), ("no", negative(split, present, rng, ranking))]
        rng.shuffle(pair)
        for label, obj in pair:
            convs = _conversation(rng.choice(YESNO_QUESTIONS), obj, label)
            records.append(
                {"id": f"{scene['id']}-yesno-{label}", "image": scene["image"], "conversations": convs}
            )
    return records


# ---- multi-object scenes (vlm.data.scenes) ---------------------------------------------------------------

POSITIVES = 3  # ground-truth objects asked per image and split, as POPE


def objects_of(scene: dict[str, Any]) -> list[str]:
    """The distinct colour-shape objects of a multi-object scene, sorted."""
    return sorted({f"{o['colour']} {o['shape']}" for o in scene["objects"]})


class Statistics:
    """Object frequency and co-occurrence over a set of (training) scenes."""

    def __init__(self, scenes: Iterable[dict[str, Any]]):
        self.frequency: Counter[str] = Counter()
        self.together: Counter[tuple[str, str]] = Counter()
        for scene in scenes:
            present = objects_of(scene)
            self.frequency.update(present)
            self.together.update((a, b) for a in present for b in present if a != b)

    def popular(self) -> list[str]:
        return sorted(ALL_OBJECTS, key=lambda o: (-self.frequency[o], o))

    def cooccurring(self, present: list[str]) -> list[str]:
        """Objects by how often they appear beside the present ones, most first; ties by popularity, name."""
        score = {o: sum(self.together[(p, o)] for p in present) for o in ALL_OBJECTS}
        return sorted(ALL_OBJECTS, key=lambda o: (-score[o], -self.frequency[o], o))


def scene_negatives(
    split: str,
    present: list[str],
    k: int,
    rng: random.Random,
    stats: Statistics,
    exclude: Collection[str] = (),
) -> list[str]:
    """k absent objects by POPE's split rule, none in `exclude`."""
    absent = [o for o in ALL_OBJECTS if o not in present and o not in exclude]
    if split == "random":
        return rng.sample(absent, min(k, len(absent)))
    if split == "popular":
        return [o for o in stats.popular() if o in absent][:k]
    if split == "adversarial":
        return [o for o in stats.cooccurring(present) if o in absent][:k]
    raise ValueError(f"unknown POPE split {split!r}; expected one of {SPLITS}")


def _scene_record(scene: dict, split: str, obj: str, label: str, j: int, heldout: Collection[str]) -> dict:
    pair = "heldout" if obj in heldout else "seen"
    return _record(scene, split, obj, label) | {"id": f"{scene['id']}-pope-{split}-{label}-{j}", "pair": pair}


def scene_pope_records(
    scenes: Iterable[dict[str, Any]],
    train_scenes: Iterable[dict[str, Any]],
    seed: int = 0,
    heldout: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Per eval scene and split: up to 3 present objects (yes) and as many absent ones (no). `pair` says whether
    the probed object is a held-out colour-shape pair (never in a training scene)."""
    stats = Statistics(train_scenes)
    records = []
    for scene in scenes:
        rng = random.Random(f"vlm.pope/{seed}/{scene['id']}")
        present = objects_of(scene)
        positives = rng.sample(present, min(POSITIVES, len(present)))
        for split in SPLITS:
            records += [_scene_record(scene, split, o, "yes", j, heldout) for j, o in enumerate(positives)]
            negatives = scene_negatives(split, present, len(positives), rng, stats)
            records += [_scene_record(scene, split, o, "no", j, heldout) for j, o in enumerate(negatives)]
    return records


def scene_training_records(
    scenes: Iterable[dict[str, Any]], seed: int = 0, heldout: Collection[str] = ()
) -> list[dict[str, Any]]:
    """Per training scene a yes and a no question (random order), negatives cycling through POPE's splits and
    never a held-out pair (held out means absent from training text too)."""
    scenes = list(scenes)
    stats = Statistics(scenes)
    records = []
    for i, scene in enumerate(scenes):
        rng = random.Random(f"vlm.yesno/{seed}/{scene['id']}")
        present = objects_of(scene)
        split = SPLITS[i % len(SPLITS)]
        pair = [
            ("yes", rng.choice(present)),
            ("no", scene_negatives(split, present, 1, rng, stats, heldout)[0]),
        ]
        rng.shuffle(pair)
        for label, obj in pair:
            convs = _conversation(rng.choice(YESNO_QUESTIONS), obj, label)
            records.append(
                {"id": f"{scene['id']}-yesno-{label}", "image": scene["image"], "conversations": convs}
            )
    return records
