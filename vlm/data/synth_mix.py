"""Stage 2 mix sources beyond short VQA and yes/no (LLaVA-665K-like), and the text-only LM corpus.

- conversation: multi-turn talk about one image with full-sentence answers (LLaVA-Instruct's conversations);
- text: text-only instruction samples about the synthetic world, no image (LLaVA mixes in ShareGPT text);
- lm: language-pretraining records (`make lm`): descriptions, text-grounded dialogue and text instructions.

All take a scene's facts and its own RNG; none uses `synth_text.HELDOUT_QUESTIONS`.
"""

from __future__ import annotations

import random
from typing import Any

from . import synth_para as para
from .pope import ALL_OBJECTS, with_article
from .synth_text import COUNT_WORDS, PLURALS, QUADRANTS, QUESTIONS, SHORT_ANSWER

Turns = list[tuple[str, str]]  # (human, gpt)

_COUNT_QUESTIONS = ("How many shapes can be seen here?", "How many objects does the picture have?")
# Follow-up questions per topic: (about one object, about several); the count turn comes first, so "it"/"they"
# gives nothing away.
_FOLLOW_UPS = {
    "colour": (
        ("What colour is it?", "What colour are they?"),
        ("It is {colour}.", "They are all {colour}."),
    ),
    "shape": (("What shape is it?", "What shape are they?"), ("It is a {shape}.", "They are {plural}.")),
    "size": (("Is it small or large?", "Are they small or large?"), ("It is {size}.", "They are {size}.")),
    "position": (("Where is it?", "Where are they?"), ("It is {pos}.", "They are {pos}.")),
}
_ALSO = "Do you also see {}?"
_CAPTION_REQUEST = "Can you describe the whole picture?"
_NARRATIVE_PROMPTS = (
    "Describe a picture made of coloured shapes.",
    "Tell me about a picture with shapes on a white background.",
    "Write a few sentences about a simple drawing.",
)
_CONTEXT = (
    "Read this caption: {}",
    "Here is a description of a picture: {}",
    "Imagine a picture: {}",
)
_PARAPHRASE = ("Say this in other words: {}", "Rewrite this caption in different words: {}")
_EXPAND = "Here is a short caption: {}\nWrite a detailed description of each object."
_SUMMARISE = "Write a short caption for this description: {}"
_TEXT_YESNO = "According to the caption, is there {}? " + SHORT_ANSWER
_CORNERS = {"circle": "0", "square": "4", "triangle": "3"}
_NEIGHBOURS = {  # (relation, quadrant) -> answer
    ("to the right of", "top left"): "top right",
    ("to the left of", "top right"): "top left",
    ("to the right of", "bottom left"): "bottom right",
    ("to the left of", "bottom right"): "bottom left",
    ("below", "top left"): "bottom left",
    ("below", "top right"): "bottom right",
    ("above", "bottom left"): "top left",
    ("above", "bottom right"): "top right",
}


def _position(f: para.Facts) -> str:
    return para.position_phrase("at the {q}", list(f.quadrants))


def _counted(f: para.Facts) -> str:
    n = len(f.quadrants)
    noun = f.shape if n == 1 else PLURALS[f.shape]
    return f"There is one {noun}." if n == 1 else f"There are {COUNT_WORDS[n]} {noun}."


def _also(f: para.Facts, rng: random.Random) -> tuple[str, str]:
    present = f"{f.colour} {f.shape}"
    if rng.random() < 0.5:
        return _ALSO.format(with_article(present)), f"Yes, there is {with_article(present)}."
    absent = rng.choice([o for o in ALL_OBJECTS if o != present])
    return _ALSO.format(with_article(absent)), f"No, there is no {absent}."


def conversation_turns(f: para.Facts, rng: random.Random) -> Turns:
    """A count turn, then two to four follow-ups in random order."""
    many = len(f.quadrants) > 1
    values = {"colour": f.colour, "shape": f.shape, "plural": PLURALS[f.shape], "size": f.size}
    values["pos"] = _position(f)
    turns = [(rng.choice(_COUNT_QUESTIONS), _counted(f))]
    topics = list(_FOLLOW_UPS) + ["also", "caption"]
    rng.shuffle(topics)
    for topic in topics[: rng.randint(2, 4)]:
        if topic == "also":
            turns.append(_also(f, rng))
        elif topic == "caption":
            turns.append((_CAPTION_REQUEST, para.sample("caption", f, rng)))
        else:
            questions, answers = _FOLLOW_UPS[topic]
            turns.append((questions[many], answers[many].format(**values)))
    return turns


