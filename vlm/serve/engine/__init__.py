"""vLLM plugin: serves `VLMForConditionalGeneration` checkpoints on vLLM's engine (paged KV cache, continuous
batching, chunked prefill, prefix caching).

vLLM finds `register` through the `vllm.general_plugins` entry point (pyproject.toml) and calls it in every
process it starts (API server, engine core, workers), so it must be cheap and idempotent. Nothing here imports
vllm at package import time: `vlm` itself stays importable without the `serve` extra.
"""

from __future__ import annotations

import os

ARCHITECTURE = "VLMForConditionalGeneration"
_MODEL_CLASS = "vlm.serve.engine.model:VLMForConditionalGenerationVLLM"

# vLLM's CPU backend reserves this many GiB of KV cache; unset it takes most of the machine's RAM.
DEFAULT_CPU_KVCACHE_GIB = "1"


def set_engine_env() -> None:
    """Environment every engine start here relies on; an explicit user setting wins."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def register() -> None:
    from vllm import ModelRegistry

    from ... import register_auto_classes  # importing vlm registers model_type "vlm" with AutoConfig

    register_auto_classes()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # The string form is imported lazily, in the process that builds the model.
        ModelRegistry.register_model(ARCHITECTURE, _MODEL_CLASS)
