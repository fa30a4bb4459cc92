"""Multi-image VQA over the scenes `vlm data synth` already drew: pairs and groups of four images of one split,
one short-answer question per record, answered from the scene metadata. No new image is drawn.

Question types (`question_type`), each asked of 2 and of 4 images (`num_images`):

- multi_count        "Which image has more shapes?" (4: "the most")       -> first | second | third | fourth
- multi_same_colour  "Are the shapes in both images the same colour?"    -> yes | no        (shapes world)
- multi_same_shape   "Do the two pictures show the same shape?"          -> yes | no        (shapes world)
- multi_exist        "Do both images contain a red circle?"              -> yes | no        (scenes world)
- multi_find         "Which image shows a red circle?" (exactly one does) -> first | second | third | fourth

Group i of a split is planned from i alone: its type, size and answer cycle so that every (type, size) cell is
balanced over its answers (yes and no equally often, each position equally often). The scenes that realise the
plan are drawn from the split with the group's own RNG, seeded by (seed, world, split, i): a stream no other
file uses, so every other output file stays byte-identical. The count's maximum is unique. A "no" differs from
the rest in exactly one image, at a random position, so every image must be looked at. A find's distractors
share the target's colour or its shape where the split has such scenes (as POPE's adversarial negatives), so one
attribute alone does not find it. A plan the split cannot realise (a small split without four scenes of one
colour, say) is left out, so small splits hold fewer records than scenes.

Records are LLaVA multi-image records: `"image": [paths]` in image order and one `<image>` line per image at the
start of the human turn. multi_eval records add `answers`, `question_type`, `num_images`, `scene_ids` and, for
find and exist, `object`; in the scenes world also `pair` (heldout when the question names, or counts, an object
whose colour-shape pair training scenes never show).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .pope import ALL_OBJECTS, with_article
from .synth_text import SHORT_ANSWER

ORDINALS = ("first", "second", "third", "fourth")
YES_NO = ("yes", "no")
GROUP_SIZES = (2, 4)
WORLD_TYPES: dict[str, tuple[str, ...]] = {
    "shapes": ("multi_count", "multi_same_colour", "multi_same_shape", "multi_find"),
    "scenes": ("multi_count", "multi_exist", "multi_find"),
}
ORDINAL_TYPES = ("multi_count", "multi_find")
# Wordings per (type, number of images); {obj} is "a red circle".
QUESTIONS: dict[tuple[str, int], tuple[str, ...]] = {
    ("multi_count", 2): (
        "Which image has more shapes?",
        "Which picture shows more objects?",
        "In which image are there more shapes?",
    ),
    ("multi_count", 4): (
        "Which image has the most shapes?",
        "Which picture shows the most objects?",
        "In which image are there the most shapes?",
    ),
    ("multi_same_colour", 2): (
        "Are the shapes in both images the same colour?",
        "Do the two pictures show the same colour?",
        "Is the colour the same in both images?",
    ),
    ("multi_same_colour", 4): (
        "Are the shapes in all four images the same colour?",
        "Do all four pictures show the same colour?",
        "Is the colour the same in every image?",
    ),
    ("multi_same_shape", 2): (
        "Are the objects in both images the same shape?",
        "Do the two pictures show the same shape?",
        "Is the shape the same in both images?",
    ),
    ("multi_same_shape", 4): (
        "Are the objects in all four images the same shape?",
        "Do all four pictures show the same shape?",
        "Is the shape the same in every image?",
    ),
    ("multi_exist", 2): (
        "Do both images contain {obj}?",
        "Is there {obj} in both pictures?",
        "Can you see {obj} in both images?",
    ),
    ("multi_exist", 4): (
        "Do all four images contain {obj}?",
        "Is there {obj} in every picture?",
        "Can you see {obj} in all four images?",
    ),
    ("multi_find", 2): (
        "Which image shows {obj}?",
        "In which picture is there {obj}?",
        "Which of the two images contains {obj}?",
    ),
    ("multi_find", 4): (
        "Which image shows {obj}?",
        "In which picture is there {obj}?",
        "Which of the four images contains {obj}?",
    ),
}
_TRIES = 64  # random draws before a scan of the whole split for a scene that fits
_ATTEMPTS = 8  # fresh anchors before a plan counts as unrealisable


@dataclass(frozen=True)
class View:
    """What the questions need of one scene, in either world."""

    index: int  # position in the split's scene list
    id: str
    image: str
    count: int
    colours: frozenset[str]
    shapes: frozenset[str]
    objects: frozenset[str]  # colour-shape pairs, "red circle"


def shapes_view(index: int, scene: dict[str, Any]) -> View:
    colour, shape = scene["colour"], scene["shape"]
    return View(
        index,
        scene["id"],
        scene["image"],
        scene["count"],
        frozenset([colour]),
        frozenset([shape]),
        frozenset([f"{colour} {shape}"]),
    )


def graph_view(index: int, graph: dict[str, Any]) -> View:
    objs = graph["objects"]
    return View(
        index,
        graph["id"],
        graph["image"],
        graph["count"],
        frozenset(o["colour"] for o in objs),
        frozenset(o["shape"] for o in objs),
        frozenset(f"{o['colour']} {o['shape']}" for o in objs),
    )


class _NoGroup(Exception):
    """The split holds no scene that fits (raised while realising a plan)."""


class _Picker:
    """Draws distinct scenes of one split that satisfy a predicate, with one group's RNG."""

    def __init__(self, views: Sequence[View], rng: random.Random):
        self.views, self.rng, self.taken = views, rng, set()

    def __call__(self, ok: Callable[[View], bool] = lambda v: True) -> View:
        for _ in range(_TRIES):
            v = self.views[self.rng.randrange(len(self.views))]
            if v.index not in self.taken and ok(v):
                break
        else:
            left = [v for v in self.views if v.index not in self.taken and ok(v)]
            if not left:
                raise _NoGroup
            v = self.rng.choice(left)
        self.taken.add(v.index)
        return v


