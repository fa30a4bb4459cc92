"""Perceiver resampler connector (Flamingo/Idefics2): a fixed set of latents resamples the patches.

Same layout as transformers' `Idefics2Connector`, built from its own modules: a SwiGLU `modality_projection`
(Dv -> Dllm), then `perceiver_resampler` (Idefics2PerceiverResampler at the LLM width: latents attend with
keys/values from concat(context, latents), RMSNorm pre-norms, a final norm). Weight names therefore match
Idefics2's `connector.*`, plus our one addition, `position_embedding`.

Position: attention over the patches is a set operation, so without a signal the resampler cannot tell where a
patch was (measured: "where" questions stay at chance, notes/tiny-model-learning.md). We add a learned embedding
per patch to the projected features before resampling; it reaches keys and values of every layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import nn
from transformers.activations import ACT2FN
from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2MLP, Idefics2PerceiverResampler

from .base import Connector, ConnectorConfig
from .registry import register_connector


@dataclasses.dataclass
class PerceiverConfig(ConnectorConfig):
    num_latents: int = 64
    depth: int = 3
    num_heads: int = 16
    head_dim: int = 96
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    # Width of the SwiGLU modality projection; None = 4 x LLM hidden (Idefics2 uses the LLM's intermediate size).
    projection_intermediate_size: int | None = None
    position_embedding: bool = True
    new_checkpoint: ClassVar[dict[str, Any]] = {"output_scale": True}

    def __post_init__(self):
        for name in ("num_latents", "depth", "num_heads", "head_dim", "num_key_value_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"perceiver connector {name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_key_value_heads:
            raise ValueError(
                f"perceiver connector num_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.projection_intermediate_size is not None and self.projection_intermediate_size < 1:
            raise ValueError(
                f"perceiver connector projection_intermediate_size must be >= 1 or null, "
                f"got {self.projection_intermediate_size}"
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"perceiver connector hidden_act {self.hidden_act!r} is not a transformers activation"
            )
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(
                f"perceiver connector attention_dropout must be in [0, 1), got {self.attention_dropout}"
            )


@register_connector("perceiver")
class PerceiverConnector(Connector):
    config_class = PerceiverConfig
    # 64 latents are kept: the token count is part of what a tiny model exercises.
    tiny_overrides = {"depth": 2, "num_heads": 2, "head_dim": 32, "num_key_value_heads": 1}

    def __init__(
        self, config: PerceiverConfig, vision_hidden_size: int, text_hidden_size: int, num_patches: int
    ):
        super().__init__(config, vision_hidden_size, text_hidden_size, num_patches)
        self.modality_projection = Idefics2MLP(
            hidden_size=vision_hidden_size,
            intermediate_size=config.projection_intermediate_size or 4 * text_hidden_size,
            output_size=text_hidden_size,
            hidden_act=config.hidden_act,
        )
        self.position_embedding = (
            nn.Embedding(num_patches, text_hidden_size) if config.position_embedding else None
        )
        resampler_config = Idefics2PerceiverConfig(
            hidden_size=text_hidden_size,
            hidden_act=config.hidden_act,
            rms_norm_eps=config.rms_norm_eps,
            resampler_n_latents=config.num_latents,
            resampler_depth=config.depth,
            resampler_n_heads=config.num_heads,
            resampler_head_dim=config.head_dim,
            num_key_value_heads=config.num_key_value_heads,
            attention_dropout=config.attention_dropout,
            attn_implementation="sdpa",  # runs on CPU, meta and GPU without flash-attn
        )
        self.perceiver_resampler = Idefics2PerceiverResampler(resampler_config)
        self.reset_parameters()

    def reset_parameters(self):
        """Initialise the parameters no nn/transformers init covers; the other modules init themselves."""
        super().reset_parameters()
        # transformers' Idefics2 init sets every latent to ones: identical queries, identical outputs.
        nn.init.normal_(self.perceiver_resampler.latents, std=0.02)
        if self.position_embedding is not None:
            nn.init.normal_(self.position_embedding.weight, std=0.02)

    @classmethod
    def num_tokens(cls, config: PerceiverConfig, num_patches: int) -> int:
        return config.num_latents

    def forward(self, features):
        context = self.modality_projection(features)
        if self.position_embedding is not None:
            if context.shape[1] != self.num_patches:
                raise ValueError(
                    f"perceiver connector was built for {self.num_patches} patches (one position embedding "
                    f"each) but got {context.shape[1]}"
                )
            context = context + self.position_embedding.weight
        # Idefics2PerceiverResampler.forward insists on a padding mask and inspects its values (fails on meta
        # tensors); every patch is real here, so run its layers unmasked. Same arithmetic as its forward.
        resampler = self.perceiver_resampler
        latents = resampler.latents.unsqueeze(0).expand(context.shape[0], -1, -1)
        for layer in resampler.layers:
            latents = layer(latents, context, attention_mask=None)
        return self.scale_output(resampler.norm(latents))
