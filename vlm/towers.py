"""Vision tower registry: how each tower family is built, loaded, preprocessed and read out.

Dispatch is by the HF config's `model_type`, never by substrings of a checkpoint name.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

SELECT_STRATEGIES = ("default", "full")  # default: drop CLS; full: keep every token


@dataclasses.dataclass(frozen=True)
class TowerSpec:
    """What the stack needs to know about one vision tower family."""

    name: str
    vision_model_type: str  # model_type of the vision-only config
    full_model_type: str  # model_type of a full (image+text) checkpoint holding a `vision_config`
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    image_processor_class: type  # PIL backend: no torchvision needed
    has_cls_token: bool
    default_select_strategy: str

    def image_processor(self, image_size: int):
        """A processor that resizes to the tower's square input and normalises as the tower expects."""
        if self.has_cls_token:  # CLIP: shortest-edge resize then centre crop
            return self.image_processor_class(
                size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
            )
        return self.image_processor_class(size={"height": image_size, "width": image_size})


_TOWERS: dict[str, TowerSpec] = {}


def register_tower(spec: TowerSpec) -> TowerSpec:
    _TOWERS[spec.vision_model_type] = spec
    return spec


register_tower(
    TowerSpec(
        name="clip",
        vision_model_type="clip_vision_model",
        full_model_type="clip",
        config_class=CLIPVisionConfig,
        model_class=CLIPVisionModel,
        image_processor_class=CLIPImageProcessorPil,
        has_cls_token=True,
        default_select_strategy="default",
    )
)
register_tower(
    TowerSpec(
        name="siglip",
        vision_model_type="siglip_vision_model",
        full_model_type="siglip",
        config_class=SiglipVisionConfig,
        model_class=SiglipVisionModel,
        image_processor_class=SiglipImageProcessorPil,
        has_cls_token=False,
        default_select_strategy="full",
    )
)


def available_towers() -> list[str]:
    return sorted(spec.name for spec in _TOWERS.values())


def tower_spec(vision_config: PretrainedConfig) -> TowerSpec:
    model_type = getattr(vision_config, "model_type", None)
    if model_type not in _TOWERS:
        known = ", ".join(sorted(_TOWERS))
        raise ValueError(f"unsupported vision tower model_type {model_type!r}; registered towers: {known}")
    return _TOWERS[model_type]


def vision_config_from_pretrained(name_or_path: str | Path) -> PretrainedConfig:
    """The vision config of a tower checkpoint, whether it is vision-only or a full CLIP/SigLIP model."""
    config = AutoConfig.from_pretrained(str(name_or_path))
    for spec in _TOWERS.values():
        if config.model_type == spec.full_model_type:
            return config.vision_config
    tower_spec(config)  # raises a clear error for unsupported types
    return config


def load_tower(name_or_path: str | Path) -> PreTrainedModel:
    """Load pretrained tower weights (hub id or local dir); full CLIP/SigLIP checkpoints keep only the vision half."""
    spec = tower_spec(vision_config_from_pretrained(name_or_path))
    return spec.model_class.from_pretrained(str(name_or_path))


def build_tower(vision_config: PretrainedConfig) -> PreTrainedModel:
    """A randomly initialised tower from its config (weights come later from a checkpoint, or stay random)."""
    return tower_spec(vision_config).model_class(vision_config)


def num_patches(vision_config: PretrainedConfig, select_strategy: str) -> int:
    """Feature vectors per image after selection: the patch grid, plus CLS when it is kept."""
    spec = tower_spec(vision_config)
    grid = vision_config.image_size // vision_config.patch_size
    keep_cls = spec.has_cls_token and select_strategy == "full"
    return grid * grid + int(keep_cls)


def select_features(hidden_states: tuple[torch.Tensor, ...], layer: int, strategy: str, has_cls: bool):
    """Pick one layer's hidden states and drop CLS for the `default` strategy (as LLaVA does)."""
    features = hidden_states[layer]
    if strategy == "default" and has_cls:
        features = features[:, 1:]
    return features
