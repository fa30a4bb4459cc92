"""Evaluation tasks: reading LLaVA-format eval records into examples, and scoring predictions per task.

An eval record is a LLaVA record whose last turn is the reference answer (`gpt`), with optional reference and
slice fields: `answers` (list of reference strings; default: the last turn), `question_type`, `num_objects`,
`image_size`, `pope_split`, the multi-image records' `num_images`, and the scenes world's `family` (question
family) and `pair` (heldout when the question involves a colour-shape pair no training scene shows) (see
data/README.md). Everything before the last turn is the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.records import conversation_to_messages, iter_file, record_images, validate_record
from . import caption_metric, pope
from .slices import group_by_slice
from .vqa_metric import normalize_answer, vqa_score

MAX_PROBLEMS_SHOWN = 10


@dataclass(frozen=True)
class TaskSpec:
    name: str
    primary: str  # the metric bars and the slice chart use
    slice_fields: tuple[str, ...]
    max_new_tokens: int


TASKS = {
    "vqa": TaskSpec(
        "vqa",
        "accuracy",
        ("question_type", "family", "pair", "phrasing", "num_objects", "num_images", "image_size"),
        16,
    ),
    "caption": TaskSpec("caption", "cider_d", ("num_objects", "image_size"), 48),
    # Detailed descriptions (every object with colour, size, shape, position): scored as captions, longer.
    "describe": TaskSpec("describe", "cider_d", ("num_objects", "image_size"), 128),
    "pope": TaskSpec("pope", "f1", ("pope_split", "pair", "num_objects", "image_size"), 8),
}


@dataclass
class Example:
    id: str
    image: str  # as written in the record (relative to the image root)
    images: list[str]  # resolved paths
    messages: list[dict[str, Any]]  # the prompt: every turn before the reference answer
    question: str
    references: list[str]
    slices: dict[str, str] = field(default_factory=dict)


def _references(record: dict[str, Any], last: dict[str, Any], task: str) -> list[str] | str:
    """The reference answers, or a problem message."""
    refs = record.get("answers", [last.get("value")])
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        return f"'answers' must be a non-empty list of strings, got {refs!r}"
    if task == "pope" and [r.strip().lower() for r in refs] not in (["yes"], ["no"]):
        return f"a POPE record needs exactly one answer, yes or no, got {refs!r}"
    return refs


def _example(record: dict[str, Any], root: Path, spec: TaskSpec, seen: set[Path]) -> Example | str:
    turns = record["conversations"]
    if turns[-1].get("from") not in ("gpt", "assistant"):
        return "the last turn must be the reference answer (from gpt)"
    refs = _references(record, turns[-1], spec.name)
    if isinstance(refs, str):
        return refs
    images = [p if Path(p).is_absolute() else str(root / p) for p in record_images(record)]
    for path in map(Path, images):
        if path not in seen and not path.is_file():
            return f"image not found: {path}"
        seen.add(path)
    messages = conversation_to_messages(turns[:-1])
    question = str(messages[-1]["content"]).replace("<image>", "").strip()
    slices = {f: str(record[f]) for f in spec.slice_fields if record.get(f) is not None}
    return Example(
        str(record["id"]), ", ".join(record_images(record)), images, messages, question, refs, slices
    )


def load_examples(
    path: str | Path, task: str, image_root: str | Path | None = None, limit: int | None = None
) -> list[Example]:
    """Examples of one eval file; malformed records raise one ValueError listing them (FILE:LINE [id]: ...)."""
    spec, path = TASKS[task], Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval data not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    examples, problems, seen = [], [], set()
    for line_no, record, error in iter_file(path):
        if limit is not None and len(examples) + len(problems) >= limit:
            break
        found = [error] if error else validate_record(record, line_no=line_no)
        if not found:
            made = _example(record, root, spec, seen)
            found = [made] if isinstance(made, str) else []
            if not found:
                examples.append(made)
        problems += [f"{path}:{line_no}: {p}" for p in found]
    if problems:
        shown = "\n  ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = len(problems) - MAX_PROBLEMS_SHOWN
        raise ValueError(
            f"{len(problems)} malformed eval record(s):\n  {shown}"
            + (f"\n  ... {more} more" if more > 0 else "")
        )
    if not examples:
        raise ValueError(f"{path} holds no eval records")
    return examples


class Scorer:
    """Per-example scores and `metrics(indices)` for any subset (a slice) of the examples."""

    notes: list[str]
    info: dict[str, str]

    def __init__(self, examples: list[Example], predictions: list[str]):
        self.examples, self.predictions = examples, predictions
        self.scores: list[float] = []
        self.correct: list[bool] = []
        self.notes, self.info = [], {}

    def metrics(self, idx: list[int]) -> dict[str, float]:
        raise NotImplementedError

    def slice_metrics(self) -> dict[str, dict[str, float]]:
        groups = group_by_slice(range(len(self.examples)), lambda i: self.examples[i].slices)
        return {name: {"n": len(idx), **self.metrics(idx)} for name, idx in groups.items()}


class VQAScorer(Scorer):
    def __init__(self, examples, predictions):
        super().__init__(examples, predictions)
        self.scores = [vqa_score(p, e.references) for e, p in zip(examples, predictions, strict=True)]
        self.correct = [s >= 1.0 for s in self.scores]
        self.notes.append(
            "VQA accuracy: official normalisation; min(#matches/3, 1) over leave-one-out subsets"
        )

    def metrics(self, idx):
        return {"accuracy": sum(self.scores[i] for i in idx) / len(idx)}


class CaptionScorer(Scorer):
    def __init__(self, examples, predictions, use_java: bool | None = None):
        super().__init__(examples, predictions)
        refs = [e.references for e in examples]
        self.tok_preds, self.tok_refs, tokenizer = caption_metric.tokenize_pairs(predictions, refs, use_java)
        _, self.scores = caption_metric.cider_d(self.tok_preds, self.tok_refs)
        _, self.bleu = caption_metric.bleu4(self.tok_preds, self.tok_refs)
        self.correct = [p in r for p, r in zip(self.tok_preds, self.tok_refs, strict=True)]
        self.human = caption_metric.human_cider_d(self.tok_refs)
        self.info["tokenizer"] = tokenizer
        self.notes += [f"tokenizer: {tokenizer}", caption_metric.IDF_NOTE]
        self.notes.append(
            "slice CIDEr-D is the mean per-image score within the slice (IDF from the whole set)"
        )
        self.notes.append(
            "human_cider_d: the human-agreement ceiling (each reference vs the others, as COCO's human CIDEr); "
            "cider_d_ratio = cider_d / human_cider_d"
            if self.human is not None
            else "no human-agreement ceiling: some image has fewer than 2 references"
        )

    def metrics(self, idx):
        bleu, _ = caption_metric.bleu4([self.tok_preds[i] for i in idx], [self.tok_refs[i] for i in idx])
        out = {"cider_d": sum(self.scores[i] for i in idx) / len(idx), "bleu4": bleu}
        if self.human is not None:
            out["human_cider_d"] = sum(self.human[i] for i in idx) / len(idx)
            out["cider_d_ratio"] = out["cider_d"] / out["human_cider_d"] if out["human_cider_d"] > 0 else 0.0
        return out


class POPEScorer(Scorer):
    def __init__(self, examples, predictions):
        super().__init__(examples, predictions)
        self.labels = [normalize_answer(e.references[0]) for e in examples]
        parsed = [pope.parse_yes_no(p) for p in predictions]
        self.correct = [p == y for p, y in zip(parsed, self.labels, strict=True)]
        self.scores = [float(c) for c in self.correct]
        self.notes.append("POPE parsing: 'no'/'not' in the first sentence means no, anything else yes")

    def metrics(self, idx):
        return pope.pope_metrics([self.predictions[i] for i in idx], [self.labels[i] for i in idx])


def make_scorer(
    task: str, examples: list[Example], predictions: list[str], use_java: bool | None = None
) -> Scorer:
    if task in ("caption", "describe"):
        return CaptionScorer(examples, predictions, use_java)
    return {"vqa": VQAScorer, "pope": POPEScorer}[task](examples, predictions)
