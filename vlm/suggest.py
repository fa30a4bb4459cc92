"""One wording for "unknown name" errors across configs, registries and recipes."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: object, options: Iterable[object]) -> str:
    """'; did you mean 'x'?' for the closest option, or '' when nothing is close."""
    hint = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""
