"""Image loading shared by training data, evaluation and serving: strict decoding, never half an image."""

from __future__ import annotations

from PIL import Image, ImageFile


def load_strict(image: Image.Image) -> None:
    """`image.load()` that fails on truncated data, whatever `ImageFile.LOAD_TRUNCATED_IMAGES` says.

    A truncated file must be an error, never a silently half-grey picture; and the flag is process-global, so
    another library (lmms-eval sets it to True on import) could otherwise turn that off for us.
    """
    previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        image.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
