"""Embeddings from a stage 0 checkpoint: L2-normalised image and text vectors in the shared space.

from vlm.contrastive import load_encoder
enc = load_encoder("runs/stage0/final")
enc.embed_images(["a.png", pil_image])  # (N, D) float32 tensor, unit rows
enc.embed_texts(["a red circle."])
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ..constants import IMAGE_SUFFIXES
from .data import open_image
from .losses import MAX_LOGIT_SCALE
from .model import load_dual_encoder, tokenize, tower_fingerprint


class Encoder:
    def __init__(self, checkpoint: str | Path, batch_size: int = 64):
        self.checkpoint = str(checkpoint)
        self.model, self.tokenizer, self.processor = load_dual_encoder(checkpoint)
        self.batch_size = batch_size

    @functools.cached_property
    def fingerprint(self) -> str:
        return tower_fingerprint(self.model.hf)

    @property
    def logit_scale(self) -> float:
        """The learned multiplier of cosine similarities (InfoNCE's clamp applied)."""
        return float(self.model.hf.logit_scale.detach().clamp(max=MAX_LOGIT_SCALE).exp())

    @property
    def logit_bias(self) -> float | None:
        bias = getattr(self.model.hf, "logit_bias", None)
        return None if bias is None or self.model.meta.loss != "sigmoid" else float(bias.detach())

    @torch.no_grad()
    def embed_images(self, images: Sequence[str | Path | Image.Image]) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = [
                i if isinstance(i, Image.Image) else open_image(i)
                for i in images[start : start + self.batch_size]
            ]
            pixels = self.processor(chunk, return_tensors="pt")["pixel_values"]
            out.append(self.model.image_embeds(pixels))
        return _stack(out, self.model)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            inputs = tokenize(
                self.tokenizer, list(texts[start : start + self.batch_size]), self.model.meta.max_text_length
            )
            out.append(self.model.text_embeds(**inputs))
        return _stack(out, self.model)


def _stack(parts: list[torch.Tensor], model) -> torch.Tensor:
    if not parts:
        raise ValueError("nothing to embed: the input list is empty")
    return torch.cat(parts).float()


@functools.lru_cache(maxsize=2)
def load_encoder(checkpoint: str | Path) -> Encoder:
    return Encoder(checkpoint)


def embed_images(checkpoint: str | Path, images: Sequence[str | Path | Image.Image]) -> torch.Tensor:
    return load_encoder(str(checkpoint)).embed_images(images)


def embed_texts(checkpoint: str | Path, texts: Sequence[str]) -> torch.Tensor:
    return load_encoder(str(checkpoint)).embed_texts(texts)


def expand_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, directories expanded to their image files (sorted); a missing path is an error."""
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"image not found: {path}")
    return out
