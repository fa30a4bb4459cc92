"""The objectives registry: which trainer runs a recipe's `objective`.

The language-model objective ("lm", `vlm.train.loop.Trainer`) is built in, and so is language pretraining
("text", `vlm.train.text_lm.TextTrainer`: the LLM alone on text-only records, `make lm`). Other objectives plug in
through the `vlm.objectives` entry-point group, `name = "module:TrainerClass"` in a package's pyproject.toml, the
way vLLM finds model plugins: stage 0's contrastive towers (vlm/contrastive) do, and so would DPO or distillation.
The loop looks a name up here and never imports the modules that implement other objectives.
"""

from __future__ import annotations

import importlib

from ..plugins import load_plugin, plugin_names
from ..suggest import did_you_mean

ENTRY_POINT_GROUP = "vlm.objectives"
# name -> trainer class, or "module:Class" imported on first use (so naming one imports no trainer code)
_REGISTERED: dict[str, type | str] = {"lm": "vlm.train.loop:Trainer", "text": "vlm.train.text_lm:TextTrainer"}
# Stage 0 objectives: each pretrains one part on its own (contrastive: the towers; text: the LLM alone).
PRETRAINING_OBJECTIVES = ("contrastive", "text")


def register_objective(name: str, trainer_class: type | str) -> None:
    _REGISTERED[name] = trainer_class


def _load(reference: str) -> type:
    module, _, attr = reference.partition(":")
    return getattr(importlib.import_module(module), attr)


def available_objectives() -> list[str]:
    return sorted({*_REGISTERED, *plugin_names(ENTRY_POINT_GROUP)})


def trainer_class(name: str) -> type:
    """The trainer class for an objective; an unknown name is an error listing the known ones."""
    if name not in _REGISTERED:
        if name not in plugin_names(ENTRY_POINT_GROUP):
            raise ValueError(
                f"unknown objective {name!r}{did_you_mean(name, available_objectives())}; known: "
                f"{', '.join(available_objectives())}"
            )
        _REGISTERED[name] = load_plugin(ENTRY_POINT_GROUP, name)
    found = _REGISTERED[name]
    if isinstance(found, str):
        found = _REGISTERED[name] = _load(found)
    return found
