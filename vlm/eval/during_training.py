"""Eval during training: the `vlm.training_evals` plugin the training loop calls every `eval.every` steps.

The loop (vlm/train/periodic_eval.py) sits in a sibling layer and finds this class through the entry point. It
reads each task's first `limit` held-out records once, then on each call generates greedily with the model being
trained (`ModelEngine`, transformers `generate`; no vLLM inside training) and scores exactly as `vlm eval` does.
Returns {"<task>/<metric>": value}, e.g. {"vqa/accuracy": 0.61, "caption/cider_d": 0.4, "pope/f1": 0.7}.
"""

from __future__ import annotations

from typing import Any

from .engines import ModelEngine
from .report import evaluate
from .tasks import load_examples


class TrainingEval:
    def __init__(self, settings: Any, processor):
        """settings: the recipe's `eval` section (tasks.named() -> {task: path}, limit, image_root, batch_size)."""
        self.settings, self.processor = settings, processor
        self.jobs = [
            (task, path, load_examples(path, task, settings.image_root, settings.limit))
            for task, path in settings.tasks.named().items()
        ]

    def __call__(self, model, synced_gpus: bool = False, label: str = "in-training") -> dict[str, float]:
        engine = ModelEngine(model, self.processor, self.settings.batch_size, label, synced_gpus)
        results: dict[str, float] = {}
        for task, path, examples in self.jobs:
            report = evaluate(engine, task, path, examples=examples, image_root=self.settings.image_root)
            results.update({f"{task}/{metric}": value for metric, value in report["metrics"].items()})
        return results
