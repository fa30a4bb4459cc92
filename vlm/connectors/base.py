"""The small interface every connector implements, and its typed config base."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn

from ..registry import RegisteredConfig


@dataclasses.dataclass
class ConnectorConfig(RegisteredConfig):
    """Base of each connector's typed config; subclasses add their own fields.

    A field's default is what a config.json written before the field existed means, so old checkpoints load
    as they were built. `new_checkpoint` holds the values `vlm init` gives a new checkpoint instead, where a
    preset or option does not say otherwise.
    """

    kind: ClassVar[str] = "connector"
    new_checkpoint: ClassVar[dict[str, Any]] = {}

    # A learnable scale on the output (stored as its log, so Adam's steps are relative), set at `vlm init` so
    # image tokens start at the RMS of the LLM's text embeddings (a final norm otherwise gives ~1 vs ~0.02).
    output_scale: bool = False


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
        # Shape (1,), not a 0-dim scalar: ZeRO-3 cannot partition 0-dim parameters.
        self.log_output_scale = nn.Parameter(torch.zeros(1)) if config.output_scale else None
        self.image_newline: nn.Parameter | None = None

    def add_image_newline(self) -> None:
        """A learned vector the `anyres` policy puts after each row of tiles (LLaVA-NeXT's `image_newline`).
        It lives here so it trains, freezes, saves and moves from stage 1 to stage 2 with the connector."""
        self.image_newline = nn.Parameter(torch.empty(self.text_hidden_size))
        self._reset_image_newline()

    def _reset_image_newline(self) -> None:
        if self.image_newline is not None:
            # LLaVA-NeXT's init: randn / sqrt(width).
            nn.init.normal_(self.image_newline, std=self.text_hidden_size**-0.5)

    def reset_parameters(self):
        """Raw parameters no nn/transformers init covers; subclasses extend it (and call it)."""
        if self.log_output_scale is not None:
            nn.init.zeros_(self.log_output_scale)
        self._reset_image_newline()

    def scale_output(self, out: torch.Tensor) -> torch.Tensor:
        """The connector's output times its learned scale (when config.output_scale); every forward ends here."""
        if self.log_output_scale is None:
            return out
        return out * self.log_output_scale.exp().to(out.dtype)

    @torch.no_grad()
    def calibrate_output_scale(self, features: torch.Tensor, target_rms: float) -> float:
        """Set the output scale so the output RMS on `features` (B, P, Dv) is `target_rms`; returns the scale."""
        if self.log_output_scale is None:
            raise ValueError(
                f"connector {self.config.type!r} has no output scale (config output_scale: false)"
            )
        self.log_output_scale.zero_()
        rms = float(self(features).float().pow(2).mean().sqrt())
        if not (rms > 0 and math.isfinite(rms) and target_rms > 0):
            raise ValueError(f"cannot calibrate the output scale: output RMS {rms}, target RMS {target_rms}")
        self.log_output_scale.fill_(math.log(target_rms / rms))
        return target_rms / rms

    @classmethod
    def num_tokens(cls, config: ConnectorConfig, num_patches: int) -> int:
        """Visual tokens one image takes in the LLM sequence, for a tower yielding `num_patches` features."""
        raise NotImplementedError

    def forward(self, features):  # (B, P, Dv) -> (B, N, Dllm)
        raise NotImplementedError
