"""Training recipes: typed dataclasses loaded from YAML, with `key=value` overrides on the command line.

Unknown keys, wrong types and out-of-range values are errors that name the key (and suggest the nearest valid
one), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ..suggest import did_you_mean
from .objectives import PRETRAINING_OBJECTIVES, available_objectives


class RecipeError(ValueError):
    """A recipe that cannot be used as written. `key`: the field at fault, when a dataclass's own check raises
    it (the loader then reports `where.key`, e.g. `data[1].weight`)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclasses.dataclass
class DataSource:
    path: str
    image_root: str | None = None  # default: the file's directory
    weight: float = 1.0  # relative sampling weight when several sources are mixed

    def __post_init__(self):
        if self.weight <= 0:
            raise RecipeError(f"must be > 0, got {self.weight} (source {self.path})", key="weight")


@dataclasses.dataclass
class LoraSettings:
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] = dataclasses.field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    quantize_4bit: bool = False  # QLoRA: nf4 base weights with double quantization (bitsandbytes)

    def __post_init__(self):
        if self.r < 1 or self.alpha < 1:
            raise RecipeError(f"lora.r and lora.alpha must be >= 1, got r={self.r}, alpha={self.alpha}")
        if not 0 <= self.dropout < 1:
            raise RecipeError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass
class ContrastiveSettings:
    """Stage 0 (`objective: contrastive`, vlm/contrastive): image + text towers trained on caption pairs."""

    loss: Literal["infonce", "sigmoid"] = "infonce"  # CLIP's InfoNCE, or SigLIP's sigmoid (tower siglip)
    projection_dim: int = 64  # CLIP's shared embedding width (SigLIP uses the towers' hidden size)

    def __post_init__(self):
        if self.projection_dim < 1:
            raise RecipeError(f"contrastive.projection_dim must be >= 1, got {self.projection_dim}")


@dataclasses.dataclass
class EvalTasks:
    """Held-out eval files (`vlm eval` records) per task; a task left null is not run."""

    vqa: str | None = None
    caption: str | None = None
    pope: str | None = None

    def named(self) -> dict[str, str]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass
class EvalSettings:
    """Eval during training: greedy answers from the model being trained, scored as `vlm eval` scores them."""

    every: int = 0  # optimizer steps between evals (and once at the last step); 0: off
    limit: int = 64  # the first N records of each task file
    tasks: EvalTasks = dataclasses.field(default_factory=EvalTasks)
    image_root: str | None = None  # default: each file's directory
    batch_size: int = 16

    def __post_init__(self):
        if self.every < 0:
            raise RecipeError(f"must be >= 0 (0: off), got {self.every}", key="every")
        for name in ("limit", "batch_size"):
            if getattr(self, name) < 1:
                raise RecipeError(f"must be >= 1, got {getattr(self, name)}", key=name)
        if self.every and not self.tasks.named():
            raise RecipeError(
                "eval.every is set but no eval file is named (vqa, caption or pope)", key="tasks"
            )


