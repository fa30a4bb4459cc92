"""POPE scoring: yes/no parsing as POPE's own evaluate.py does it, and its binary metrics ("yes" = positive).

Parsing: keep the first sentence, drop commas, split on spaces; "no", "No" or "not" among the words means no,
anything else means yes. So an answer that is neither (a tiny model saying "red") counts as yes, which the
yes-ratio exposes; `unparsed` counts those answers separately.
"""

from __future__ import annotations

import re


def parse_yes_no(answer: str) -> str:
    text = answer.split(".")[0] if "." in answer else answer
    words = text.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def is_unparsed(answer: str) -> bool:
    """Neither a yes nor a no word: parse_yes_no's "yes" for it is a default, not an answer."""
    return not {"yes", "no", "not"} & set(re.findall(r"[a-z]+", answer.lower()))


def pope_metrics(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """accuracy, precision, recall, f1, yes_ratio (share of answers parsed as yes) and unparsed share."""
    parsed = [parse_yes_no(p) for p in predictions]
    pairs = list(zip(parsed, labels, strict=True))
    tp = sum(p == "yes" and y == "yes" for p, y in pairs)
    fp = sum(p == "yes" and y == "no" for p, y in pairs)
    fn = sum(p == "no" and y == "yes" for p, y in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": sum(p == y for p, y in pairs) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": parsed.count("yes") / n if n else 0.0,
        "unparsed": sum(is_unparsed(p) for p in predictions) / n if n else 0.0,
    }