def _short_answer(question_type: str, f: para.Facts) -> str:
    return {"colour": f.colour, "shape": f.shape, "count": str(len(f.quadrants))}.get(
        question_type, f.quadrants[0]
    )


def _reading(f: para.Facts, rng: random.Random) -> Turns:
    """Short-answer questions about a caption given in text (seen phrasings only)."""
    types = ["colour", "shape", "count"] + (["position"] if len(f.quadrants) == 1 else [])
    rng.shuffle(types)
    context = rng.choice(_CONTEXT).format(para.sample("caption", f, rng))
    turns = []
    for i, qt in enumerate(types[: rng.randint(1, len(types))]):
        question = f"{rng.choice(QUESTIONS[qt])}\n{SHORT_ANSWER}"
        turns.append((f"{context}\n{question}" if i == 0 else question, _short_answer(qt, f)))
    return turns


def _fact(rng: random.Random) -> Turns:
    kind = rng.randrange(3)
    if kind == 0:
        shape = rng.choice(list(_CORNERS))
        return [(f"How many corners does a {shape} have? {SHORT_ANSWER}", _CORNERS[shape])]
    if kind == 1:
        (relation, quadrant), answer = rng.choice(list(_NEIGHBOURS.items()))
        return [(f"Which part of a picture is {relation} the {quadrant}? {SHORT_ANSWER}", answer)]
    shape = rng.choice(list(PLURALS))
    return [(f"What is the plural of {shape}?", PLURALS[shape])]


def text_turns(f: para.Facts, rng: random.Random) -> Turns:
    """One text-only instruction task about a scene's facts, drawn at random."""
    kind = rng.randrange(6)
    cap = para.sample("caption", f, rng)
    if kind == 0:
        return _reading(f, rng)
    if kind == 1:
        other = para.sample("caption", f, rng)
        return [(rng.choice(_PARAPHRASE).format(cap), other)]
    if kind == 2:
        return [(_EXPAND.format(cap), para.sample("description", f, rng))]
    if kind == 3:
        return [(_SUMMARISE.format(para.sample("description", f, rng)), cap)]
    if kind == 4:
        obj = rng.choice(ALL_OBJECTS)
        label = "yes" if obj == f"{f.colour} {f.shape}" else "no"
        return [(f"Caption: {cap}\n" + _TEXT_YESNO.format(with_article(obj)), label)]
    return _fact(rng)


def narrative_turns(f: para.Facts, rng: random.Random) -> Turns:
    text = f"{para.sample('caption', f, rng)} {para.sample('description', f, rng)}"
    return [(rng.choice(_NARRATIVE_PROMPTS), text)]


def grounded_dialogue(f: para.Facts, rng: random.Random) -> Turns:
    """A conversation about a picture given in text: the first question follows its caption."""
    turns = conversation_turns(f, rng)
    context = rng.choice(_CONTEXT).format(para.sample("caption", f, rng))
    return [(f"{context}\n{turns[0][0]}", turns[0][1])] + turns[1:]


def to_conversations(turns: Turns, image: bool) -> list[dict[str, str]]:
    """(human, gpt) pairs -> LLaVA turns; with an image, the first human turn carries the image token."""
    out: list[dict[str, str]] = []
    for i, (q, a) in enumerate(turns):
        out.append({"from": "human", "value": f"<image>\n{q}" if image and i == 0 else q})
        out.append({"from": "gpt", "value": a})
    return out


def text_record(record_id: str, turns: Turns) -> dict[str, Any]:
    """A text-only record: no "image" key."""
    return {"id": record_id, "conversations": to_conversations(turns, image=False)}


def corpus_strings() -> list[str]:
    """Every fixed string above, with each value filled in, for the tokenizer corpus."""
    texts = list(_COUNT_QUESTIONS) + list(_NARRATIVE_PROMPTS) + [_CAPTION_REQUEST]
    texts += [t.format("") for t in _CONTEXT + _PARAPHRASE + (_EXPAND, _SUMMARISE)]
    for questions, answers in _FOLLOW_UPS.values():
        texts += list(questions) + list(answers)
    for obj in ALL_OBJECTS:
        texts += [
            _ALSO.format(with_article(obj)),
            _TEXT_YESNO.format(with_article(obj)),
            f"No, there is no {obj}.",
        ]
    texts += [f"How many corners does a {s} have?" for s in _CORNERS] + list(_CORNERS.values())
    texts += [f"Which part of a picture is {r} the {q}?" for r, q in _NEIGHBOURS] + list(QUADRANTS)
    texts += [f"What is the plural of {s}?" for s in PLURALS] + list(PLURALS.values())
    texts += ["It is", "They are all", "There is one", "There are", "Yes, there is", "Caption:"]
    return texts