@dataclasses.dataclass
class Recipe:
    stage: Literal[0, 1, 2]
    # checkpoint to start from: a `vlm init` base, or stage 1's output for stage 2; stage 0: a tower family
    # (clip, siglip: tiny random-init dual encoder) or a stage 0 checkpoint; objective text: an LLM preset
    # (llama, qwen2: random init with its tiny tokenizer) or a causal-LM directory to continue
    model: str
    output_dir: str
    data: list[DataSource]
    # chat template from vlm/templates.py: "plain" for stage 1; stage 2 "auto": the checkpoint's own (chatml for
    # `vlm init` bases, llava for `vlm import --from llava-hf`), so the model is served as it was tuned
    template: str = "chatml"
    tune: Literal["connector", "full", "lora"] = "connector"  # what learns besides the (always frozen) tower
    init_connector_from: str | None = None  # a stage 1 checkpoint whose connector replaces the model's
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    # a name in vlm/train/objectives.py; stage 0: contrastive (max_length = text length) or text (the LLM alone)
    objective: str = "lm"
    contrastive: ContrastiveSettings = dataclasses.field(default_factory=ContrastiveSettings)
    deepspeed: str = "stages/zero2.json"
    # optimisation
    epochs: int = 1
    max_steps: int | None = None  # stop early after this many optimizer steps
    micro_batch_size: int = 16  # per process
    global_batch_size: int = 64  # micro_batch_size x processes x gradient accumulation
    lr: float = 1e-3
    connector_lr: float | None = None  # a separate lr for the connector (LoRA recipes: 2e-5)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    gradient_clipping: float = 1.0
    seed: int = 0
    # model execution
    max_length: int = 512
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    gradient_checkpointing: bool = False
    # data handling
    group_by_length: bool = True
    pack: bool = False  # several samples per row, attention blocked across them
    # Frozen-tower features computed once into a disk cache (safetensors shards keyed by image content and a
    # tower/preprocessing fingerprint); later steps skip image decoding and the tower. PATH, "auto"
    # ($VLM_FEATURE_CACHE or ~/.cache/vlm/features; off under ZeRO-3) or null (off). See train/feature_cache.py.
    feature_cache: str | None = None
    on_bad_sample: Literal["raise", "skip"] = "raise"  # skip: count and report at the end
    # DataLoader worker processes per rank that decode, preprocess and collate images while the step runs;
    # 0: in the training process. Same batches, same order, for any value (vlm/data/loader.py).
    num_workers: int = 1
    # Encoded text of each data file kept on disk (vlm/data/encoded_index.py) so later runs, and all ranks of
    # a node, skip the O(records) template rendering and tokenization: "auto" ($VLM_DATA_CACHE or
    # ~/.cache/vlm/encoded), a PATH, or null (encode in every process, every run).
    data_cache: str | None = "auto"
    eval: EvalSettings = dataclasses.field(default_factory=EvalSettings)  # eval during training (rank 0)
    # bookkeeping
    save_every: int = 0  # optimizer steps between resumable checkpoints; 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10

    def __post_init__(self):
        positive = (
            "epochs",
            "micro_batch_size",
            "global_batch_size",
            "max_length",
            "log_every",
            "keep_checkpoints",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise RecipeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise RecipeError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.global_batch_size % self.micro_batch_size:
            raise RecipeError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"micro_batch_size ({self.micro_batch_size})"
            )
        if self.lr <= 0 or (self.connector_lr is not None and self.connector_lr <= 0):
            raise RecipeError("learning rates must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise RecipeError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.gradient_clipping < 0 or self.weight_decay < 0:
            raise RecipeError(
                f"gradient_clipping and weight_decay must be >= 0, got {self.gradient_clipping}, "
                f"{self.weight_decay}"
            )
        if self.num_workers < 0:
            raise RecipeError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.save_every < 0:
            raise RecipeError(f"save_every must be >= 0, got {self.save_every}")
        if not self.data:
            raise RecipeError("data: at least one data source is needed")
        known = available_objectives()
        if self.objective not in known:
            raise RecipeError(
                f"objective: unknown {self.objective!r}{did_you_mean(self.objective, known)}; known: "
                f"{', '.join(known)}"
            )
        if (self.stage == 0) != (self.objective in PRETRAINING_OBJECTIVES):
            raise RecipeError(
                f"stage 0 pretrains a part (objective {' or '.join(PRETRAINING_OBJECTIVES)}) and only it: got "
                f"stage {self.stage} with objective {self.objective!r}"
            )
        if self.stage == 0 and self.tune != "full":
            raise RecipeError(f"stage 0 trains its part in full; tune must be 'full', got {self.tune!r}")
        if self.stage == 0 and self.feature_cache is not None:
            raise RecipeError("feature_cache needs a frozen tower; stage 0 trains it: set feature_cache=null")
        if self.eval.every and self.objective != "lm":
            raise RecipeError(f"eval.every: eval during training needs objective lm, got {self.objective!r}")
        if self.stage == 1 and self.tune != "connector":
            raise RecipeError(
                f"stage 1 trains only the connector; tune must be 'connector', got {self.tune!r}"
            )

    def gradient_accumulation(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise RecipeError(
                f"global_batch_size {self.global_batch_size} is not divisible by micro_batch_size "
                f"{self.micro_batch_size} x {world_size} processes"
            )
        return self.global_batch_size // per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def source_names(self) -> list[str]:
        """One name per data source, as the per-source loss is logged: the file stem (vqa_train), with the
        source's index appended where two stems collide."""
        stems = [Path(s.path).stem for s in self.data]
        return [stem if stems.count(stem) == 1 else f"{stem}#{i}" for i, stem in enumerate(stems)]


# -- loading -----------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value against a (resolved) type annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(
            errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}"
        )
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise RecipeError(
                f"{where}: {value!r} is not one of {list(allowed)}{did_you_mean(value, allowed)}"
            )
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, dict)) or not isinstance(value, list):
            if dataclasses.is_dataclass(item_tp) and isinstance(value, dict):
                value = [value]  # a single source may be written without the list
            else:
                raise RecipeError(f"{where}: expected a list, got {type(value).__name__}")
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if tp is DataSource and isinstance(value, str):
            value = {"path": value}
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__}")
        return build_dataclass(tp, value, where)
    if tp is float and isinstance(value, str):
        try:
            value = float(value)  # YAML reads "1e-3" as a string
        except ValueError:
            pass
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # nan passes every range check (all comparisons are False)
            raise RecipeError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp in (int, float, str, bool) and (
        not isinstance(value, tp) or (tp is int and isinstance(value, bool))
    ):
        raise RecipeError(f"{where}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def build_dataclass(cls: type, values: dict[str, Any], where: str = "recipe"):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise RecipeError(f"{where}: unknown key {key!r}{did_you_mean(key, fields)}")
    missing = [
        n
        for n, f in fields.items()
        if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise RecipeError(f"{where}: missing required key(s) {', '.join(missing)}")
    converted = {
        k: _convert(v, hints[k], f"{where}.{k}" if where != "recipe" else k) for k, v in values.items()
    }
    try:
        return cls(**converted)
    except RecipeError as err:
        key = f"{where}.{err.key}" if where != "recipe" else err.key
        key = key if err.key else (where if where != "recipe" else None)
        raise RecipeError(f"{key}: {err}" if key else str(err)) from None


def apply_override(values: dict[str, Any], override: str) -> None:
    """`a.b=value` sets values["a"]["b"]; the value is parsed as YAML (`lr=2e-5`, `pack=true`, `data=[...]`)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {override!r} is not key=value")
    parts = key.split(".")
    target = values
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise RecipeError(f"override {override!r}: {part!r} is not a mapping")
    target[parts[-1]] = _yaml(raw, f"override {override!r}")


def _yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{where}: not valid YAML: {' '.join(str(err).split())}") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        values = _yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not a UTF-8 text file: {err}") from None
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping")
    for override in overrides:
        apply_override(values, override)
    try:
        return build_dataclass(Recipe, values)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None
