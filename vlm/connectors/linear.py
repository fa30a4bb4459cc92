"""Linear connector (LLaVA-1.0): one projection per patch, so tokens per image = patches."""

from __future__ import annotations

import dataclasses

from torch import nn

from .base import Connector, ConnectorConfig
from .registry import register_connector


@dataclasses.dataclass
class LinearConfig(ConnectorConfig):
    bias: bool = True


@register_connector("linear")
class LinearConnector(Connector):
    config_class = LinearConfig

    def __init__(
        self, config: LinearConfig, vision_hidden_size: int, text_hidden_size: int, num_patches: int
    ):
        super().__init__(config, vision_hidden_size, text_hidden_size, num_patches)
        self.proj = nn.Linear(vision_hidden_size, text_hidden_size, bias=config.bias)

    @classmethod
    def num_tokens(cls, config: LinearConfig, num_patches: int) -> int:
        return num_patches

    def forward(self, features):
        return self.scale_output(self.proj(features))
