"""Export to other ecosystems' formats. `llava-hf`: a stock `LlavaForConditionalGeneration` checkpoint, for the
MLP connector (depth 2) on a CLIP/SigLIP tower, which tools that know Llava load unchanged."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from .llava_names import to_llava_names
from .model import VLMForConditionalGeneration
from .processing import VLMProcessor
from .towers import tower_spec


def check_llava_compatible(model: VLMForConditionalGeneration) -> None:
    connector = model.config.connector
    if connector["type"] != "mlp" or connector.get("depth") != 2:
        raise ValueError(
            f"llava-hf export needs the mlp connector with depth 2 (Llava's projector); this checkpoint has {connector}"
        )
    if connector.get("output_scale"):
        raise ValueError(
            "llava-hf export: Llava's projector has no output scale; this mlp has output_scale: true"
        )
    policy = model.config.image_policy
    if policy != {"type": "single", "pool": 1}:
        raise ValueError(
            f"llava-hf export needs image_policy single with pool 1 (Llava takes one unpooled crop); this "
            f"checkpoint has {policy}"
        )


def llava_config(model: VLMForConditionalGeneration) -> LlavaConfig:
    check_llava_compatible(model)
    cfg = model.config
    return LlavaConfig(
        vision_config=cfg.vision_config.to_dict(),
        text_config=cfg.text_config.to_dict(),
        image_token_index=cfg.image_token_index,
        image_seq_length=cfg.num_image_tokens,
        projector_hidden_act=cfg.connector_config.hidden_act,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        multimodal_projector_bias=bool(cfg.connector.get("bias", True)),
        tie_word_embeddings=cfg.text_config.tie_word_embeddings,
    )


def llava_state_dict(model: VLMForConditionalGeneration) -> dict[str, torch.Tensor]:
    check_llava_compatible(model)
    mapped, unmatched = to_llava_names(model.state_dict())
    if unmatched:
        raise ValueError(f"no llava-hf name for parameter {unmatched[0]!r}")
    return mapped


def to_llava_hf(model: VLMForConditionalGeneration) -> LlavaForConditionalGeneration:
    llava = LlavaForConditionalGeneration(llava_config(model)).to(model.dtype)
    missing, unexpected = llava.load_state_dict(llava_state_dict(model), strict=False)
    # Tied lm_head is the only key allowed to be absent.
    missing = [k for k in missing if not (k == "lm_head.weight" and llava.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"llava-hf export mismatch: missing {missing}, unexpected {unexpected}")
    return llava.eval()


def export_llava_hf(model: VLMForConditionalGeneration, processor: VLMProcessor, out: str | Path) -> Path:
    out = Path(out)
    to_llava_hf(model).save_pretrained(out)
    vision = model.config.vision_config
    LlavaProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=int(tower_spec(vision).has_cls_token),
        chat_template=processor.chat_template,
        image_token=processor.image_token,
    ).save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return out


def merge_lora(adapter_dir: str | Path, base: str | Path | None = None):
    """Load the base checkpoint in fp32, apply a LoRA adapter (with its trained connector) and merge it in.

    Returns (plain VLMForConditionalGeneration, processor): the result has no peft modules and saves as an
    ordinary checkpoint that `from_pretrained` and the serving engine load.
    """
    from peft import PeftConfig, PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a LoRA adapter directory (no adapter_config.json)")
    base = base or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    model = VLMForConditionalGeneration.from_pretrained(str(base), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    merged.freeze_vision_tower()
    return merged, VLMProcessor.from_pretrained(str(adapter_dir))
