"""Helpers for the eval tests: a tiny synthetic eval set on disk (built once per session)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from vllm_helpers import _ROOT


@functools.cache
def tiny_eval_data(n_eval: int = 6) -> dict[str, Path]:
    from vlm.data import synth

    return synth.generate(_ROOT / f"synth-eval-{n_eval}", n=2, n_eval=n_eval, progress=False)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
