"""The JSON report of one task (every prediction, so a score traces back to its examples) and its terminal table."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from .tasks import TASKS, Example, Scorer, load_examples, make_scorer

# Column order of the terminal table; a task shows the metrics it has.
METRIC_ORDER = (
    "accuracy", "cider_d", "human_cider_d", "cider_d_ratio", "bleu4", "precision", "recall", "f1", "yes_ratio",
    "unparsed",
)  # fmt: skip


def prediction_rows(examples: list[Example], scorer: Scorer) -> list[dict[str, Any]]:
    rows = []
    for i, (ex, pred) in enumerate(zip(examples, scorer.predictions, strict=True)):
        rows.append(
            {
                "id": ex.id,
                "image": ex.image,
                "question": ex.question,
                "prediction": pred,
                "references": ex.references,
                "score": scorer.scores[i],
                "correct": scorer.correct[i],
                "slices": ex.slices,
            }
        )
    return rows


def build_report(
    task: str, examples: list[Example], scorer: Scorer, *, checkpoint: str, data: str, image_root: str,
    engine: str, elapsed_s: float,
) -> dict[str, Any]:  # fmt: skip
    slices = scorer.slice_metrics()
    return {
        "task": task,
        "checkpoint": checkpoint,
        "data": data,
        "image_root": image_root,
        "engine": engine,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed_s, 2),
        "n": len(examples),
        "primary_metric": TASKS[task].primary,
        "metrics": {k: v for k, v in slices["overall"].items() if k != "n"},
        "slices": slices,
        "notes": scorer.notes,
        **scorer.info,
        "predictions": prediction_rows(examples, scorer),
    }


def format_table(report: dict[str, Any]) -> str:
    slices = report["slices"]
    metrics = [m for m in METRIC_ORDER if m in slices["overall"]]
    width = max(len(s) for s in slices) + 2
    title = f"{report['task']}  {report['checkpoint']}  engine={report['engine']}  n={report['n']}"
    cols = [max(11, len(m) + 2) for m in metrics]
    lines = [
        title,
        f"{'slice':<{width}}{'n':>6}" + "".join(f"{m:>{w}}" for m, w in zip(metrics, cols, strict=True)),
    ]
    for name, values in slices.items():
        cells = "".join(f"{values[m]:>{w}.4f}" for m, w in zip(metrics, cols, strict=True))
        lines.append(f"{name:<{width}}{values['n']:>6}" + cells)
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def evaluate(
    engine, task: str, data: str | Path, *, examples: list[Example] | None = None, image_root: str | None = None,
    limit: int | None = None, max_new_tokens: int | None = None, use_java: bool | None = None,
    progress: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Run one task on an engine (vlm.eval.engines) and return its report; `examples` skips reading `data`."""
    import time

    if examples is None:
        examples = load_examples(data, task, image_root, limit)
    start = time.perf_counter()
    requests = [(e.images, e.messages) for e in examples]
    max_new = max_new_tokens or TASKS[task].max_new_tokens
    predictions = engine.generate(requests, max_new_tokens=max_new, progress=progress)
    elapsed = time.perf_counter() - start
    scorer = make_scorer(task, examples, predictions, use_java)
    root = str(Path(image_root) if image_root else Path(data).parent)
    return build_report(
        task, examples, scorer, checkpoint=str(engine.checkpoint), data=str(data), image_root=root,
        engine=engine.name, elapsed_s=elapsed,
    )  # fmt: skip
