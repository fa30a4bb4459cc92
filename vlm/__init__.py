"""vlm: train (DeepSpeed) and serve (vLLM) LLaVA/BLIP-2 style vision-language models.

Importing the package registers `VLMConfig` (model_type "vlm") with transformers' Auto classes, so
`AutoConfig`, `AutoModelForImageTextToText` and `AutoProcessor` open our checkpoints.
"""

import os

import torch

# DeepSpeed (imported by transformers when installed) prints an accelerator-detection warning to stdout on
# import; naming the accelerator up front keeps CLI output (JSON, tables) clean.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from .config import MODEL_TYPE, VLMConfig  # noqa: E402
from .model import VLMForConditionalGeneration  # noqa: E402
from .processing import VLMProcessor  # noqa: E402

__version__ = "0.1.0"


def register_auto_classes() -> None:
    """Idempotent: safe to call from every process (vLLM calls plugins more than once)."""
    AutoConfig.register(MODEL_TYPE, VLMConfig, exist_ok=True)
    AutoModelForImageTextToText.register(VLMConfig, VLMForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(VLMConfig, VLMProcessor, exist_ok=True)


register_auto_classes()

__all__ = ["VLMConfig", "VLMForConditionalGeneration", "VLMProcessor", "register_auto_classes", "__version__"]
