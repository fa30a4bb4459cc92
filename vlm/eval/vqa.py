"""VQA exact-match evaluation with transformers `generate` (greedy), broken down by question type.

Answers are compared after light normalisation (case, surrounding whitespace and final punctuation); the official
VQA normalisation and the vLLM engine arrive with the evaluation work.
"""

from __future__ import annotations

import json
import string
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.records import conversation_to_messages, load_llava_dataset
from ..model import VLMForConditionalGeneration
from ..processing import VLMProcessor


def normalize(answer: str) -> str:
    return answer.strip().lower().strip(string.punctuation + " ")


@dataclass
class VQAReport:
    n: int = 0
    correct: int = 0
    by_type: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    predictions: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def slice_accuracy(self) -> dict[str, float]:
        return {k: c / n for k, (c, n) in sorted(self.by_type.items())}

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "by_type": self.slice_accuracy(),
            "predictions": self.predictions,
        }


def _prompt(processor: VLMProcessor, record: dict) -> str:
    messages = conversation_to_messages(record)
    question = [m for m in messages if m["role"] != "assistant"]
    return processor.apply_chat_template(question, add_generation_prompt=True)


def _images(paths: list[str]):
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in paths]


@torch.no_grad()
def evaluate_vqa(
    checkpoint: str | Path,
    data: str | Path,
    batch_size: int = 32,
    limit: int | None = None,
    max_new_tokens: int = 8,
) -> VQAReport:
    model = VLMForConditionalGeneration.from_pretrained(str(checkpoint)).eval()
    processor = VLMProcessor.from_pretrained(str(checkpoint))
    processor.tokenizer.padding_side = "left"  # batched greedy decoding of a decoder-only LLM
    records = load_llava_dataset(data)
    if limit:
        records = records.select(range(min(limit, len(records))))
    report = VQAReport()
    for start in tqdm(range(0, len(records), batch_size), desc="vqa", unit="batch"):
        batch = records.select(range(start, min(start + batch_size, len(records))))
        prompts = [_prompt(processor, r) for r in batch]
        images = [img for r in batch for img in _images(r["images"])]
        inputs = processor(text=prompts, images=images or None, padding=True, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for record, text in zip(batch, texts, strict=True):
            answers = (
                json.loads(record["answers"]) if isinstance(record["answers"], str) else record["answers"]
            )
            ok = normalize(text) in {normalize(a) for a in answers}
            kind = record.get("question_type") or "all"
            report.n += 1
            report.correct += ok
            report.by_type[kind][0] += ok
            report.by_type[kind][1] += 1
            report.predictions.append(
                {"id": record["id"], "prediction": text, "answers": answers, "correct": ok}
            )
    return report
