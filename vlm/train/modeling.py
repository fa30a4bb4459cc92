"""Model side of a training run: precision, attention kernel, loading (ZeRO-3 aware, 4-bit for QLoRA), the
stage 1 -> stage 2 connector hand-over, and the final HF checkpoint."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..build import save_checkpoint
from ..model import VLMForConditionalGeneration
from ..processing import VLMProcessor
from .freeze import vlm_of
from .recipe import Recipe

log = logging.getLogger("vlm.train")

# transformers reads ZeRO-3 settings from this object while it lives: from_pretrained then builds the model
# under deepspeed.zero.Init, partitioned from the start instead of materialised in full on every rank.
_HF_DS_CONFIG = None


def precision_for(recipe: Recipe) -> torch.dtype:
    if recipe.precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if recipe.precision == "bf16" and not torch.cuda.is_available():
        log.warning("bf16 on the CPU: works where the CPU has AVX512-BF16, slow elsewhere")
    return torch.bfloat16 if recipe.precision == "bf16" else torch.float32


def attn_implementation_for(recipe: Recipe) -> str:
    if recipe.attn_implementation != "auto":
        if recipe.attn_implementation == "flash_attention_2" and not flash_attn_usable():
            raise ValueError("attn_implementation flash_attention_2 needs CUDA and the flash-attn package")
        return recipe.attn_implementation
    return "flash_attention_2" if flash_attn_usable() else "sdpa"


def flash_attn_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def quantization_config(recipe: Recipe, zero_stage: int, dtype: torch.dtype):
    if not (recipe.tune == "lora" and recipe.lora.quantize_4bit):
        return None
    if zero_stage == 3:
        raise ValueError(
            "QLoRA (lora.quantize_4bit) cannot run under ZeRO-3: 4-bit weights are not partitionable; use stages/zero2.json"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            "QLoRA needs bitsandbytes: pip install -e '.[gpu]' (or bitsandbytes alone on the CPU)"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        # Only the LLM's linear layers are quantised; tower, connector and head stay in full precision.
        llm_int8_skip_modules=["vision_tower", "connector", "lm_head"],
    )


def load_model_for_training(recipe: Recipe, ds_config: dict, attn_implementation: str):
    global _HF_DS_CONFIG
    from transformers.integrations import HfDeepSpeedConfig

    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    dtype = precision_for(recipe)
    quant = quantization_config(recipe, stage, dtype)  # validates before any global state is touched
    # Set for ZeRO-3 runs only, and cleared otherwise: a stale one would make every later from_pretrained in
    # this process try zero.Init.
    _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config) if stage == 3 else None
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if quant is not None:
        local = int(os.environ.get("LOCAL_RANK", 0))
        kwargs.update(
            quantization_config=quant, device_map={"": local} if torch.cuda.is_available() else "cpu"
        )
    try:
        model = VLMForConditionalGeneration.from_pretrained(recipe.model, **kwargs)
    except OSError as err:
        if Path(recipe.model).exists():
            raise
        raise FileNotFoundError(
            f"model checkpoint not found: {recipe.model} (a local path that does not exist, and not loadable as a "
            f"hub id: run `make demo` for the base checkpoints, or stage 1 before stage 2)"
        ) from err
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        # Never run a no-grad pass on the 4-bit model before training: bitsandbytes then repacks the weights and
        # silently drops their backward (../shared/notes/deepspeed-cpu.md).
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.gradient_checkpointing
        )
    model.config.use_cache = False
    if recipe.init_connector_from:
        load_connector(model, recipe.init_connector_from)
    return model, VLMProcessor.from_pretrained(recipe.model)


def load_connector(model: VLMForConditionalGeneration, source: str) -> None:
    """Copy a stage 1 connector into `model`, refusing a checkpoint built on another tower or LLM.

    Under ZeRO-3 the target parameters are partitioned (shape [0]: LLaVA's "size mismatch torch.Size([0])"), so
    they are gathered, written on rank 0 and re-partitioned by `GatheredParameters`.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    other = AutoConfig.from_pretrained(source)
    ours = model.config
    for field in ("vision_config", "text_config"):
        if getattr(other, field).to_diff_dict() != getattr(ours, field).to_diff_dict():
            raise ValueError(
                f"{source}: its {field} differs from {ours.name_or_path}'s; the connector would not fit"
            )
    # image_policy too: its pooling sizes the connector's input, and a tiled policy adds connector.image_newline.
    for field in ("vision_tower_name_or_path", "text_model_name_or_path", "connector", "image_policy"):
        if getattr(other, field) != getattr(ours, field):
            raise ValueError(
                f"{source}: {field} is {getattr(other, field)!r}, but the model has {getattr(ours, field)!r}"
            )
    weights = {}
    for shard in sorted(Path(source).glob("*.safetensors")):
        weights.update(
            {k[len("connector.") :]: v for k, v in load_file(shard).items() if k.startswith("connector.")}
        )
    if not weights:
        raise ValueError(f"{source} holds no connector weights")
    params = list(model.connector.parameters())
    if hasattr(params[0], "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if not dist.is_initialized() or dist.get_rank() == 0:
                model.connector.load_state_dict(weights, strict=True)
    else:
        model.connector.load_state_dict(weights, strict=True)
    log.info("connector loaded from %s (%d tensors)", source, len(weights))


def _full_state_dict(engine):
    """The whole model's weights on rank 0 (ZeRO-3 gathers the partitions; a collective call on every rank)."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def save_final_checkpoint(engine, processor: VLMProcessor, recipe: Recipe, out: Path, rank: int) -> Path:
    """An HF checkpoint that `from_pretrained` and the serving engine load unchanged (LoRA merged in)."""
    staging = out.with_name(out.name + ".partial")
    if recipe.tune == "lora":
        adapter = _save_adapter(engine, processor, out.parent / "adapter", rank)
        if rank == 0:
            from ..export import merge_lora

            with _zero3_init_off():
                merged, merged_processor = merge_lora(adapter, base=recipe.model)
            shutil.rmtree(staging, ignore_errors=True)
            save_checkpoint(merged, merged_processor, staging)
    else:
        state = _full_state_dict(engine)
        if rank == 0:
            vlm = vlm_of(engine.module)
            vlm.config.use_cache = True
            shutil.rmtree(staging, ignore_errors=True)
            save_checkpoint(vlm, processor, staging, state_dict=state)
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        os.replace(staging, out)
    if dist.is_initialized():
        dist.barrier()
    return out


@contextlib.contextmanager
def _zero3_init_off():
    """from_pretrained on rank 0 alone, not under zero.Init: its partitioning is a collective that the other
    ranks, waiting at the final barrier, never join (2-rank ZeRO-3 LoRA runs hung at the merge)."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if _HF_DS_CONFIG is not None:
            set_hf_deepspeed_config(_HF_DS_CONFIG)


def _save_adapter(engine, processor, adapter: Path, rank: int) -> Path:
    """The peft adapter (LoRA weights + the fully trained connector) in peft's own format."""
    model = engine.module
    trainable = [p for p in model.parameters() if p.requires_grad]
    gather = contextlib.nullcontext()
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(trainable, modifier_rank=None)
    with gather:
        if rank == 0:
            shutil.rmtree(adapter, ignore_errors=True)
            model.save_pretrained(adapter)
            processor.save_pretrained(adapter)
    return adapter
