"""Q-Former connector (BLIP-2): learned queries cross-attend to the patches, then project to the LLM width.

Built from transformers' own `Blip2QFormerModel`, and the module names follow `Blip2ForConditionalGeneration`
(`query_tokens`, `qformer.*`, `language_projection.*`; `vision_norm` plays BLIP-2's `vision_model.post_layernorm`),
so BLIP-2 weights map onto ours by prefix and ours onto transformers'/vLLM's Blip2 code.

Position: cross-attention over the patches is a set operation, so without a signal the queries cannot tell
where a patch was (count and position stayed near chance). `position_embedding` adds a fixed 2-D sin-cos
embedding (MAE's: half the channels encode the row, half the column) to the normed patch features, so keys and
values of every cross-attention layer carry the patch's place on the grid. It is computed, not learned: no new
weight, so the weight names stay BLIP-2's. Old config.json files without the key load without it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel

from .base import Connector, ConnectorConfig
from .registry import register_connector


@dataclasses.dataclass
class QFormerConfig(ConnectorConfig):
    num_queries: int = 32
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    # BLIP-2 trains with 0.1; 0.0 keeps the connector deterministic unless a recipe opts in.
    dropout: float = 0.0
    position_embedding: bool = False  # 2-D sin-cos on the patch features; new checkpoints: on
    new_checkpoint: ClassVar[dict[str, Any]] = {"position_embedding": True, "output_scale": True}

    def __post_init__(self):
        for name in ("num_queries", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"qformer connector {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"qformer connector hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.cross_attention_frequency < 1:
            raise ValueError(
                f"qformer connector cross_attention_frequency must be >= 1 (1 = every layer), "
                f"got {self.cross_attention_frequency}"
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"qformer connector hidden_act {self.hidden_act!r} is not a transformers activation"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"qformer connector dropout must be in [0, 1), got {self.dropout}")


@register_connector("qformer")
class QFormerConnector(Connector):
    config_class = QFormerConfig
    # 32 queries are kept: the token count is part of what a tiny model exercises.
    tiny_overrides = {"hidden_size": 128, "num_layers": 2, "num_heads": 2, "intermediate_size": 256}

    def __init__(
        self, config: QFormerConfig, vision_hidden_size: int, text_hidden_size: int, num_patches: int
    ):
        super().__init__(config, vision_hidden_size, text_hidden_size, num_patches)
        self.grid = patch_grid(num_patches, vision_hidden_size) if config.position_embedding else None
        # The tower hands over un-normed layer -2 states; BLIP-2 cross-attends to LayerNorm'd features.
        self.vision_norm = nn.LayerNorm(vision_hidden_size, eps=1e-6)  # eps of Blip2VisionConfig
        self.query_tokens = nn.Parameter(torch.empty(1, config.num_queries, config.hidden_size))
        qformer_config = Blip2QFormerConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.dropout,
            layer_norm_eps=config.layer_norm_eps,
            cross_attention_frequency=config.cross_attention_frequency,
            encoder_hidden_size=vision_hidden_size,
            # sdpa runs everywhere (CPU, meta, GPU without flash-attn); the Q-Former does not support FA2 anyway.
            attn_implementation="sdpa",
        )
        self.qformer = Blip2QFormerModel(qformer_config)
        self.language_projection = nn.Linear(config.hidden_size, text_hidden_size)
        self.reset_parameters()

    def reset_parameters(self):
        """Initialise the one parameter no nn/transformers init covers; the other modules init themselves."""
        super().reset_parameters()
        # Normal(0.02) as in BLIP-2's LAVIS code; transformers' Blip2 init zeros them, which makes all queries equal.
        nn.init.normal_(self.query_tokens, std=0.02)

    @classmethod
    def num_tokens(cls, config: QFormerConfig, num_patches: int) -> int:
        return config.num_queries

    def forward(self, features):
        features = self.vision_norm(features)
        if self.grid is not None:
            if features.shape[1] != self.num_patches:
                raise ValueError(
                    f"qformer connector was built for {self.num_patches} patches (a {self.grid[0]}x{self.grid[1]} "
                    f"position grid) but got {features.shape[1]}"
                )
            features = features + sincos_2d(*self.grid, features.shape[-1], features.device, features.dtype)
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=features).last_hidden_state
        # Blip2QFormerModel computes in its own weights' dtype (kept fp32 by BLIP-2); hand back the projection's.
        return self.scale_output(self.language_projection(out.to(self.language_projection.weight.dtype)))


def patch_grid(num_patches: int, dim: int) -> tuple[int, int]:
    """(rows, cols) of a square patch grid; the 2-D embedding needs one, and a width divisible by 4."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"qformer position_embedding needs a square patch grid, got {num_patches} patches (a kept CLS "
            f"token? use vision_feature_select_strategy 'default'), or set position_embedding: false"
        )
    if dim % 4:
        raise ValueError(f"qformer position_embedding needs a vision width divisible by 4, got {dim}")
    return side, side


def sincos_2d(rows: int, cols: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """(rows * cols, dim) fixed embedding, row-major: [sin, cos] of the row in half the channels, of the column
    in the other half, at dim / 4 geometric frequencies (MAE's get_2d_sincos_pos_embed)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(rows, device=device, dtype=torch.float32),
        torch.arange(cols, device=device, dtype=torch.float32),
        indexing="ij",
    )
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        angles = pos[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).to(dtype or torch.float32)
