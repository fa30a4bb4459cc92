"""Names and values shared across layers, defined once (the bottom of the import graph: imports nothing)."""

IMAGE_TOKEN = "<image>"  # the placeholder a prompt carries per image; expanded to N ids by the processor
IGNORE_INDEX = -100  # label id that the loss skips (PyTorch's cross-entropy default)
# Files treated as images when a directory is listed: the formats the media policy decodes (vlm/serve/media.py).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
