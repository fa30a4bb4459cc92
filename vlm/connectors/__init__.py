"""Connectors between the vision tower and the LLM. Importing this package registers the built-in four."""

from . import linear, mlp, perceiver, qformer  # noqa: F401  (registration side effect)
from .base import Connector, ConnectorConfig
from .registry import (
    available_connectors,
    build_connector,
    connector_config_from_dict,
    get_connector_class,
    register_connector,
)

__all__ = [
    "Connector",
    "ConnectorConfig",
    "available_connectors",
    "build_connector",
    "connector_config_from_dict",
    "get_connector_class",
    "register_connector",
]