def _insert(rng: random.Random, group: list[View], view: View, at: int | None = None) -> list[View]:
    rng.shuffle(group)
    group.insert(rng.randrange(len(group) + 1) if at is None else at, view)
    return group


def _count(pick: _Picker, k: int, answer: str) -> tuple[list[View], str | None]:
    top = pick(lambda v: v.count >= 2)
    rest = [pick(lambda v: v.count < top.count) for _ in range(k - 1)]  # strictly fewer: a unique maximum
    return _insert(pick.rng, rest, top, ORDINALS.index(answer)), None


def _same(attribute: str) -> Callable[[_Picker, int, str], tuple[list[View], str | None]]:
    def build(pick: _Picker, k: int, answer: str) -> tuple[list[View], str | None]:
        anchor = pick()
        key = getattr(anchor, attribute)
        same = [anchor] + [
            pick(lambda v: getattr(v, attribute) == key) for _ in range(k - 1 - (answer == "no"))
        ]
        if answer == "yes":
            pick.rng.shuffle(same)
            return same, None
        return _insert(pick.rng, same, pick(lambda v: getattr(v, attribute) != key)), None

    return build


def _exist(pick: _Picker, k: int, answer: str) -> tuple[list[View], str | None]:
    anchor = pick()
    obj = pick.rng.choice(sorted(anchor.objects))
    have = [anchor] + [pick(lambda v: obj in v.objects) for _ in range(k - 1 - (answer == "no"))]
    if answer == "yes":
        pick.rng.shuffle(have)
        return have, obj
    return _insert(pick.rng, have, pick(lambda v: obj not in v.objects)), obj


def _find(pick: _Picker, k: int, answer: str) -> tuple[list[View], str | None]:
    target = pick()
    obj = pick.rng.choice(sorted(target.objects))
    colour, shape = obj.split(" ")

    def absent(v: View) -> bool:
        return obj not in v.objects

    hard = [lambda v: absent(v) and colour in v.colours, lambda v: absent(v) and shape in v.shapes]
    pick.rng.shuffle(hard)
    distractors = []
    for ok in (hard + [absent] * k)[: k - 1]:
        try:
            distractors.append(pick(ok))
        except _NoGroup:  # no scene shares the attribute: any scene without the object
            distractors.append(pick(absent))
    return _insert(pick.rng, distractors, target, ORDINALS.index(answer)), obj


BUILDERS = {
    "multi_count": _count,
    "multi_same_colour": _same("colours"),
    "multi_same_shape": _same("shapes"),
    "multi_exist": _exist,
    "multi_find": _find,
}


def answers_for(question_type: str, k: int) -> tuple[str, ...]:
    return ORDINALS[:k] if question_type in ORDINAL_TYPES else YES_NO


def answer(question_type: str, group: Sequence[View], obj: str | None = None) -> str:
    """The answer the metadata gives; ValueError where the question has none (a tie, no or several matches)."""
    if question_type == "multi_count":
        counts = [v.count for v in group]
        if counts.count(max(counts)) != 1:
            raise ValueError(f"counts {counts} have no unique maximum")
        return ORDINALS[counts.index(max(counts))]
    if question_type in ("multi_same_colour", "multi_same_shape"):
        attribute = "colours" if question_type == "multi_same_colour" else "shapes"
        return YES_NO[len({getattr(v, attribute) for v in group}) != 1]
    if question_type == "multi_exist":
        return YES_NO[not all(obj in v.objects for v in group)]
    if question_type == "multi_find":
        where = [i for i, v in enumerate(group) if obj in v.objects]
        if len(where) != 1:
            raise ValueError(f"{obj!r} is in {len(where)} images, not one")
        return ORDINALS[where[0]]
    raise ValueError(
        f"unknown multi-image question type {question_type!r}; expected one of {', '.join(BUILDERS)}"
    )


