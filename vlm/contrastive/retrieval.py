"""FAISS retrieval over stage 0 embeddings, and the retrieval metrics (Recall@K, modality gap).

An index directory holds `index.faiss` (inner product on unit vectors = cosine) and `meta.json`: the modality of
its items, the items (image paths or texts), and the fingerprint of the towers that embedded them. A query with
another model is refused: its vectors would live in a different space.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .embed import Encoder

INDEX_FILE, META_FILE = "index.faiss", "meta.json"
MODALITIES = ("image", "text")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "retrieval needs faiss: pip install faiss-cpu (make bootstrap installs it)"
        ) from None
    return faiss


def flat_index(vectors: torch.Tensor):
    index = _faiss().IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors.numpy(), dtype=np.float32))
    return index


def build_index(encoder: Encoder, items: Sequence[str], modality: str, out: str | Path) -> Path:
    """Embed image paths or texts and write the index with its metadata."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if not items:
        raise ValueError("nothing to index: no images or texts given")
    items = [str(i) for i in items]
    vectors = encoder.embed_images(items) if modality == "image" else encoder.embed_texts(items)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _faiss().write_index(flat_index(vectors), str(out / INDEX_FILE))
    meta = {
        "modality": modality,
        "tower_fingerprint": encoder.fingerprint,
        "checkpoint": encoder.checkpoint,
        "dim": int(vectors.shape[1]),
        "count": len(items),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "items": [str(Path(i).resolve()) if modality == "image" else i for i in items],
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return out


def load_index(path: str | Path, encoder: Encoder):
    """(faiss index, meta), refusing an index built with other towers than `encoder`'s."""
    path = Path(path)
    if not (path / INDEX_FILE).is_file() or not (path / META_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not an index directory (needs {INDEX_FILE} and {META_FILE}; see `vlm index`)"
        )
    meta = json.loads((path / META_FILE).read_text())
    if meta["tower_fingerprint"] != encoder.fingerprint:
        raise ValueError(
            f"index {path} was built with towers {meta['tower_fingerprint']} ({meta['checkpoint']}), but the query "
            f"model {encoder.checkpoint} has {encoder.fingerprint}: rebuild the index with this model"
        )
    return _faiss().read_index(str(path / INDEX_FILE)), meta


def search(
    path: str | Path, encoder: Encoder, texts: Sequence[str] = (), images: Sequence = (), k: int = 5
) -> list[dict]:
    """Top-k items of the index for each query text and each query image (text->image, image->text, ...)."""
    index, meta = load_index(path, encoder)
    queries = [
        ("text", q, v) for q, v in zip(texts, encoder.embed_texts(texts) if texts else [], strict=True)
    ]
    queries += [
        ("image", str(q), v)
        for q, v in zip(images, encoder.embed_images(images) if images else [], strict=True)
    ]
    if not queries:
        raise ValueError("no query: give a text or an image")
    vectors = torch.stack([v for _, _, v in queries]).numpy()
    scores, ids = index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, meta["count"]))
    return [
        {
            "query": query,
            "query_modality": modality,
            "index_modality": meta["modality"],
            "hits": [
                {"item": meta["items"][i], "score": round(float(s), 6)}
                for s, i in zip(srow, irow, strict=True)
            ],
        }
        for (modality, query, _), srow, irow in zip(queries, scores, ids, strict=True)
    ]


def recall_at_k(
    image_emb: torch.Tensor, captions: Sequence[str], text_emb_of: dict[str, torch.Tensor], ks=(1, 5, 10)
) -> dict[str, float]:
    """Recall@K both ways on held-out pairs, through FAISS flat indexes.

    Identical captions describe equivalent scenes (the synthetic captions repeat), so a retrieved image counts
    when its caption equals the query, and the text gallery holds each distinct caption once.
    """
    unique = sorted(text_emb_of)
    text_emb = torch.stack([text_emb_of[c] for c in unique])
    kmax = max(ks)
    _, img_hits = flat_index(image_emb).search(text_emb.numpy(), min(kmax, len(captions)))  # text -> image
    _, txt_hits = flat_index(text_emb).search(image_emb.numpy(), min(kmax, len(unique)))  # image -> text
    out = {}
    for k in ks:
        t2i = [any(captions[j] == c for j in row[:k]) for c, row in zip(unique, img_hits, strict=True)]
        i2t = [any(unique[j] == c for j in row[:k]) for c, row in zip(captions, txt_hits, strict=True)]
        out[f"t2i_R@{k}"] = sum(t2i) / len(t2i)
        out[f"i2t_R@{k}"] = sum(i2t) / len(i2t)
    return out


def modality_gap(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """||mean image embedding - mean text embedding|| over paired unit vectors (Liang et al., 2022)."""
    return float((image_emb.mean(dim=0) - text_emb.mean(dim=0)).norm())
