"""Named tower and LLM configs: tiny random-init ones for offline work and tests, and real-size ones for
token budgets and benchmarks (built on the meta device, without weights).

Anything that is not a preset name is treated as a hub id or a local path and goes through `from_pretrained`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig
from transformers.models.auto import CONFIG_MAPPING


@dataclasses.dataclass(frozen=True)
class Preset:
    model_type: str
    params: dict[str, Any]
    tiny: bool  # tiny presets get a locally trained tokenizer and the connectors' tiny overrides
    note: str = ""

    def build_config(self, **overrides) -> PretrainedConfig:
        return CONFIG_MAPPING[self.model_type](**{**self.params, **overrides})


_TINY_VISION = dict(
    image_size=32,
    patch_size=8,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
)

TOWER_PRESETS: dict[str, Preset] = {
    "clip": Preset(
        "clip_vision_model", _TINY_VISION, tiny=True, note="tiny CLIP: 32 px, patch 8, 16 patches"
    ),
    "siglip": Preset(
        "siglip_vision_model", _TINY_VISION, tiny=True, note="tiny SigLIP: 32 px, patch 8, 16 patches"
    ),
    "clip-vit-l-14-336": Preset(
        "clip_vision_model",
        dict(
            image_size=336,
            patch_size=14,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            projection_dim=768,
        ),
        tiny=False,
        note="openai/clip-vit-large-patch14-336 (LLaVA-1.5)",
    ),
    "siglip-so400m-14-384": Preset(
        "siglip_vision_model",
        dict(
            image_size=384,
            patch_size=14,
            hidden_size=1152,
            num_hidden_layers=27,
            num_attention_heads=16,
            intermediate_size=4304,
        ),
        tiny=False,
        note="google/siglip-so400m-patch14-384",
    ),
}

# head_dim 64 (>= 32): vLLM's CPU attention only supports certain head sizes. The context holds a real tower's
# image (CLIP-L/14-336 + mlp: 576 tokens) with room for a conversation, as LLaVA-1.5's 2048 does.
_TINY_TEXT = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=256,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)

LLM_PRESETS: dict[str, Preset] = {
    "llama": Preset(
        "llama", {**_TINY_TEXT, "num_key_value_heads": 2}, tiny=True, note="tiny Llama, head_dim 64"
    ),
    "qwen2": Preset(
        "qwen2", {**_TINY_TEXT, "num_key_value_heads": 1}, tiny=True, note="tiny Qwen2 (GQA), head_dim 64"
    ),
    "qwen2-0.5b": Preset(
        "qwen2",
        dict(  # Qwen/Qwen2-0.5B's config.json (make real-shapes trains and serves it with random weights)
            hidden_size=896,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            intermediate_size=4864,
            vocab_size=151936,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        ),
        tiny=False,
        note="Qwen2-0.5B shape: head_dim 64, GQA 14/2, tied 151,936-token embedding",
    ),
    "llama-7b": Preset(
        "llama",
        dict(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            intermediate_size=11008,
            vocab_size=32000,
            max_position_embeddings=4096,
        ),
        tiny=False,
        note="Llama-2/Vicuna-7B shape (LLaVA-1.5)",
    ),
    "qwen2-7b": Preset(
        "qwen2",
        dict(
            hidden_size=3584,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            intermediate_size=18944,
            vocab_size=152064,
            max_position_embeddings=32768,
        ),
        tiny=False,
        note="Qwen2-7B shape",
    ),
}


# The context is no part of a preset's shape: an LLM pretrained before the tiny context grew is still tiny.
_NOT_SHAPE = {"max_position_embeddings"}


def tiny_preset_of(config: PretrainedConfig, presets: dict[str, Preset]) -> str | None:
    """The tiny preset whose shape `config` has, or None: a part pretrained here from a tiny preset (make stage0's
    tower, make lm's LLM) is tiny too, so connectors get their tiny overrides on it as on the preset itself."""
    for name, preset in presets.items():
        if (
            preset.tiny
            and config.model_type == preset.model_type
            and all(getattr(config, k, None) == v for k, v in preset.params.items() if k not in _NOT_SHAPE)
        ):
            return name
    return None
