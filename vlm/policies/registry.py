"""Image policy registry: name -> ImagePolicy subclass, as vlm/connectors/registry.py does for connectors."""

from __future__ import annotations

from typing import Any

from ..suggest import did_you_mean
from .base import ImagePolicy, ImagePolicyConfig

_POLICIES: dict[str, type[ImagePolicy]] = {}
DEFAULT_POLICY = "single"


def register_image_policy(name: str):
    def decorator(cls: type[ImagePolicy]) -> type[ImagePolicy]:
        if name in _POLICIES and _POLICIES[name] is not cls:
            raise ValueError(f"image policy {name!r} is already registered by {_POLICIES[name].__qualname__}")
        cls.config_class.type = name
        _POLICIES[name] = cls
        return cls

    return decorator


def available_image_policies() -> list[str]:
    return sorted(_POLICIES)


def _policy_class(name: Any) -> type[ImagePolicy]:
    if name not in _POLICIES:
        raise ValueError(
            f"unknown image_policy type {name!r} (available: {', '.join(available_image_policies())})"
            f"{did_you_mean(str(name), _POLICIES)}"
        )
    return _POLICIES[name]


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
