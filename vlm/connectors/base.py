"""The small interface every connector implements, and its typed config base."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import nn

from ..suggest import did_you_mean


@dataclasses.dataclass
class ConnectorConfig:
    """Base of each connector's typed config; subclasses add their own fields."""

    type: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ConnectorConfig:
        """Build from a dict (YAML preset or config.json), rejecting unknown keys by name."""
        values = {k: v for k, v in values.items() if k != "type"}
        known = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                raise ValueError(
                    f"unknown key {key!r} for connector {cls.type!r}{did_you_mean(key, known)} "
                    f"valid keys: {', '.join(known)}"
                )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **dataclasses.asdict(self)}


class Connector(nn.Module):
    """Maps tower features (B, P, Dv) to LLM input embeddings (B, N, Dllm)."""

    config_class: ClassVar[type[ConnectorConfig]]
    # Overrides `vlm init` applies with the tiny built-in tower/LLM so the base checkpoint stays a few MB.
    tiny_overrides: ClassVar[dict[str, Any]] = {}

    def __init__(
        self, config: ConnectorConfig, vision_hidden_size: int, text_hidden_size: int, num_patches: int
    ):
        super().__init__()
        self.config = config
        self.vision_hidden_size = vision_hidden_size
        self.text_hidden_size = text_hidden_size
        self.num_patches = num_patches

    @classmethod
    def num_tokens(cls, config: ConnectorConfig, num_patches: int) -> int:
        """Visual tokens one image takes in the LLM sequence, for a tower yielding `num_patches` features."""
        raise NotImplementedError

    def forward(self, features):  # (B, P, Dv) -> (B, N, Dllm)
        raise NotImplementedError
