"""LLaVA records of one synthetic scene: the text drawn for it, its training records and its eval records.

Each record kind draws from its own RNG seeded by (seed, scene id, kind), so adding a kind never changes another.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import synth_mix as mix
from . import synth_para as para
from . import synth_text as text
from .synth_text import QUESTION_TYPES, SHORT_ANSWER

if TYPE_CHECKING:
    from .synth import Scene

HELDOUT_SHARE = 0.5  # of vqa_eval questions asked in a held-out phrasing


def kind_rng(seed: int, scene_id: str, kind: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across runs and PYTHONHASHSEED.
    return random.Random(f"vlm.synth/{seed}/{scene_id}/{kind}")


def facts(scene: Scene) -> para.Facts:
    return para.Facts(scene.shape, scene.colour, scene.size, tuple(scene.quadrants))


def short(question: str) -> str:
    """A short-answer question as LLaVA-1.5 asks it, in training and eval alike."""
    return f"{question}\n{SHORT_ANSWER}"


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
    """The text drawn for one scene: caption and description (one paraphrase each, with their instructions)
    and (question type, question in a seen phrasing, answer) triples."""

    instruction: str
    caption: str
    qa: list[tuple[str, str, str]]
    describe_instruction: str
    description: str


def scene_text(rng: random.Random, scene: Scene) -> SceneText:
    f = facts(scene)
    instruction = rng.choice(text.CAPTION_INSTRUCTIONS)
    cap = para.sample("caption", f, rng)
    qa = [
        (qt, rng.choice(text.QUESTIONS[qt]), text.answer(qt, scene.shape, scene.colour, scene.quadrants))
        for qt in _question_order(rng, scene)
    ]
    return SceneText(
        instruction, cap, qa, rng.choice(text.DESCRIBE_INSTRUCTIONS), para.sample("description", f, rng)
    )


def _record(scene: Scene, turns: mix.Turns, suffix: str = "", **fields: Any) -> dict[str, Any]:
    rid = scene.id + (f"-{suffix}" if suffix else "")
    return {
        "id": rid,
        "image": scene.image,
        "conversations": mix.to_conversations(turns, image=True),
        **fields,
    }


def train_records(scene: Scene, st: SceneText, seed: int) -> dict[str, list[dict]]:
    """Per training file name, this scene's records (yes/no comes from the whole scene set: see pope.py)."""
    f = facts(scene)
    lm = [
        mix.text_record(
            f"{scene.id}-lm-narrative", mix.narrative_turns(f, kind_rng(seed, scene.id, "lm-narrative"))
        ),
        mix.text_record(
            f"{scene.id}-lm-dialogue", mix.grounded_dialogue(f, kind_rng(seed, scene.id, "lm-dialogue"))
        ),
        mix.text_record(f"{scene.id}-lm-text", mix.text_turns(f, kind_rng(seed, scene.id, "lm-text"))),
    ]
    return {
        "caption_train": [_record(scene, [(st.instruction, st.caption)])],
        "vqa_train": [_record(scene, [(short(q), a) for _, q, a in _dialogue(st.qa)])],
        "describe_train": [_record(scene, [(st.describe_instruction, st.description)])],
        "conversation_train": [
            _record(scene, mix.conversation_turns(f, kind_rng(seed, scene.id, "conversation")))
        ],
        "text_train": [
            mix.text_record(f"{scene.id}-text", mix.text_turns(f, kind_rng(seed, scene.id, "text")))
        ],
        "lm_train": lm,
    }


def _eval_fields(scene: Scene, answers: list[str], question_type: str) -> dict[str, Any]:
    return {
        "answers": answers,
        "question_type": question_type,
        "num_objects": scene.count,
        "image_size": scene.width,
        "scene_id": scene.id,
    }


def _vqa_eval(scene: Scene, st: SceneText, rng: random.Random) -> list[dict]:
    """One question per record, about half in a held-out phrasing (`phrasing` names which)."""
    out = []
    for qt, q, a in sorted(st.qa, key=lambda t: QUESTION_TYPES.index(t[0])):
        heldout = rng.random() < HELDOUT_SHARE
        question = rng.choice(text.HELDOUT_QUESTIONS[qt]) if heldout else q
        fields = _eval_fields(scene, [a], qt) | {"phrasing": text.PHRASINGS[heldout]}
        out.append(_record(scene, [(short(question), a)], qt, **fields))
    return out


def eval_records(scene: Scene, st: SceneText, seed: int) -> dict[str, list[dict]]:
    """Per eval file name, this scene's records; the gpt turn is the first reference."""
    f, rng = facts(scene), kind_rng(seed, scene.id, "eval")
    caps = para.references("caption", f, rng)
    descs = para.references("description", f, rng)
    return {
        "caption_eval": [_record(scene, [(st.instruction, caps[0])], **_eval_fields(scene, caps, "caption"))],
        "describe_eval": [
            _record(scene, [(st.describe_instruction, descs[0])], **_eval_fields(scene, descs, "describe"))
        ],
        "vqa_eval": _vqa_eval(scene, st, rng),
    }
