"""MLP connector (LLaVA-1.5 `mlp2x_gelu`): Linear, then (activation, Linear) x (depth - 1)."""

from __future__ import annotations

import dataclasses

from torch import nn
from transformers.activations import ACT2FN

from .base import Connector, ConnectorConfig
from .registry import register_connector


@dataclasses.dataclass
class MLPConfig(ConnectorConfig):
    depth: int = 2
    bias: bool = True
    # A transformers activation name (Llava's `projector_hidden_act`); LLaVA-1.5 uses gelu.
    hidden_act: str = "gelu"

    def __post_init__(self):
        if self.depth < 1:
            raise ValueError(f"mlp connector depth must be >= 1, got {self.depth}")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"mlp connector hidden_act {self.hidden_act!r} is not a transformers activation")


@register_connector("mlp")
class MLPConnector(Connector):
    config_class = MLPConfig

    def __init__(self, config: MLPConfig, vision_hidden_size: int, text_hidden_size: int, num_patches: int):
        super().__init__(config, vision_hidden_size, text_hidden_size, num_patches)
        layers: list[nn.Module] = [nn.Linear(vision_hidden_size, text_hidden_size, bias=config.bias)]
        for _ in range(config.depth - 1):
            layers += [
                ACT2FN[config.hidden_act],
                nn.Linear(text_hidden_size, text_hidden_size, bias=config.bias),
            ]
        # Index layout for depth 2 (proj.0, proj.2) maps one-to-one onto Llava's linear_1/linear_2.
        self.proj = nn.Sequential(*layers)

    @classmethod
    def num_tokens(cls, config: MLPConfig, num_patches: int) -> int:
        return num_patches

    def forward(self, features):
        return self.scale_output(self.proj(features))