def plan(world: str, i: int) -> tuple[str, int, str]:
    """(question type, number of images, answer) of group i: each (type, size) cell cycles through its answers."""
    types = WORLD_TYPES[world]
    question_type = types[i % len(types)]
    k = GROUP_SIZES[(i // len(types)) % len(GROUP_SIZES)]
    options = answers_for(question_type, k)
    return question_type, k, options[(i // (len(types) * len(GROUP_SIZES))) % len(options)]


def group_rng(seed: int, world: str, split: str, i: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across runs and PYTHONHASHSEED.
    return random.Random(f"vlm.multi/{seed}/{world}/{split}/{i}")


def _realise(views: Sequence[View], world: str, split: str, seed: int, i: int):
    question_type, k, wanted = plan(world, i)
    rng = group_rng(seed, world, split, i)
    for _ in range(_ATTEMPTS):
        try:
            group, obj = BUILDERS[question_type](_Picker(views, rng), k, wanted)
        except _NoGroup:
            continue
        if answer(question_type, group, obj) != wanted:  # the builders construct the answer; check it
            raise AssertionError(
                f"group {split}/{i}: {question_type} built {wanted!r}, metadata says otherwise"
            )
        return question_type, group, obj, wanted, rng
    return None


def _question(question_type: str, k: int, obj: str | None, rng: random.Random) -> str:
    wording = rng.choice(QUESTIONS[(question_type, k)])
    return wording.format(obj=with_article(obj)) if obj else wording


def _pair(question_type: str, group: Sequence[View], obj: str | None, heldout: Collection[str]) -> str:
    named = {obj} if obj else set().union(*(v.objects for v in group))  # a count is about every object
    return "heldout" if named & set(heldout) else "seen"


def split_records(
    views: Sequence[View],
    world: str,
    split: str,
    seed: int,
    with_fields: bool,
    heldout: Collection[str] | None,
) -> list[dict[str, Any]]:
    """One record per scene of the split (groups 0..len-1), minus the plans it cannot realise."""
    records = []
    for i in range(len(views)):
        made = _realise(views, world, split, seed, i)
        if made is None:
            continue
        question_type, group, obj, ans, rng = made
        k = len(group)
        human = "<image>\n" * k + f"{_question(question_type, k, obj, rng)}\n{SHORT_ANSWER}"
        record: dict[str, Any] = {
            "id": f"{split}-multi-{i:06d}",
            "image": [v.image for v in group],
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": ans}],
        }
        if with_fields:
            record |= {"answers": [ans], "question_type": question_type, "num_images": k}
            record["scene_ids"] = [v.id for v in group]
            if obj:
                record["object"] = obj
            if heldout is not None:
                record["pair"] = _pair(question_type, group, obj, heldout)
        records.append(record)
    return records


def records(
    world: str,
    train_scenes: Iterable[dict[str, Any]],
    eval_scenes: Iterable[dict[str, Any]],
    seed: int = 0,
    heldout: Collection[str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """{"multi_train": ..., "multi_eval": ...} from the scenes files' dicts of `world` ("shapes" or "scenes");
    heldout: the scenes world's held-out pairs (eval records then carry `pair`)."""
    if world not in WORLD_TYPES:
        raise ValueError(f"unknown world {world!r}; expected one of {', '.join(WORLD_TYPES)}")
    view = shapes_view if world == "shapes" else graph_view
    out = {}
    for name, split, scenes in (("multi_train", "train", train_scenes), ("multi_eval", "eval", eval_scenes)):
        views = [view(i, s) for i, s in enumerate(scenes)]
        out[name] = split_records(views, world, split, seed, split == "eval", heldout)
    return out


def manifest_entry(world: str) -> dict[str, Any]:
    types = WORLD_TYPES[world]
    return {
        "question_types": list(types),
        "num_images": list(GROUP_SIZES),
        "answers": {t: list(answers_for(t, max(GROUP_SIZES))) for t in types},
    }


def corpus_strings() -> list[str]:
    """Every wording with every object, and the answers (for a world's tokenizer corpus)."""
    texts = list(ORDINALS + YES_NO)
    for wording in (w for wordings in QUESTIONS.values() for w in wordings):
        texts += (
            [wording.format(obj=with_article(o)) for o in ALL_OBJECTS] if "{obj}" in wording else [wording]
        )
    return texts
