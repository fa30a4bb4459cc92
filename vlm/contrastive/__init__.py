"""Stage 0: contrastive image-text towers (CLIP InfoNCE / SigLIP sigmoid), zero-shot classification, retrieval
and embeddings. The trained vision tower feeds `vlm init --tower PATH`."""

from .embed import Encoder, embed_images, embed_texts, load_encoder

__all__ = ["Encoder", "embed_images", "embed_texts", "load_encoder"]
