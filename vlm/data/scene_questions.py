"""CLEVR's question families over a scene graph: each question is a small program, executed on the graph for its
answer, so the answer can be recomputed from the saved graph at any time (`vlm data check` does).

Programs are JSON. A filter is a dict of attributes ({"colour": "red", "shape": "circle"}, any subset of colour,
shape and size); a description picks one object: {"filter": F} or {"filter": F, "relate": REL, "anchor": F2}
("the square left of the red circle"; the anchor must itself be unique by its filter).

- exist             {"filter": F}                                   -> yes / no
- count             {"filter": F}                                   -> 0..6
- query_attribute   {"target": D, "attribute": A}                   -> a colour, shape or size
- compare_attribute {"a": D, "b": D, "attribute": A}                -> yes / no ("the same colour?")
- compare_count     {"a": F, "b": F, "compare": more|fewer|equal}   -> yes / no
- spatial           {"a": D, "b": D, "relate": left|right|above|below} -> yes / no

The generator uses relational descriptions in query_attribute only (see `_description`); the executor and the
checker accept them anywhere.

A description that does not name exactly one object, or a relation between centres too close to tell, makes
the program ill-posed: `execute` raises QuestionError, the generator draws again, the checker reports it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Collection
from typing import Any

from .scene_graph import MAX_OBJECTS, relation
from .synth_text import COLOURS, PLURALS, SHAPES, SIZES

ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES}
RELATIONS = ("left", "right", "above", "below")
YES_NO = ("yes", "no")
FAMILIES = ("exist", "count", "query_attribute", "compare_attribute", "compare_count", "spatial")
ANSWERS: dict[str, tuple[str, ...]] = {
    "exist": YES_NO,
    "count": tuple(str(i) for i in range(MAX_OBJECTS + 1)),
    "query_attribute": tuple(v for values in ATTRIBUTES.values() for v in values),
    "compare_attribute": YES_NO,
    "compare_count": YES_NO,
    "spatial": YES_NO,
}
_RELATION_WORDS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
_TRIES = 40


class QuestionError(ValueError):
    """A program that is ill-posed on its scene (not unique, too close to tell, unknown family or field)."""


# ---- execution ------------------------------------------------------------------------------------------


def matches(obj: dict[str, Any], f: dict[str, str]) -> bool:
    return all(obj[k] == v for k, v in f.items())


def select(objects: list[dict], f: dict[str, str]) -> list[int]:
    unknown = set(f) - set(ATTRIBUTES)
    if unknown:
        raise QuestionError(f"filter has unknown attribute(s) {sorted(unknown)}")
    return [i for i, o in enumerate(objects) if matches(o, f)]


def resolve(graph: dict[str, Any], desc: dict[str, Any]) -> int:
    """The index of the one object a description names."""
    objects, side = graph["objects"], graph["width"]
    found = select(objects, desc["filter"])
    if "relate" in desc:
        anchor = resolve(graph, {"filter": desc["anchor"]})
        verdicts = [
            (i, relation(objects[i], objects[anchor], desc["relate"], side)) for i in found if i != anchor
        ]
        if any(v is None for _, v in verdicts):
            raise QuestionError(f"an object matching {desc['filter']} is too close to the anchor to tell")
        found = [i for i, v in verdicts if v]
    if len(found) != 1:
        raise QuestionError(f"description {desc} names {len(found)} objects, not one")
    return found[0]


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def execute(graph: dict[str, Any], family: str, program: dict[str, Any]) -> str:
    """The answer of `program` on `graph`; QuestionError when it is ill-posed there."""
    objects = graph["objects"]
    try:
        if family == "exist":
            return _yes(bool(select(objects, program["filter"])))
        if family == "count":
            return str(len(select(objects, program["filter"])))
        if family == "query_attribute":
            return objects[resolve(graph, program["target"])][program["attribute"]]
        if family == "compare_attribute":
            a, b = resolve(graph, program["a"]), resolve(graph, program["b"])
            if a == b:
                raise QuestionError("both descriptions name the same object")
            return _yes(objects[a][program["attribute"]] == objects[b][program["attribute"]])
        if family == "compare_count":
            na, nb = (len(select(objects, program[k])) for k in ("a", "b"))
            return _yes({"more": na > nb, "fewer": na < nb, "equal": na == nb}[program["compare"]])
        if family == "spatial":
            a, b = resolve(graph, program["a"]), resolve(graph, program["b"])
            verdict = relation(objects[a], objects[b], program["relate"], graph["width"]) if a != b else None
            if verdict is None:
                raise QuestionError("the two objects are the same or too close to tell")
            return _yes(verdict)
    except (KeyError, TypeError) as e:
        raise QuestionError(f"{family} program lacks or mistypes a field: {e}") from None
    raise QuestionError(f"unknown question family {family!r}; expected one of {', '.join(FAMILIES)}")


def touched(graph: dict[str, Any], family: str, program: dict[str, Any]) -> list[int]:
    """Objects the question is about (for the held-out-pair slice): the selected or described ones."""
    objects = graph["objects"]
    if family in ("exist", "count"):
        return select(objects, program["filter"])
    if family == "query_attribute":
        return [resolve(graph, program["target"])]
    if family == "compare_count":
        return sorted(set(select(objects, program["a"])) | set(select(objects, program["b"])))
    return [resolve(graph, program["a"]), resolve(graph, program["b"])]


def mentioned_filters(family: str, program: dict[str, Any]) -> list[dict[str, str]]:
    """Every filter the question's words contain (a held-out pair may be named without being in the scene)."""
    if family in ("exist", "count"):
        return [program["filter"]]
    if family == "compare_count":
        return [program["a"], program["b"]]
    descs = [program["target"]] if family == "query_attribute" else [program["a"], program["b"]]
    return [f for d in descs for f in (d["filter"], d.get("anchor")) if f is not None]


