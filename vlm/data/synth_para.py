"""Paraphrased captions and detailed descriptions of a scene, COCO-style: many correct wordings of one truth.

A wording is a choice from each option list below (word order, synonyms, phrasings of position). Every choice
states every fact of the scene, so any two paraphrases are equally right. Training draws one per sample;
held-out images get K distinct ones as references (the canonical wording first). `variants()` enumerates every
choice, so the tokenizer corpus covers every word a paraphrase can use.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .synth_text import PLURALS, caption

N_REFERENCES = 5  # references per held-out image, as COCO

_COUNT_WORDS = {1: ("a", "one", "a single"), 2: ("two",), 3: ("three",)}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
# Quadrant names in two vocabularies; a wording uses one throughout.
_QUADRANT_WORDS = (
    {
        "top left": "top left",
        "top right": "top right",
        "bottom left": "bottom left",
        "bottom right": "bottom right",
    },
    {
        "top left": "upper left",
        "top right": "upper right",
        "bottom left": "lower left",
        "bottom right": "lower right",
    },
)
_NOUN_PHRASES = ("{count} {size} {colour} {noun}", "{count} {size} {noun} in {colour}")
_POSITIONS = ("at the {q}", "in the {q}", "in the {q} {corner}")
_CAPTIONS = (
    "{np} {pos}.",
    "there {be} {np} {pos}.",
    "{pos}, there {be} {np}.",
    "the image shows {np} {pos}.",
    "a picture of {np} {pos}.",
    "{np} on a white background, {pos}.",
)
# Detailed descriptions: an opening, one sentence per object (quadrant order), and an optional closing.
_OPENINGS = {
    1: ("there is one object.", "the image contains one shape.", "you can see one object."),
    2: ("there are two objects.", "the image contains two shapes.", "you can see two objects."),
    3: ("there are three objects.", "the image contains three shapes.", "you can see three objects."),
}
_OBJECT_SENTENCES = (
    "a {size} {colour} {shape} is {pos}.",
    "{pos} there is a {size} {colour} {shape}.",
    "the one {pos} is a {size} {colour} {shape}.",
)
_CLOSINGS = ("", " the background is white.", " everything else is white.")


@dataclass(frozen=True)
class Facts:
    shape: str
    colour: str
    size: str
    quadrants: tuple[str, ...]  # canonical QUADRANTS order


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def position_phrase(template: str, quadrants: Sequence[str]) -> str:
    corner = "corner" if len(quadrants) == 1 else "corners"
    return template.format(q=_join(quadrants), corner=corner)


def _caption(f: Facts, choice: tuple[int, ...]) -> str:
    template, np_i, count_i, size_i, quad_i, pos_i = choice
    n = len(f.quadrants)
    np = _NOUN_PHRASES[np_i].format(
        count=_COUNT_WORDS[n][count_i],
        size=_SIZE_WORDS[f.size][size_i],
        colour=f.colour,
        noun=f.shape if n == 1 else PLURALS[f.shape],
    )
    pos = position_phrase(_POSITIONS[pos_i], [_QUADRANT_WORDS[quad_i][q] for q in f.quadrants])
    return _CAPTIONS[template].format(np=np, pos=pos, be="is" if n == 1 else "are")


def _caption_choices(f: Facts) -> list[tuple[int, ...]]:
    sizes = (_CAPTIONS, _NOUN_PHRASES, _COUNT_WORDS[len(f.quadrants)], _SIZE_WORDS[f.size])
    return _product(tuple(len(s) for s in sizes + (_QUADRANT_WORDS, _POSITIONS)))


@functools.cache
def _product(lengths: tuple[int, ...]) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(n) for n in lengths)))


def _description(f: Facts, choice: tuple[int, ...]) -> str:
    opening_i, sentence_i, size_i, quad_i, pos_i, closing_i = choice
    size = _SIZE_WORDS[f.size][size_i]
    sentences = [_OPENINGS[len(f.quadrants)][opening_i]]
    for q in f.quadrants:
        pos = position_phrase(_POSITIONS[pos_i], [_QUADRANT_WORDS[quad_i][q]])
        sentences.append(
            _OBJECT_SENTENCES[sentence_i].format(size=size, colour=f.colour, shape=f.shape, pos=pos)
        )
    return " ".join(sentences) + _CLOSINGS[closing_i]


def _description_choices(f: Facts) -> list[tuple[int, ...]]:
    sizes = (_OPENINGS[len(f.quadrants)], _OBJECT_SENTENCES, _SIZE_WORDS[f.size], _QUADRANT_WORDS, _POSITIONS)
    return _product(tuple(len(s) for s in sizes + (_CLOSINGS,)))


_KINDS = {"caption": (_caption, _caption_choices), "description": (_description, _description_choices)}


def canonical(kind: str, f: Facts) -> str:
    """The first wording: for captions, `synth_text.caption` exactly (the pre-paraphrase format)."""
    if kind == "caption":
        return caption(f.shape, f.colour, f.size, list(f.quadrants))
    render, choices = _KINDS[kind]
    return render(f, choices(f)[0])


def sample(kind: str, f: Facts, rng: random.Random) -> str:
    """One wording drawn uniformly from every choice."""
    render, choices = _KINDS[kind]
    return render(f, rng.choice(choices(f)))


def references(kind: str, f: Facts, rng: random.Random, k: int = N_REFERENCES) -> list[str]:
    """k distinct wordings: the canonical one, then k - 1 drawn without repeats."""
    render, choices = _KINDS[kind]
    refs = {canonical(kind, f): None}
    all_choices = choices(f)
    for c in rng.sample(all_choices, len(all_choices)):  # a shuffle; render only until k are distinct
        if len(refs) == k:
            break
        refs[render(f, c)] = None
    if len(refs) < k:
        raise ValueError(f"only {len(refs)} distinct {kind} wordings for {f}, {k} wanted")
    return list(refs)


def variants(kind: str, f: Facts) -> Iterator[str]:
    """Every wording of one scene (for the tokenizer corpus)."""
    render, choices = _KINDS[kind]
    yield canonical(kind, f)
    for c in choices(f):
        yield render(f, c)
