"""doc_to_* hooks of the vlm_synth_vqa lmms-eval task (records from `vlm data synth`)."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from vlm.eval.vqa_metric import vqa_score


def doc_to_visual(doc):
    root = Path(os.environ.get("VLM_SYNTH_DIR", "data/synth"))
    with Image.open(root / doc["image"]) as img:
        return [img.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["conversations"][0]["value"].replace("<image>", "").strip()


def doc_to_target(doc):
    return doc["answers"][0]


def process_results(doc, results):
    return {"vqa_accuracy": vqa_score(results[0], doc["answers"])}
