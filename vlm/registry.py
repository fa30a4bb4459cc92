"""A name -> class registry for the stack's extension points (connectors, image policies).

Each registered class has a typed `config_class`; registering sets its `type` to the name, so a config knows
which class builds it. Unknown names get the available ones and the closest match.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Generic, TypeVar

from .suggest import did_you_mean

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    def __init__(self, kind: str, lookup_label: str | None = None):
        self.kind = kind  # "connector": in "connector 'x' is already registered"
        self.lookup_label = lookup_label or kind  # in "unknown <label> 'x'"
        self._classes: dict[str, T] = {}

    def register(self, name: str):
        def decorator(cls: T) -> T:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered by {self._classes[name].__qualname__}"
                )
            cls.config_class.type = name
            self._classes[name] = cls
            return cls

        return decorator

    def names(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name) -> T:
        if name not in self._classes:
            raise ValueError(
                f"unknown {self.lookup_label} {name!r} (available: {', '.join(self.names())})"
                f"{did_you_mean(str(name), self._classes)}"
            )
        return self._classes[name]


class RegisteredConfig:
    """Base of a registered class's typed dataclass config: `type` is the registered name (set by `register`);
    `kind` names the extension point in errors."""

    type: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Build from a dict (a YAML preset or config.json section), refusing unknown keys by name."""
        values = {k: v for k, v in values.items() if k != "type"}
        known = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                raise ValueError(
                    f"unknown key {key!r} for {cls.kind} {cls.type!r}{did_you_mean(key, known)} "
                    f"valid keys: {', '.join(known)}"
                )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **dataclasses.asdict(self)}
