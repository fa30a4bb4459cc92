"""The freeze policy: which parameters learn in each stage, in one function, logged as a table at start.

stage 1: connector only.  stage 2 `full`: connector + LLM.  stage 2 `lora`: connector + LoRA adapters on the
LLM's linear layers (peft), base LLM weights frozen (4-bit for QLoRA).  The vision tower never learns.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .recipe import LoraSettings, Recipe

MODULES = ("vision_tower", "connector", "language_model")


def lora_config(settings: LoraSettings):
    from peft import LoraConfig

    targets = "|".join(settings.target_modules)
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        # Only the LLM's projections: a regex keeps LoRA out of the tower's and connector's own q/k/v layers.
        target_modules=rf".*language_model\..*\.({targets})",
        modules_to_save=["connector"],  # trained fully and saved with the adapter
    )


def apply_freeze_policy(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Return the model to train (a peft wrapper for LoRA) with exactly the recipe's parameters trainable."""
    model.requires_grad_(False)
    if recipe.tune == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(recipe.lora))
    else:
        model.connector.requires_grad_(True)
        if recipe.tune == "full":
            model.language_model.requires_grad_(True)
    tower = vlm_of(model).vision_tower
    if any(p.requires_grad for p in tower.parameters()):
        raise RuntimeError("the freeze policy left vision tower parameters trainable")
    return model


def vlm_of(model: nn.Module) -> nn.Module:
    """The VLMForConditionalGeneration inside a peft and/or DeepSpeed wrapper."""
    while not hasattr(model, "vision_tower"):
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            raise TypeError(f"no VLM inside {type(model).__name__}")
    return model


def _numel(p) -> int:
    return getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 partitions params to size 0 on each rank


def parameter_counts(model: nn.Module) -> OrderedDict[str, tuple[int, int]]:
    """{module: (trainable, frozen)} for the tower, connector and LLM (LoRA adapters count under the LLM)."""
    counts: OrderedDict[str, list[int]] = OrderedDict((m, [0, 0]) for m in MODULES)
    for name, p in model.named_parameters():
        module = next((m for m in MODULES if f"{m}." in f".{name}" or name.startswith(f"{m}.")), None)
        if module is None:
            raise RuntimeError(f"parameter {name} belongs to none of {MODULES}")
        counts[module][0 if p.requires_grad else 1] += _numel(p)
    return OrderedDict((m, (t, f)) for m, (t, f) in counts.items())


def format_parameter_table(counts: OrderedDict[str, tuple[int, int]]) -> str:
    lines = [f"{'module':<16} {'trainable':>12} {'frozen':>12}"]
    for module, (trainable, frozen) in counts.items():
        lines.append(f"{module:<16} {trainable:>12,} {frozen:>12,}")
    total_t = sum(t for t, _ in counts.values())
    total_f = sum(f for _, f in counts.values())
    lines.append(f"{'total':<16} {total_t:>12,} {total_f:>12,}")
    return "\n".join(lines)


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """Optimizer groups: connector at `connector_lr` when set; no weight decay on biases and norms."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_connector = "connector." in f".{name}"
        decay = p.ndim >= 2
        groups.setdefault((is_connector, decay), []).append(p)
    out = []
    for (is_connector, decay), params in groups.items():
        lr = recipe.connector_lr if is_connector and recipe.connector_lr else recipe.lr
        out.append({"params": params, "lr": lr, "weight_decay": recipe.weight_decay if decay else 0.0})
    return out
