"""`vlm zeroshot`, `vlm embed`, `vlm index`, `vlm search` and `vlm serve-embeddings` for stage 0 checkpoints.

Wired into vlm/cli.py with `add_parser(subparsers)`. Results are JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CKPT_HELP = "stage 0 checkpoint directory (vlm train stages/stage0.yaml -> runs/stage0/final)"


def _print_lines(rows) -> None:
    for row in rows:
        print(json.dumps(row))


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from .embed import expand_images, load_encoder
    from .zeroshot import DEFAULT_TEMPLATES, Abstention, classify, read_lines

    labels = read_lines(args.labels, "labels")
    templates = read_lines(args.templates, "templates") if args.templates else list(DEFAULT_TEMPLATES)
    if args.no_ensemble:
        templates = templates[:1]
    images = expand_images(args.images)
    rule = Abstention(args.min_score, args.min_margin)
    results = classify(load_encoder(args.checkpoint), images, labels, templates, args.top_k, rule)
    _print_lines({"image": str(path), **r} for path, r in zip(images, results, strict=True))
    return 0


def _texts(args: argparse.Namespace) -> list[str]:
    from .zeroshot import read_lines

    texts = list(args.text or [])
    if args.texts:
        texts += read_lines(args.texts, "texts")
    return texts


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from .embed import expand_images, load_encoder

    encoder = load_encoder(args.checkpoint)
    texts, images = _texts(args), expand_images(args.images or [])
    if not texts and not images:
        raise ValueError("nothing to embed: give --text/--texts and/or --images")
    inputs = [("text", t) for t in texts] + [("image", str(p)) for p in images]
    parts = ([encoder.embed_texts(texts)] if texts else []) + (
        [encoder.embed_images(images)] if images else []
    )
    vectors = np.concatenate([p.numpy() for p in parts])
    if args.out:
        np.save(args.out, vectors)
        Path(args.out).with_suffix(".jsonl").write_text(
            "".join(json.dumps({"modality": m, "input": i}) + "\n" for m, i in inputs)
        )
        print(
            json.dumps(
                {"out": str(args.out), "shape": list(vectors.shape), "tower_fingerprint": encoder.fingerprint}
            )
        )
    else:
        _print_lines(
            {"modality": m, "input": i, "embedding": v.round(6).tolist()}
            for (m, i), v in zip(inputs, vectors, strict=True)
        )
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from .embed import expand_images, load_encoder
    from .retrieval import build_index

    if bool(args.images) == bool(args.texts):
        raise ValueError("index either --images (for text->image search) or --texts (for image->text search)")
    items = expand_images(args.images) if args.images else _texts(args)
    out = build_index(load_encoder(args.checkpoint), items, "image" if args.images else "text", args.out)
    meta = json.loads((out / "meta.json").read_text())
    print(
        json.dumps(
            {k: meta[k] for k in ("modality", "count", "dim", "tower_fingerprint")} | {"index": str(out)}
        )
    )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .embed import expand_images, load_encoder
    from .retrieval import search

    images = expand_images(args.image or [])
    _print_lines(search(args.index, load_encoder(args.model), texts=args.text or [], images=images, k=args.k))
    return 0


def cmd_serve_embeddings(args: argparse.Namespace) -> int:
    from .server import serve

    return serve(args)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("zeroshot", help="zero-shot image classification with a stage 0 dual encoder")
    p.add_argument("checkpoint", help=CKPT_HELP)
    p.add_argument("--labels", required=True, type=Path, help="one label per line (e.g. 'red circle')")
    p.add_argument("--images", required=True, nargs="+", help="image files and/or directories")
    p.add_argument(
        "--templates", type=Path, default=None, help="prompt templates, one per line, each with '{}'"
    )
    p.add_argument("--no-ensemble", action="store_true", help="use only the first template")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--min-score", type=float, default=0.0, help="abstain below this top-1 probability")
    p.add_argument(
        "--min-margin", type=float, default=0.0, help="abstain below this top-1 minus top-2 probability"
    )
    p.set_defaults(func=cmd_zeroshot)

    p = subparsers.add_parser("embed", help="image/text embeddings from a stage 0 dual encoder")
    p.add_argument("checkpoint", help=CKPT_HELP)
    _add_inputs(p)
    p.add_argument(
        "--out", type=Path, default=None, help="write an .npy (+ .jsonl inputs) instead of JSON lines"
    )
    p.set_defaults(func=cmd_embed)

    p = subparsers.add_parser("index", help="build a FAISS index of image (or text) embeddings")
    p.add_argument("checkpoint", help=CKPT_HELP)
    _add_inputs(p)
    p.add_argument("--out", required=True, type=Path, help="index directory to write")
    p.set_defaults(func=cmd_index)

    p = subparsers.add_parser("search", help="top-k search of a `vlm index` by text or image")
    p.add_argument("index", type=Path)
    p.add_argument("--model", required=True, help="the stage 0 checkpoint the index was built with")
    p.add_argument(
        "--text", action="append", help="a query text (repeatable): text -> image on an image index"
    )
    p.add_argument(
        "--image", action="append", help="a query image (repeatable): image -> text on a text index"
    )
    p.add_argument("-k", type=int, default=5)
    p.set_defaults(func=cmd_search)

    p = subparsers.add_parser(
        "serve-embeddings", help="OpenAI-style /v1/embeddings server for a stage 0 model"
    )
    p.add_argument("checkpoint", help=CKPT_HELP)
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--api-key", default=None, help="required bearer key (as for vlm serve)")
    p.add_argument("--api-key-file", default=None, help="read the key from this file (or set VLLM_API_KEY)")
    p.add_argument(
        "--allowed-local-media-path", default=None, help="directory file:// image URLs may read from"
    )
    p.set_defaults(func=cmd_serve_embeddings)


def _add_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", nargs="+", default=None, help="image files and/or directories")
    p.add_argument("--texts", type=Path, default=None, help="a file of texts, one per line")
    p.add_argument("--text", action="append", default=None, help="a text (repeatable)")
