"""Per-slice scores and the minimum bars `vlm eval --bars FILE` enforces.

A slice is "overall" or "<field>=<value>" (question_type=colour, phrasing=heldout, num_objects=2, image_size=32,
pope_split=..., num_images=4 for multi-image records, and for the scenes world family=count, pair=heldout), taken
from the example's record fields. The bars file is YAML: either task sections

    vqa:
      overall: 0.9
      question_type=position: {accuracy: 0.5}
    pope:
      pope_split=adversarial: 0.6

(a task without a section has no bars), or one flat mapping of slice -> minimum for the task being run. A bare
number is a minimum of the task's primary metric (vqa: accuracy, caption and describe: cider_d, pope: f1); a
mapping names metrics (caption: also human_cider_d, the human-agreement ceiling, and cider_d_ratio to it), each
with a number (a minimum) or bounds:

    pope:
      overall: {f1: 0.9, unparsed: {max: 0.01}, yes_ratio: {min: 0.4, max: 0.6}}
    vqa:
      phrasing=heldout: {accuracy: {within: 0.1, of: phrasing=seen}}  # at most 0.1 below the seen phrasings

A bar on an unknown task, slice or metric is an error, not a pass: a typo must not hide a regression.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

OVERALL = "overall"
BOUND_KEYS = ("min", "max", "within", "of")
SLICE_FIELDS = (
    "question_type", "family", "pair", "phrasing", "num_objects", "num_images", "image_size", "pope_split",
)  # fmt: skip


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


def _check_number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"bar {where}: expected a number, got {value!r}")
    return float(value)


def _as_bounds(slice_name: str, bar: Any, primary: str) -> dict[str, dict[str, Any]]:
    """metric -> {"min", "max", "within", "of"} (the keys given). A number is a minimum."""
    bar = bar if isinstance(bar, dict) else {primary: bar}
    out = {}
    for metric, bound in bar.items():
        where = f"{slice_name}.{metric}"
        if not isinstance(bound, dict):
            out[str(metric)] = {"min": _check_number(where, bound)}
            continue
        unknown = set(bound) - set(BOUND_KEYS)
        if unknown or not bound or ("within" in bound) != ("of" in bound):
            raise ValueError(
                f"bar {where}: expected a number or a mapping of min / max / (within and of), got {bound!r}"
            )
        out[str(metric)] = {
            k: (str(v) if k == "of" else _check_number(f"{where}.{k}", v)) for k, v in bound.items()
        }
    return out


def _misses(
    slice_metrics: dict[str, dict[str, float]], slice_name: str, metric: str, bound: dict
) -> list[str]:
    value = slice_metrics[slice_name][metric]
    misses = []
    if "min" in bound and value < bound["min"]:
        misses.append(f"{slice_name}: {metric} {value:.4f} < {bound['min']:g}")
    if "max" in bound and value > bound["max"]:
        misses.append(f"{slice_name}: {metric} {value:.4f} > {bound['max']:g}")
    if "of" in bound:
        if bound["of"] not in slice_metrics:
            raise ValueError(f"bar {slice_name}.{metric}.of: unknown slice {bound['of']!r}")
        drop = slice_metrics[bound["of"]][metric] - value
        if drop > bound["within"]:
            misses.append(
                f"{slice_name}: {metric} {value:.4f} is {drop:.4f} below {bound['of']} (allowed {bound['within']:g})"
            )
    return misses


def check_bars(slice_metrics: dict[str, dict[str, float]], bars: dict[str, Any], primary: str) -> list[str]:
    """One message per bar not met; [] when all are. Unknown slices or metrics raise ValueError."""
    failures = []
    for slice_name, bar in bars.items():
        slice_name = str(slice_name)
        if slice_name not in slice_metrics:
            raise ValueError(f"bar on unknown slice {slice_name!r}; this run has: {', '.join(slice_metrics)}")
        metrics = slice_metrics[slice_name]
        for metric, bound in _as_bounds(slice_name, bar, primary).items():
            if metric not in metrics:
                raise ValueError(f"bar on unknown metric {slice_name}.{metric}; it has: {', '.join(metrics)}")
            failures += _misses(slice_metrics, slice_name, metric, bound)
    return failures
