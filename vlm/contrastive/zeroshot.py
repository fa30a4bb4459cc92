"""Zero-shot classification with a stage 0 dual encoder.

Each label becomes several prompts (templates); their text embeddings are L2-normalised, averaged and
renormalised (prompt ensembling, as in CLIP). An image's class scores are cosine similarities; the calibrated
probabilities are a softmax over labels at the model's learned temperature. The classifier abstains ("unknown")
when the top probability is below `min_score` or its margin over the second is below `min_margin`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .embed import Encoder

UNKNOWN = "unknown"
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {} shape.",
    "a picture of a {}.",
    "a small {}.",
    "a large {}.",
    "a {} at the top left.",
    "a {} at the bottom right.",
)


def read_lines(path: str | Path, what: str) -> list[str]:
    """Non-blank, non-comment (#) lines; an empty file or duplicates are errors that name them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
    lines = [s for s in lines if s and not s.startswith("#")]
    if not lines:
        raise ValueError(f"{what} file {path} is empty (one {what[:-1]} per line)")
    duplicates = sorted(k for k, n in Counter(s.lower() for s in lines).items() if n > 1)
    if duplicates:
        raise ValueError(f"{what} file {path} has duplicates: {', '.join(duplicates)}")
    return lines


def check_templates(templates: Sequence[str]) -> list[str]:
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(
            f"each prompt template needs exactly one '{{}}' for the label; bad: {bad or '(none given)'}"
        )
    return list(templates)


@torch.no_grad()
def class_embeddings(encoder: Encoder, labels: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(labels, D): per label, the renormalised mean of its normalised template embeddings."""
    templates = check_templates(templates)
    prompts = [t.format(label) for label in labels for t in templates]
    emb = encoder.embed_texts(prompts).view(len(labels), len(templates), -1)  # rows are unit vectors
    return F.normalize(emb.mean(dim=1), dim=-1)


@dataclasses.dataclass
class Abstention:
    min_score: float = 0.0  # on the top calibrated probability
    min_margin: float = 0.0  # top-1 minus top-2 probability


def predict(
    encoder: Encoder,
    image_emb: torch.Tensor,
    classes: torch.Tensor,
    labels: Sequence[str],
    top_k: int,
    rule: Abstention,
) -> list[dict]:
    """Per image: label (or "unknown"), top-k labels with cosine scores and calibrated probabilities."""
    cosine = image_emb @ classes.T
    probs = torch.softmax(encoder.logit_scale * cosine, dim=-1)
    k = min(top_k, len(labels))
    order = probs.argsort(dim=-1, descending=True)
    results = []
    for row in range(len(image_emb)):
        idx = order[row].tolist()
        p1 = float(probs[row, idx[0]])
        margin = p1 - (float(probs[row, idx[1]]) if len(idx) > 1 else 0.0)
        abstain = p1 < rule.min_score or margin < rule.min_margin
        results.append(
            {
                "label": UNKNOWN if abstain else labels[idx[0]],
                "abstained": abstain,
                "top_k": [
                    {
                        "label": labels[i],
                        "score": round(float(cosine[row, i]), 6),
                        "prob": round(float(probs[row, i]), 6),
                    }
                    for i in idx[:k]
                ],
            }
        )
    return results


def classify(
    encoder: Encoder,
    images: Sequence,
    labels: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    top_k: int = 3,
    rule: Abstention | None = None,
) -> list[dict]:
    if len(labels) < 2:
        raise ValueError(f"zero-shot classification needs at least two labels, got {list(labels)}")
    classes = class_embeddings(encoder, labels, templates)
    return predict(encoder, encoder.embed_images(images), classes, labels, top_k, rule or Abstention())


def selective_accuracy(predictions: list[dict], truth: Sequence[str]) -> dict[str, float]:
    """Coverage (share answered) and accuracy on the answered ones; accuracy_top1 ignores abstention."""
    answered = [(p["label"], t) for p, t in zip(predictions, truth, strict=True) if not p["abstained"]]
    top1 = sum(p["top_k"][0]["label"] == t for p, t in zip(predictions, truth, strict=True))
    return {
        "accuracy_top1": top1 / len(truth),
        "coverage": len(answered) / len(truth),
        "selective_accuracy": (sum(a == t for a, t in answered) / len(answered)) if answered else 0.0,
    }
