"""Parameter names shared with transformers' LlavaForConditionalGeneration: one table serves `vlm export` (ours to
theirs) and `vlm import` (theirs to ours), so the two directions cannot drift apart."""

from __future__ import annotations

from collections.abc import Iterable

import torch

# (our prefix, llava-hf prefix); the mlp connector's Linear layers sit at proj.0 and proj.2 (GELU at proj.1).
LLAVA_PREFIXES: tuple[tuple[str, str], ...] = (
    ("vision_tower.", "model.vision_tower."),
    ("connector.proj.0.", "model.multi_modal_projector.linear_1."),
    ("connector.proj.2.", "model.multi_modal_projector.linear_2."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)


def rename_prefixes(
    state: dict[str, torch.Tensor], pairs: Iterable[tuple[str, str]]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state renamed by the first (from, to) prefix pair that matches each name, names no pair matched)."""
    pairs = tuple(pairs)
    mapped, unmatched = {}, []
    for name, tensor in state.items():
        old_new = next(((old, new) for old, new in pairs if name.startswith(old)), None)
        if old_new is None:
            unmatched.append(name)
        else:
            mapped[old_new[1] + name[len(old_new[0]) :]] = tensor
    return mapped, unmatched


def to_llava_names(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    return rename_prefixes(state, LLAVA_PREFIXES)


def from_llava_names(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    return rename_prefixes(state, ((theirs, ours) for ours, theirs in LLAVA_PREFIXES))
