"""Connector registry: name -> Connector subclass. New connectors register with `@register_connector`."""

from __future__ import annotations

from typing import Any

from ..suggest import did_you_mean
from .base import Connector, ConnectorConfig

_CONNECTORS: dict[str, type[Connector]] = {}


def register_connector(name: str):
    def decorator(cls: type[Connector]) -> type[Connector]:
        if name in _CONNECTORS and _CONNECTORS[name] is not cls:
            raise ValueError(f"connector {name!r} is already registered by {_CONNECTORS[name].__qualname__}")
        cls.config_class.type = name
        _CONNECTORS[name] = cls
        return cls

    return decorator


def available_connectors() -> list[str]:
    return sorted(_CONNECTORS)


def get_connector_class(name: str) -> type[Connector]:
    if name not in _CONNECTORS:
        available = ", ".join(available_connectors())
        raise ValueError(
            f"unknown connector {name!r} (available: {available}){did_you_mean(name, _CONNECTORS)}"
        )
    return _CONNECTORS[name]


def connector_config_from_dict(values: dict[str, Any]) -> ConnectorConfig:
    """Parse a connector section ({"type": name, **params}) into its typed config."""
    if "type" not in values:
        raise ValueError(f"connector config needs a 'type' key (one of {', '.join(available_connectors())})")
    return get_connector_class(values["type"]).config_class.from_dict(values)


def build_connector(
    config: ConnectorConfig,
    vision_hidden_size: int,
    text_hidden_size: int,
    num_patches: int,
    image_newline: bool = False,
) -> Connector:
    """num_patches: features per crop the connector sees; image_newline: add the row separator vector a
    tiled image policy needs (Connector.add_image_newline)."""
    cls = get_connector_class(config.type)
    connector = cls(
        config,
        vision_hidden_size=vision_hidden_size,
        text_hidden_size=text_hidden_size,
        num_patches=num_patches,
    )
    if image_newline:
        connector.add_image_newline()
    return connector
