"""`VLMConfig`: the self-describing `config.json` of a checkpoint (tower + connector + LLM)."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto import CONFIG_MAPPING

from .connectors import connector_config_from_dict, get_connector_class
from .connectors.base import ConnectorConfig
from .policies import (
    ImagePolicy,
    ImagePolicyConfig,
    get_image_policy,
    image_policy_config_from_dict,
    image_token_count,
    pooled_patch_count,
)
from .towers import SELECT_STRATEGIES, num_patches, tower_spec

MODEL_TYPE = "vlm"


def _sub_config(value: Any, default_type: str, field: str) -> PretrainedConfig:
    if isinstance(value, PretrainedConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be a dict or a PretrainedConfig, got {type(value).__name__}")
    model_type = value.get("model_type", default_type)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{field}.model_type {model_type!r} is not a transformers model type")
    return CONFIG_MAPPING[model_type](**{k: v for k, v in value.items() if k != "model_type"})


class VLMConfig(PretrainedConfig):
    r"""A vision tower, a connector and a decoder LLM.

    Args:
        vision_config: CLIP or SigLIP vision config (dict or config object).
        text_config: the LLM's config (Llama, Qwen2, ... anything `AutoModelForCausalLM` builds).
        connector: `{"type": "mlp", **params}`; see `connectors/*.yaml`.
        image_policy: `{"type": "single" | "anyres", "pool": 1, ...}` (vlm/policies/); absent (an older
            checkpoint) means `single`, pool 1: one crop per image, as before policies existed.
        image_token_index: id of the `<image>` placeholder token in the tokenizer.
        vision_feature_layer: which tower hidden state feeds the connector (-2 as in LLaVA).
        vision_feature_select_strategy: "default" drops CLS, "full" keeps every token; None picks the tower's own
            default (CLIP: default, SigLIP: full, as it has no CLS).
        vision_tower_name_or_path / text_model_name_or_path: where the pretrained parts came from; stage 2 checks
            them against the stage 1 connector's.
    """

    model_type = MODEL_TYPE
    attribute_map = {"image_token_id": "image_token_index"}
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    connector: dict | None = None
    image_policy: dict | None = None
    image_token_index: int = 0
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str | None = None
    vision_tower_name_or_path: str | None = None
    text_model_name_or_path: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self.vision_config = _sub_config(self.vision_config or {}, "clip_vision_model", "vision_config")
        self.text_config = _sub_config(self.text_config or {}, "llama", "text_config")
        spec = tower_spec(self.vision_config)
        if self.vision_feature_select_strategy is None:
            self.vision_feature_select_strategy = spec.default_select_strategy
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy must be one of {SELECT_STRATEGIES}, "
                f"got {self.vision_feature_select_strategy!r}"
            )
        layers = self.vision_config.num_hidden_layers
        if not -layers - 1 <= self.vision_feature_layer <= layers:
            raise ValueError(
                f"vision_feature_layer {self.vision_feature_layer} is outside the tower's "
                f"{layers + 1} hidden states (embeddings + {layers} layers)"
            )
        # Parse once to validate (unknown keys, bad values); store the normalised dict so config.json is complete.
        self.connector = self.connector_config.to_dict()
        self.image_policy = self.image_policy_config.to_dict()
        pooled_patch_count(
            self.num_patches, self.image_policy_config.pool
        )  # a pool the grid cannot take fails here
        super().__post_init__(**kwargs)

    @property
    def connector_config(self) -> ConnectorConfig:
        return connector_config_from_dict(self.connector or {"type": "mlp"})

    @property
    def num_patches(self) -> int:
        """Tower features per image after CLS selection."""
        return num_patches(self.vision_config, self.vision_feature_select_strategy)

    @property
    def image_policy_config(self) -> ImagePolicyConfig:
        return image_policy_config_from_dict(self.image_policy)

    @property
    def policy(self) -> ImagePolicy:
        return get_image_policy(self.image_policy_config)

    @property
    def connector_patches(self) -> int:
        """Features per crop the connector sees: the tower's, after the policy's pooling."""
        return pooled_patch_count(self.num_patches, self.image_policy_config.pool)

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens one crop takes in the LLM sequence: one image's under the `single` policy."""
        cfg = self.connector_config
        return get_connector_class(cfg.type).num_tokens(cfg, self.connector_patches)

    def image_token_count(self, width: int, height: int) -> int:
        """Placeholder tokens a width x height image takes under the checkpoint's policy (vlm/policies)."""
        return image_token_count(
            self.image_policy_config, width, height, self.image_size, self.num_image_tokens
        )

    @property
    def max_image_tokens(self) -> int:
        """The most tokens any one image can take (the policy's largest layout)."""
        policy = self.policy
        return policy.layout_tokens(policy.largest_layout(self.num_image_tokens), self.num_image_tokens)

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size
