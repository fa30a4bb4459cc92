"""Checks a recipe's inputs exist before any rank starts: data files, eval files, the checkpoints it starts from.

Each error names the recipe file and key, and for a missing checkpoint the `make` target that builds it when the
path says which (runs/<connector>/stage1/... -> make stage1), so nothing fails minutes later inside a rank.
"""

from __future__ import annotations

from pathlib import Path

from .recipe import Recipe, RecipeError

# A directory name in a checkpoint path -> the make target that writes it.
_MAKE_TARGETS = {"stage0": "make stage0", "stage1": "make stage1", "lm": "make lm"}


def make_hint(path: str) -> str:
    """' (run `make X` first)' when the path tells which target builds it, else ''."""
    parts = Path(path).parts
    for part in parts:
        if part in _MAKE_TARGETS:
            return f" (run `{_MAKE_TARGETS[part]}` first)"
        if part.startswith("stage2"):
            return f" (run `make stage2 STAGE2={part}` first)"
        if part.startswith("base-"):
            return " (run `make base` first)"
    return ""


def _looks_local(path: str) -> bool:
    """True unless `path` could be a hub id (`org/name`) or a preset name: those fail later, at load time."""
    p = Path(path)
    return (
        p.is_absolute()
        or path.startswith(".")
        or len(p.parts) > 2
        or (len(p.parts) == 2 and Path(p.parts[0]).is_dir())
    )


def check_inputs(recipe: Recipe, recipe_file: str | Path) -> None:
    """Raise RecipeError naming `recipe_file` and the key of the first input that does not exist."""
    where = str(recipe_file)
    for i, source in enumerate(recipe.data):
        if not Path(source.path).is_file():
            raise RecipeError(f"{where}: data[{i}].path: data file not found: {source.path}")
    for task, path in recipe.eval.tasks.named().items():
        if recipe.eval.every and not Path(path).is_file():
            raise RecipeError(f"{where}: eval.tasks.{task}: eval file not found: {path}")
    checkpoints = {"model": recipe.model, "init_connector_from": recipe.init_connector_from}
    for key, path in checkpoints.items():
        if path and _looks_local(path) and not (Path(path) / "config.json").is_file():
            what = "no checkpoint (config.json) in" if Path(path).is_dir() else "checkpoint not found:"
            raise RecipeError(f"{where}: {key}: {what} {path}{make_hint(path)}")