# ---- wording --------------------------------------------------------------------------------------------


def noun_phrase(f: dict[str, str], plural: bool = False) -> str:
    """{"size": "small", "colour": "red"} -> "small red object(s)"; with a shape, "small red circle(s)"."""
    noun = f.get("shape", "object")
    noun = (PLURALS.get(noun, noun + "s")) if plural else noun
    return " ".join(w for w in (f.get("size"), f.get("colour"), noun) if w)


def describe(desc: dict[str, Any]) -> str:
    text = "the " + noun_phrase(desc["filter"])
    if "relate" in desc:
        text += f" {_RELATION_WORDS[desc['relate']]} the {noun_phrase(desc['anchor'])}"
    return text


def _article(np: str) -> str:
    return ("an " if np[0] in "aeiou" else "a ") + np


def question_text(family: str, program: dict[str, Any]) -> str:
    p = program
    if family == "exist":
        return f"Is there {_article(noun_phrase(p['filter']))}?"
    if family == "count":
        return f"How many {noun_phrase(p['filter'], plural=True)} are there?"
    if family == "query_attribute":
        return f"What {p['attribute']} is {describe(p['target'])}?"
    if family == "compare_attribute":
        return f"Are {describe(p['a'])} and {describe(p['b'])} the same {p['attribute']}?"
    if family == "compare_count":
        a, b = noun_phrase(p["a"], plural=True), noun_phrase(p["b"], plural=True)
        if p["compare"] == "equal":
            return f"Are there as many {a} as {b}?"
        return f"Are there {p['compare']} {a} than {b}?"
    if family == "spatial":
        return f"Is {describe(p['a'])} {_RELATION_WORDS[p['relate']]} {describe(p['b'])}?"
    raise QuestionError(f"unknown question family {family!r}")


# ---- generation -----------------------------------------------------------------------------------------


def _random_filter(rng: random.Random, k: int) -> dict[str, str]:
    keys = sorted(rng.sample(list(ATTRIBUTES), k), key=list(ATTRIBUTES).index)
    return {key: rng.choice(ATTRIBUTES[key]) for key in keys}


def _filter_of(rng: random.Random, graph: dict[str, Any], k: int) -> dict[str, str]:
    """A filter of k attributes, half the time taken from an object in the scene (so it often matches)."""
    if graph["objects"] and rng.random() < 0.5:
        obj = rng.choice(graph["objects"])
        keys = sorted(rng.sample(list(ATTRIBUTES), k), key=list(ATTRIBUTES).index)
        return {key: obj[key] for key in keys}
    return _random_filter(rng, k)


def _unique_descriptions(graph: dict[str, Any], index: int, without: str | None) -> list[dict[str, Any]]:
    """Every plain description (attribute subset) naming only object `index`, never using attribute `without`."""
    obj, keys = graph["objects"][index], [k for k in ATTRIBUTES if k != without]
    out = []
    for r in range(1, len(keys) + 1):
        for subset in itertools.combinations(keys, r):
            desc = {"filter": {k: obj[k] for k in subset}}
            if select(graph["objects"], desc["filter"]) == [index]:
                out.append(desc)
    return out


