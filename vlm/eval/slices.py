"""Per-slice scores and the minimum bars `vlm eval --bars FILE` enforces.

A slice is "overall" or "<field>=<value>" (question_type=colour, phrasing=heldout, num_objects=2, image_size=32,
pope_split=...), taken from the example's record fields. The bars file is YAML: either task sections

    vqa:
      overall: 0.9
      question_type=position: {accuracy: 0.5}
    pope:
      pope_split=adversarial: 0.6

(a task without a section has no bars), or one flat mapping of slice -> minimum for the task being run. A bare
number is a minimum of the task's primary metric (vqa: accuracy, caption and describe: cider_d, pope: f1); a
mapping names metrics (caption: also human_cider_d, the human-agreement ceiling, and cider_d_ratio to it). A bar on an unknown task, slice or metric is an error, not a pass: a typo must not hide a regression.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

OVERALL = "overall"
SLICE_FIELDS = ("question_type", "phrasing", "num_objects", "image_size", "pope_split")


def slice_keys(slices: dict[str, str]) -> list[str]:
    return [OVERALL] + [f"{k}={v}" for k, v in slices.items()]


def _slice_order(name: str) -> tuple:
    if name == OVERALL:
        return (0, "", 0, "")
    field, _, value = name.partition("=")
    return (1, field, 0, int(value)) if value.isdigit() else (1, field, 1, value)


def group_by_slice(items: Sequence[Any], slices_of: Callable[[Any], dict[str, str]]) -> dict[str, list[Any]]:
    """Items per slice name, "overall" first, then by field and value (numbers numerically)."""
    groups: dict[str, list[Any]] = defaultdict(list)
    for item in items:
        for key in slice_keys(slices_of(item)):
            groups[key].append(item)
    return {k: groups[k] for k in sorted(groups, key=_slice_order)}


def load_bars(path: str | Path, task: str, tasks: Sequence[str]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bars file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a bars file is a YAML mapping (task -> slice -> minimum)")
    if any(k in tasks for k in data):
        unknown = [str(k) for k in data if k not in tasks]
        if unknown:
            raise ValueError(
                f"{path}: unknown task section(s) {', '.join(unknown)}; tasks: {', '.join(tasks)}"
            )
        data = data.get(task) or {}  # no section: no bars for this task
        if not isinstance(data, dict):
            raise ValueError(f"{path}: section {task!r} must map slice -> minimum")
    return data


def _as_minimums(slice_name: str, bar: Any, primary: str) -> dict[str, float]:
    bar = bar if isinstance(bar, dict) else {primary: bar}
    out = {}
    for metric, minimum in bar.items():
        if isinstance(minimum, bool) or not isinstance(minimum, (int, float)):
            raise ValueError(f"bar {slice_name}.{metric}: expected a number, got {minimum!r}")
        out[str(metric)] = float(minimum)
    return out


def check_bars(slice_metrics: dict[str, dict[str, float]], bars: dict[str, Any], primary: str) -> list[str]:
    """One message per bar not met; [] when all are. Unknown slices or metrics raise ValueError."""
    failures = []
    for slice_name, bar in bars.items():
        slice_name = str(slice_name)
        if slice_name not in slice_metrics:
            raise ValueError(f"bar on unknown slice {slice_name!r}; this run has: {', '.join(slice_metrics)}")
        metrics = slice_metrics[slice_name]
        for metric, minimum in _as_minimums(slice_name, bar, primary).items():
            if metric not in metrics:
                raise ValueError(f"bar on unknown metric {slice_name}.{metric}; it has: {', '.join(metrics)}")
            if metrics[metric] < minimum:
                failures.append(f"{slice_name}: {metric} {metrics[metric]:.4f} < {minimum:g}")
    return failures
