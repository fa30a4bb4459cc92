"""Adapters that let outside benchmark suites run our checkpoints through `vlm.eval.engines`.

- `lmms_eval.VLMLmms`: an lmms-eval model, found through the `lmms_eval.models` entry point (`--model vlm`).
- `vlmevalkit.VLMEvalKitModel`: a VLMEvalKit `BaseModel` (`generate_inner(message, dataset)`).

Neither suite is imported by `vlm` itself; see vlm/eval/README.md for installing and running them.
"""

from __future__ import annotations


def lmms_eval_manifest():
    """lmms-eval >= 0.7 reads this through the `lmms_eval.models` entry point (pyproject.toml)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlm", simple_class_path="vlm.eval.adapters.lmms_eval.VLMLmms")
