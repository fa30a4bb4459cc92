"""vLLM plugin: serves `VLMForConditionalGeneration` checkpoints on vLLM's engine (paged KV cache, continuous
batching, chunked prefill, prefix caching).

vLLM finds `register` through the `vllm.general_plugins` entry point (pyproject.toml) and calls it in every
process it starts (API server, engine core, workers), so it must be cheap and idempotent. Nothing here imports
vllm at package import time: `vlm` itself stays importable without the `serve` extra.
"""

from __future__ import annotations

import logging
import os

ARCHITECTURE = "VLMForConditionalGeneration"
_MODEL_CLASS = "vlm.serve.engine.model:VLMForConditionalGenerationVLLM"


class _OncePerDtypePair(logging.Filter):
    """vLLM warns once per tensor when a float32 checkpoint loads into bf16 parameters: keep the first."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Attempted to load weight") or len(record.args or ()) != 3:
            return True
        pair = (str(record.args[1]), str(record.args[2]))
        if pair in self.seen:
            return False
        self.seen.add(pair)
        record.msg = f"{record.msg} (and the other weights of that dtype, not listed)"
        return True


def _quiet_weight_dtype_warnings() -> None:
    """Only when logs are quieted (VLLM_LOGGING_LEVEL at WARNING or above): `vlm serve` keeps vLLM's logs."""
    level = logging.getLevelName(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())
    loader = logging.getLogger("vllm.model_executor.models.utils")
    if (
        isinstance(level, int)
        and level >= logging.WARNING
        and not any(isinstance(f, _OncePerDtypePair) for f in loader.filters)
    ):
        loader.addFilter(_OncePerDtypePair())


def register() -> None:
    from vllm import ModelRegistry

    from ... import register_auto_classes  # importing vlm registers model_type "vlm" with AutoConfig

    register_auto_classes()
    _quiet_weight_dtype_warnings()
    from . import media  # noqa: F401  registers the media connector `vlm serve` selects (VLLM_MEDIA_CONNECTOR)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # The string form is imported lazily, in the process that builds the model.
        ModelRegistry.register_model(ARCHITECTURE, _MODEL_CLASS)
