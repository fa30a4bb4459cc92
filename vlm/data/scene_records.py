"""LLaVA records of one CLEVR-style scene: stage 2's sources, the LM corpus and the eval records.

Each record kind draws from its own RNG seeded by (seed, scene id, kind), as in the shapes world
(synth_records.py), so adding a kind never changes another. Eval VQA records carry their `family`, the
`program` that produced the answer (re-executed by `vlm data check`) and `pair`: "heldout" when the question
names or is about an object whose colour-shape pair the training scenes never show.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from typing import Any

from . import scene_questions as sq
from . import scene_text
from .scene_graph import pair_of
from .synth_mix import Turns, text_record, to_conversations
from .synth_text import CAPTION_INSTRUCTIONS, DESCRIBE_INSTRUCTIONS, SHORT_ANSWER

VQA_TURNS = 3  # questions per vqa_train record: six families in one record pass stage 2's max_length at 64 px
_COUNT_ALL = ("How many objects are there?", "How many shapes can be seen here?")
_CONTEXT = ("Read this caption: {}", "Here is a description of a picture: {}")
_NARRATIVE = ("Describe a picture made of coloured shapes.", "Write a few sentences about a simple drawing.")


def kind_rng(seed: int, scene_id: str, kind: str) -> random.Random:
    return random.Random(f"vlm.scenes/{seed}/{scene_id}/{kind}")


def short(question: str) -> str:
    return f"{question}\n{SHORT_ANSWER}"


def questions(
    graph: dict[str, Any], rng: random.Random, banned: Collection[str] = ()
) -> list[tuple[str, dict, str]]:
    """(family, program, answer) for each family the scene can hold, in FAMILIES order, none naming a pair in
    `banned`."""
    out = []
    for family in sq.FAMILIES:
        drawn = sq.draw_question(rng, graph, family, banned)
        if drawn is not None:
            out.append((family, *drawn))
    return out


def _record(graph: dict[str, Any], turns: Turns, suffix: str = "", **fields: Any) -> dict[str, Any]:
    rid = graph["id"] + (f"-{suffix}" if suffix else "")
    return {
        "id": rid,
        "image": graph["image"],
        "conversations": to_conversations(turns, image=True),
        **fields,
    }


def _sentence(family: str, program: dict, answer: str) -> str:
    """A full-sentence answer for conversations."""
    if family == "count":
        return {"0": "There are none.", "1": "There is one."}.get(answer, f"There are {answer}.")
    if family == "query_attribute":
        return f"It is {answer}."
    if family == "compare_attribute":
        return f"{'Yes' if answer == 'yes' else 'No'}, they are {'' if answer == 'yes' else 'not '}the same {program['attribute']}."
    return "Yes." if answer == "yes" else "No."


def _conversation(graph: dict[str, Any], qa: list[tuple[str, dict, str]], rng: random.Random) -> Turns:
    n = graph["count"]
    turns = [(rng.choice(_COUNT_ALL), f"There {'is one object' if n == 1 else f'are {n} objects'}.")]
    picked = rng.sample(qa, min(len(qa), rng.randint(1, 2)))  # more would pass max_length with six objects
    turns += [(sq.question_text(f, p), _sentence(f, p, a)) for f, p, a in picked]
    return turns + [("Can you describe the whole picture?", scene_text.caption(graph, rng))]


def _text_turns(graph: dict[str, Any], rng: random.Random, banned: Collection[str]) -> Turns:
    """Text-only: a caption given in words, then exist / count questions it answers (every object is named)."""
    context = rng.choice(_CONTEXT).format(scene_text.caption(graph, rng))
    turns = []
    for family in rng.sample(["exist", "count"], 2):
        drawn = sq.draw_question(rng, graph, family, banned)
        if drawn is not None:
            q = short(sq.question_text(family, drawn[0]))
            turns.append((f"{context}\n{q}" if not turns else q, drawn[1]))
    return turns


def train_records(graph: dict[str, Any], seed: int, heldout: Collection[str] = ()) -> dict[str, list[dict]]:
    """Per training file name, this scene's records (yes/no comes from the whole scene set: see pope.py). No
    question names a held-out pair: held out means absent from training images and text alike."""
    rng = kind_rng(seed, graph["id"], "train")
    qa = questions(graph, rng, heldout)
    rng.shuffle(qa)
    caption, description = scene_text.caption(graph, rng), scene_text.description(graph, rng)
    conv_rng, lm_rng = kind_rng(seed, graph["id"], "conversation"), kind_rng(seed, graph["id"], "lm")
    narrative = [(lm_rng.choice(_NARRATIVE), f"{scene_text.caption(graph, lm_rng)} {description}")]
    dialogue = _conversation(graph, qa, lm_rng)
    dialogue[0] = (f"{rng.choice(_CONTEXT).format(caption)}\n{dialogue[0][0]}", dialogue[0][1])
    return {
        "caption_train": [_record(graph, [(rng.choice(CAPTION_INSTRUCTIONS), caption)])],
        "vqa_train": [
            _record(
                graph, [(short(sq.question_text(f, p)), a) for f, p, a in qa[k : k + VQA_TURNS]], f"vqa{k}"
            )
            for k in range(0, len(qa), VQA_TURNS)
        ],
        "describe_train": [_record(graph, [(rng.choice(DESCRIBE_INSTRUCTIONS), description)])],
        "conversation_train": [_record(graph, _conversation(graph, qa, conv_rng))],
        "text_train": [
            text_record(
                f"{graph['id']}-text", _text_turns(graph, kind_rng(seed, graph["id"], "text"), heldout)
            )
        ],
        "lm_train": [
            text_record(f"{graph['id']}-lm-narrative", narrative),
            text_record(f"{graph['id']}-lm-dialogue", dialogue),
            text_record(f"{graph['id']}-lm-text", _text_turns(graph, lm_rng, heldout)),
        ],
    }


def involves_heldout(graph: dict, family: str, program: dict, heldout: set[str]) -> bool:
    """The question names a held-out pair, or is about an object that is one."""
    about = {pair_of(graph["objects"][i]) for i in sq.touched(graph, family, program)}
    return sq.names_pair(family, program, heldout) or bool(about & heldout)


def _eval_fields(graph: dict[str, Any], answers: list[str]) -> dict[str, Any]:
    return {
        "answers": answers,
        "num_objects": graph["count"],
        "image_size": graph["width"],
        "scene_id": graph["id"],
    }


def eval_records(graph: dict[str, Any], seed: int, heldout: set[str]) -> dict[str, list[dict]]:
    """Per eval file name, this scene's records: one VQA record per family, 5 caption and description refs."""
    rng = kind_rng(seed, graph["id"], "eval")
    caps = scene_text.references("caption", graph, rng)
    descs = scene_text.references("description", graph, rng)
    vqa = []
    for family, program, answer in questions(graph, rng):
        pair = "heldout" if involves_heldout(graph, family, program, heldout) else "seen"
        fields = _eval_fields(graph, [answer]) | {"family": family, "pair": pair, "program": program}
        vqa.append(_record(graph, [(short(sq.question_text(family, program)), answer)], family, **fields))
    return {
        "caption_eval": [
            _record(
                graph,
                [(rng.choice(CAPTION_INSTRUCTIONS), caps[0])],
                **_eval_fields(graph, caps),
                question_type="caption",
            )
        ],  # fmt: skip
        "describe_eval": [
            _record(
                graph,
                [(rng.choice(DESCRIBE_INSTRUCTIONS), descs[0])],
                **_eval_fields(graph, descs),
                question_type="describe",
            )
        ],  # fmt: skip
        "vqa_eval": vqa,
    }


def corpus_strings() -> list[str]:
    return list(_COUNT_ALL + _CONTEXT + _NARRATIVE) + [
        "Can you describe the whole picture?",
        "It is",
        "There are",
    ]
