"""Connector registry: name -> Connector subclass. New connectors register with `@register_connector`."""

from __future__ import annotations

from typing import Any

from ..registry import Registry
from .base import Connector, ConnectorConfig

_CONNECTORS: Registry[type[Connector]] = Registry("connector")


def register_connector(name: str):
    return _CONNECTORS.register(name)


def available_connectors() -> list[str]:
    return _CONNECTORS.names()


def get_connector_class(name: str) -> type[Connector]:
    return _CONNECTORS.get(name)


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
