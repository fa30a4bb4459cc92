"""Image policy registry: name -> ImagePolicy subclass, as vlm/connectors/registry.py does for connectors."""

from __future__ import annotations

from typing import Any

from ..registry import Registry
from .base import ImagePolicy, ImagePolicyConfig

_POLICIES: Registry[type[ImagePolicy]] = Registry("image policy", lookup_label="image_policy type")
DEFAULT_POLICY = "single"


def register_image_policy(name: str):
    return _POLICIES.register(name)


def available_image_policies() -> list[str]:
    return _POLICIES.names()


def _policy_class(name: Any) -> type[ImagePolicy]:
    return _POLICIES.get(name)


def image_policy_config_from_dict(values: dict[str, Any] | None) -> ImagePolicyConfig:
    """Parse an `image_policy` section ({"type": name, **params}); None (a config written before policies
    existed) is `single`, today's behaviour."""
    if values is None:
        values = {"type": DEFAULT_POLICY}
    if not isinstance(values, dict):
        raise ValueError(f"image_policy must be a mapping with a 'type' key, got {values!r}")
    return _policy_class(values.get("type", DEFAULT_POLICY)).config_class.from_dict(values)


def get_image_policy(config: ImagePolicyConfig | dict[str, Any] | None) -> ImagePolicy:
    if not isinstance(config, ImagePolicyConfig):
        config = image_policy_config_from_dict(config)
    return _policy_class(config.type)(config)


def image_token_count(
    policy: ImagePolicyConfig | dict[str, Any] | None,
    width: int,
    height: int,
    tile_size: int,
    tokens_per_crop: int,
) -> int:
    """Placeholder tokens one `width` x `height` image takes: the one function the processor's expansion, the
    training sample encoder, the model's merge check and the vLLM plugin's prompt replacement all call.

    tile_size: the tower's square input (px); tokens_per_crop: the connector's tokens for one crop, after
    pooling (`VLMConfig.num_image_tokens`)."""
    return get_image_policy(policy).num_tokens(width, height, tile_size, tokens_per_crop)
