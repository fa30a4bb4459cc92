"""Stage 0 evaluation on the held-out synthetic split: zero-shot accuracy (single prompt vs ensemble), abstention,
Recall@1/5/10 both ways and the modality gap, for a trained dual encoder vs a random-init one.

    OMP_NUM_THREADS=1 .venv/bin/python bench/contrastive.py runs/stage0/final [--data data/synth]

The random-init baseline is the same family, loss and seed as the trained checkpoint, built untrained.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from vlm.contrastive.data import load_pairs
from vlm.contrastive.embed import Encoder
from vlm.contrastive.model import build_dual_encoder, load_dual_encoder, save_dual_encoder
from vlm.contrastive.retrieval import modality_gap, recall_at_k
from vlm.contrastive.zeroshot import (
    DEFAULT_TEMPLATES,
    Abstention,
    class_embeddings,
    predict,
    selective_accuracy,
)
from vlm.data.synth import COLOURS, SHAPES

SINGLE = ("a photo of a {}.",)
THRESHOLDS = (Abstention(min_score=0.5), Abstention(min_score=0.8, min_margin=0.3))


def scenes(data: Path) -> list[dict]:
    rows = [json.loads(line) for line in (data / "scenes_eval.jsonl").read_text().splitlines()]
    for r in rows:
        r["path"] = str(data / r["image"])
    return rows


TASKS = {
    "shape": (list(SHAPES), lambda s: s["shape"]),
    "colour": (list(COLOURS), lambda s: s["colour"]),
    "colour+shape": ([f"{c} {s}" for c in COLOURS for s in SHAPES], lambda s: f"{s['colour']} {s['shape']}"),
}


def zero_shot(encoder: Encoder, rows: list[dict], image_emb) -> dict:
    out = {}
    for task, (labels, truth_of) in TASKS.items():
        truth = [truth_of(r) for r in rows]
        for name, templates in (("single", SINGLE), ("ensemble", DEFAULT_TEMPLATES)):
            classes = class_embeddings(encoder, labels, templates)
            preds = predict(encoder, image_emb, classes, labels, 3, Abstention())
            out[f"{task}/{name}"] = selective_accuracy(preds, truth)["accuracy_top1"]
            if task == "colour+shape" and name == "ensemble":
                for rule in THRESHOLDS:
                    key = f"abstain p>={rule.min_score}, margin>={rule.min_margin}"
                    out[key] = selective_accuracy(
                        predict(encoder, image_emb, classes, labels, 3, rule), truth
                    )
    return out


def evaluate(checkpoint: str, data: Path) -> dict:
    encoder = Encoder(checkpoint)
    rows = scenes(data)
    image_emb = encoder.embed_images([r["path"] for r in rows])
    pairs = {p.image: p.caption for p in load_pairs(data / "caption_eval.jsonl")}
    captions = [pairs[str(Path(r["path"]).resolve())] for r in rows]
    unique = sorted(set(captions))
    text_emb_of = dict(zip(unique, encoder.embed_texts(unique), strict=True))
    paired_text = encoder.embed_texts(captions)
    return {
        "zero_shot": zero_shot(encoder, rows, image_emb),
        "retrieval": recall_at_k(image_emb, captions, text_emb_of),
        "modality_gap": modality_gap(image_emb, paired_text),
        "logit_scale": encoder.logit_scale,
        "n_images": len(rows),
        "n_distinct_captions": len(unique),
    }


def random_twin(checkpoint: str, out: Path) -> str:
    trained, _, _ = load_dual_encoder(checkpoint)
    meta = trained.meta
    model, tokenizer, processor = build_dual_encoder(
        meta.family, meta.loss, 0, max_text_length=meta.max_text_length
    )
    return str(save_dual_encoder(model, tokenizer, processor, out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", type=Path, default=Path("data/synth"))
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "trained": evaluate(args.checkpoint, args.data),
            "random-init": evaluate(random_twin(args.checkpoint, Path(tmp) / "random"), args.data),
        }
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