def _relational_descriptions(graph: dict[str, Any], index: int, without: str | None) -> list[dict[str, Any]]:
    """ "the <filter> <relation> the <anchor>" descriptions naming object `index`, the anchor unique by itself."""
    out = []
    for anchor in range(len(graph["objects"])):
        if anchor == index:
            continue
        for anchor_desc in _unique_descriptions(graph, anchor, None):
            for rel in RELATIONS:
                for key in (k for k in ATTRIBUTES if k != without):  # one attribute: "the square left of ..."
                    desc = {"filter": {key: graph["objects"][index][key]}, "relate": rel}
                    desc["anchor"] = anchor_desc["filter"]
                    try:
                        if resolve(graph, desc) == index:
                            out.append(desc)
                    except QuestionError:
                        continue
    return out


def _description(
    rng: random.Random, graph: dict[str, Any], index: int, without: str | None, relational: bool = False
) -> dict | None:
    """A unique description of object `index`; with `relational`, sometimes (or when no plain one exists) one
    through a relation to an anchor. Only query_attribute uses those: nested in a two-object question they read
    as a chain no one can parse ("is the X above the Y left of the Z below the W")."""
    plain = _unique_descriptions(graph, index, without)
    wanted = relational and (rng.random() < 0.35 or not plain)
    relational = _relational_descriptions(graph, index, without) if wanted else []
    pool = relational or plain
    return rng.choice(pool) if pool else None


def _draft(rng: random.Random, graph: dict[str, Any], family: str) -> dict[str, Any] | None:
    """One candidate program of `family` (maybe ill-posed, maybe None when the scene cannot hold one)."""
    n = len(graph["objects"])
    if family == "exist":  # counts are drawn by `_count_question`
        return {"filter": _filter_of(rng, graph, rng.choice((1, 2, 2, 3)))}
    if family == "compare_count":
        a, b = (_filter_of(rng, graph, 1) for _ in range(2))
        return None if a == b else {"a": a, "b": b, "compare": rng.choice(("more", "fewer", "equal"))}
    if family == "query_attribute":
        attribute = rng.choice(list(ATTRIBUTES))
        target = _description(rng, graph, rng.randrange(n), attribute, relational=True) if n else None
        return None if target is None else {"target": target, "attribute": attribute}
    if n < 2:
        return None
    i, j = rng.sample(range(n), 2)
    attribute = rng.choice(list(ATTRIBUTES))
    without = attribute if family == "compare_attribute" else None
    a, b = _description(rng, graph, i, without), _description(rng, graph, j, without)
    if a is None or b is None:
        return None
    if family == "compare_attribute":
        return {"a": a, "b": b, "attribute": attribute}
    return {"a": a, "b": b, "relate": rng.choice(RELATIONS)}


def _all_filters(max_keys: int) -> list[dict[str, str]]:
    out = []
    for r in range(1, max_keys + 1):
        for keys in itertools.combinations(ATTRIBUTES, r):
            out += [
                dict(zip(keys, values, strict=True))
                for values in itertools.product(*(ATTRIBUTES[k] for k in keys))
            ]
    return out


_COUNT_FILTERS = _all_filters(2)


def names_pair(family: str, program: dict[str, Any], pairs: Collection[str]) -> bool:
    """Whether the question's words name one of the colour-shape pairs ("red circle")."""
    filters = mentioned_filters(family, program)
    return any(f"{f['colour']} {f['shape']}" in pairs for f in filters if "colour" in f and "shape" in f)


def _count_question(rng: random.Random, graph: dict[str, Any], banned: Collection[str]) -> tuple[dict, str]:
    """A count whose answer is drawn evenly from the answers this scene allows, then a filter giving it: drawn
    filters alone answer "1" half the time."""
    by_answer: dict[str, list[dict[str, str]]] = {}
    for f in _COUNT_FILTERS:
        if names_pair("count", {"filter": f}, banned):
            continue
        by_answer.setdefault(str(len(select(graph["objects"], f))), []).append(f)
    answer = rng.choice(sorted(by_answer))
    return {"filter": rng.choice(by_answer[answer])}, answer


def draw_question(
    rng: random.Random, graph: dict[str, Any], family: str, banned: Collection[str] = ()
) -> tuple[dict, str] | None:
    """(program, answer) of one family; yes/no families aim at a yes or a no drawn evenly and counts at an answer
    drawn evenly from those the scene allows (CLEVR balances its answers too), so a majority guess stays near
    chance. No question names a pair in `banned` (training keeps held-out pairs out of its text too). None when
    the scene holds no such question."""
    if family == "count":
        return _count_question(rng, graph, banned)
    want = rng.choice(YES_NO) if ANSWERS[family] == YES_NO else None
    fallback = None
    for _ in range(_TRIES):
        program = _draft(rng, graph, family)
        if program is None or names_pair(family, program, banned):
            continue
        try:
            answer = execute(graph, family, program)
        except QuestionError:
            continue
        if want is None or answer == want:
            return program, answer
        fallback = fallback or (program, answer)
    return fallback
