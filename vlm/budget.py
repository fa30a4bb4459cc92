"""Visual token budget: tokens per image for a tower/image size/connector, and their share of the LLM context.

Real-size configs are built on the meta device, so the count comes from an actual (weightless) forward pass of
the tower and connector rather than from a formula alone; both must agree.
"""

from __future__ import annotations

import dataclasses

import torch

from .build import connector_dict, resolve_llm, resolve_vision
from .config import VLMConfig
from .connectors import available_connectors, build_connector
from .presets import LLM_PRESETS, TOWER_PRESETS
from .towers import build_tower, select_features, tower_spec


@dataclasses.dataclass
class BudgetRow:
    connector: str
    patches: int
    tokens_per_image: int
    context: int

    @property
    def share(self) -> float:
        return self.tokens_per_image / self.context


def measured_tokens(config: VLMConfig) -> int:
    """Run tower + connector on the meta device and read the sequence length of the connector output."""
    vision = config.vision_config
    with torch.device("meta"):
        tower = build_tower(vision)
        connector = build_connector(
            config.connector_config, vision.hidden_size, config.text_config.hidden_size, config.num_patches
        )
        pixels = torch.empty(1, vision.num_channels, vision.image_size, vision.image_size)
        with torch.no_grad():
            hidden = tower(pixels, output_hidden_states=True).hidden_states
            features = select_features(
                hidden,
                config.vision_feature_layer,
                config.vision_feature_select_strategy,
                tower_spec(vision).has_cls_token,
            )
            return connector(features).shape[1]


def token_budget(
    tower: str, llm: str, connectors: list[str], image_size: int | None = None, context: int | None = None
) -> list[BudgetRow]:
    overrides = {"image_size": image_size} if image_size else {}
    if tower not in TOWER_PRESETS:
        raise ValueError(f"vlm tokens needs a tower preset ({', '.join(TOWER_PRESETS)}), got {tower!r}")
    if llm not in LLM_PRESETS:
        raise ValueError(f"vlm tokens needs an LLM preset ({', '.join(LLM_PRESETS)}), got {llm!r}")
    vision_config, _, _ = resolve_vision(tower, **overrides)
    text_config, _, _ = resolve_llm(llm)
    tiny = TOWER_PRESETS[tower].tiny and LLM_PRESETS[llm].tiny
    rows = []
    for name in connectors:
        config = VLMConfig(
            vision_config=vision_config, text_config=text_config, connector=connector_dict(name, tiny, {})
        )
        tokens = measured_tokens(config)
        if tokens != config.num_image_tokens:
            raise RuntimeError(
                f"{name}: the connector declares {config.num_image_tokens} tokens but produced {tokens}"
            )
        rows.append(
            BudgetRow(name, config.num_patches, tokens, context or text_config.max_position_embeddings)
        )
    return rows


def format_budget(rows: list[BudgetRow], header: str) -> str:
    lines = [header, f"{'connector':<10} {'patches':>8} {'tokens/image':>13} {'context':>8} {'share':>7}"]
    for r in rows:
        lines.append(
            f"{r.connector:<10} {r.patches:>8} {r.tokens_per_image:>13} {r.context:>8} {r.share:>7.1%}"
        )
    return "\n".join(lines)


__all__ = ["BudgetRow", "token_budget", "format_budget", "available_connectors"]
