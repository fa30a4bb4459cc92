"""Extensions found through entry points: how a lower layer names code that lives above it, without importing it.

Registries inside one layer (connectors, towers, templates) register on import. Where the extension lives in a
higher layer (a training objective, the synthetic world's tokenizer corpus), its package declares it under an
entry-point group in pyproject.toml and the lower layer loads it by name, as vLLM does with model plugins.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from .suggest import did_you_mean


def plugin_names(group: str) -> list[str]:
    return sorted(ep.name for ep in entry_points(group=group))


def load_plugin(group: str, name: str) -> Any:
    """The object an entry point names; a missing one is an error that says what is installed."""
    for ep in entry_points(group=group, name=name):
        return ep.load()
    names = plugin_names(group)
    raise LookupError(
        f"no {group!r} entry point named {name!r}{did_you_mean(name, names)} (installed: "
        f"{', '.join(names) or 'none'}); reinstall the package (pip install -e .) if pyproject.toml changed"
    )
