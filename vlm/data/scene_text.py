"""Captions and detailed descriptions of a scene graph, in varied object orders and phrasings (COCO-style).

Every wording states every object (identical objects counted together: "two small red circles"), so any two
are equally right. A caption lists objects; a description adds each object's place in a 3 x 3 grid.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from .scene_graph import region
from .synth_text import PLURALS

N_REFERENCES = 5
_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_ITEM_FORMS = ("{count} {size} {colour} {noun}", "{count} {size} {noun} in {colour}")
_CAPTIONS = (
    "{items}.",
    "there {be} {items}.",
    "a picture of {items}.",
    "the image shows {items}.",
    "{items} on a {background} background.",
)
_OPENINGS = ("there {be} {n} {objects}.", "the image contains {n} {objects}.", "you can see {n} {objects}.")
_SENTENCES = ("{np} is {pos}.", "{pos} there is {np}.", "the one {pos} is {np}.")
_ORDERS = ("left to right", "top to bottom", "random")


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _ordered(graph: dict[str, Any], order: str, rng: random.Random) -> list[dict[str, Any]]:
    objects = list(graph["objects"])
    if order == "random":
        rng.shuffle(objects)
        return objects
    axis = 0 if order == "left to right" else 1
    return sorted(objects, key=lambda o: (o["centre"][axis], o["centre"][1 - axis]))


def _item(key: tuple[str, str, str], count: int, form: int, size_word: int) -> str:
    colour, shape, size = key
    noun = shape if count == 1 else PLURALS[shape]
    number = "a" if count == 1 else _NUMBERS[count]
    return _ITEM_FORMS[form].format(count=number, size=_SIZE_WORDS[size][size_word], colour=colour, noun=noun)


def _background_word(graph: dict[str, Any]) -> str:
    return {"plain": "white", "grid": "grid", "stripes": "striped"}[graph["background"]]


def caption(graph: dict[str, Any], rng: random.Random, canonical: bool = False) -> str:
    """One caption; canonical: objects left to right, the first template and forms."""
    order = "left to right" if canonical else rng.choice(_ORDERS)
    keys = [(o["colour"], o["shape"], o["size"]) for o in _ordered(graph, order, rng)]
    counts = Counter(keys)
    form, size_word = (0, 0) if canonical else (rng.randrange(len(_ITEM_FORMS)), rng.randrange(2))
    items = [_item(k, counts[k], form, size_word) for k in dict.fromkeys(keys)]
    template = _CAPTIONS[0] if canonical else rng.choice(_CAPTIONS)
    be = "is" if counts[keys[0]] == 1 else "are"  # agrees with the first item: "there is a circle and ..."
    return template.format(items=_join(items), be=be, background=_background_word(graph))


def description(graph: dict[str, Any], rng: random.Random, canonical: bool = False) -> str:
    """An opening with the object count, then one sentence per object with its place (a scene has >= 1)."""
    n, side = graph["count"], graph["width"]
    pick = (lambda seq: seq[0]) if canonical else rng.choice
    words = {"be": "is" if n == 1 else "are", "n": _NUMBERS[n], "objects": "object" if n == 1 else "objects"}
    sentences = [pick(_OPENINGS).format(**words)]
    template, size_word = pick(_SENTENCES), 0 if canonical else rng.randrange(2)
    for obj in _ordered(graph, "left to right" if canonical else pick(_ORDERS), rng):
        np = f"a {_SIZE_WORDS[obj['size']][size_word]} {obj['colour']} {obj['shape']}"
        place = region(obj, side)
        pos = "in the centre" if place == "centre" else f"at the {place}"
        sentences.append(template.format(np=np, pos=pos))
    return " ".join(sentences)


def references(kind: str, graph: dict[str, Any], rng: random.Random, k: int = N_REFERENCES) -> list[str]:
    """k wordings, the canonical first, distinct where the scene allows (one small object has few wordings)."""
    render = caption if kind == "caption" else description
    refs = {render(graph, rng, canonical=True): None}
    for _ in range(20 * k):
        if len(refs) == k:
            break
        refs[render(graph, rng)] = None
    out = list(refs)
    return out + [out[i % len(out)] for i in range(k - len(out))]


def corpus_strings() -> list[str]:
    """Every fixed word of the templates, for a tokenizer corpus."""
    texts = [t.format(items="", be="is", background="white") for t in _CAPTIONS]
    texts += [t.format(be="are", n="", objects="objects") for t in _OPENINGS]
    texts += [t.format(np="", pos="") for t in _SENTENCES]
    texts += list(_NUMBERS.values()) + [w for ws in _SIZE_WORDS.values() for w in ws] + ["in the centre"]
    return texts
