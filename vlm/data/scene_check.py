"""`vlm data check` for scene-world VQA records: the family is known, the answer is in the family's closed set,
and the saved scene graph gives the same answer when the record's program is run on it again.

A record takes part when it has a `family` field. Its graph is found by `scene_id` in the scenes files
(scenes_train.jsonl, scenes_eval.jsonl) of the image root, as `vlm data synth --world scenes` writes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import scene_questions as sq
from .records import CheckReport, iter_file

SCENE_FILES = ("scenes_train.jsonl", "scenes_eval.jsonl")


def load_graphs(root: Path) -> dict[str, dict[str, Any]]:
    """Scene graphs by id from the scenes files under root (missing files: none). A line that is not a graph
    with an id and objects raises ValueError naming FILE:LINE."""
    graphs = {}
    for name in SCENE_FILES:
        path = root / name
        if not path.is_file():
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                graph = json.loads(line)
                graphs[str(graph["id"])] = graph
                ok = isinstance(graph["objects"], list) and isinstance(graph["width"], int)
            except (json.JSONDecodeError, KeyError, TypeError):
                ok = False
            if not ok:
                raise ValueError(f"{path}:{n}: not a scene graph (a JSON object with id, width and objects)")
    return graphs


def record_problems(record: dict[str, Any], graphs: dict[str, dict[str, Any]] | None) -> list[str]:
    """Problems of one record carrying `family`; graphs None means no scenes file was found."""
    family = record["family"]
    if family not in sq.FAMILIES:
        return [f"unknown question family {family!r}; expected one of {', '.join(sq.FAMILIES)}"]
    answers = record.get("answers") or [record["conversations"][-1]["value"]]
    allowed = sq.ANSWERS[family]
    problems = [
        f"answer {a!r} is not in the {family} answer set ({', '.join(allowed)})"
        for a in answers
        if a not in allowed
    ]
    if problems:  # a recomputed answer could only repeat that the answer is wrong
        return problems
    if "program" not in record or not isinstance(record["program"], dict):
        return problems + [
            "'program' (the question's program on its scene graph) is missing or not an object"
        ]
    if graphs is None:
        return problems + [
            f"no scene graphs ({' or '.join(SCENE_FILES)}) beside the file to recompute the answer"
        ]
    graph = graphs.get(str(record.get("scene_id")))
    if graph is None:
        return problems + [f"scene_id {record.get('scene_id')!r} is not in the scenes files"]
    try:
        expected = sq.execute(graph, family, record["program"])
    except sq.QuestionError as e:
        return problems + [f"the program is ill-posed on scene {graph['id']}: {e}"]
    if answers[0] != expected:
        problems.append(
            f"scene graph {graph['id']} gives the answer {expected!r}, the record says {answers[0]!r}"
        )
    return problems


def extend_report(report: CheckReport, root: Path) -> None:
    """Append scene problems to a `records.check_file` report (records already broken are skipped)."""
    bad_lines = {line for line, _, _ in report.problems}
    graphs: dict[str, dict[str, Any]] | None | bool = False  # loaded on the first scene record
    for line_no, record, error in iter_file(report.path):
        if error or line_no in bad_lines or not isinstance(record, dict) or "family" not in record:
            continue
        if graphs is False:
            graphs = load_graphs(root) or None
        messages = record_problems(record, graphs)
        rid = record.get("id")
        report.problems += [(line_no, None if rid in (None, "") else str(rid), m) for m in messages]
        report.n_ok -= bool(messages)
