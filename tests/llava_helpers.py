"""Tiny stock llava-hf checkpoints on disk: transformers' own LlavaConfig / LlavaForConditionalGeneration /
LlavaProcessor around the tiny tower and LLM presets and the locally trained tokenizer, random weights."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from vllm_helpers import _ROOT

# llava-hf/llava-1.5-7b-hf's chat template, verbatim.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@functools.cache
def tiny_tokenizer():
    from vlm.build import tokenizer_corpus
    from vlm.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(tokenizer_corpus(0), vocab_size=512)


def tiny_llava(
    out,
    tower: str = "clip",
    strategy: str = "default",
    layer: int = -2,
    bias: bool = True,
    act: str = "gelu",
    chat_template: str | None = LLAVA_HF_TEMPLATE,
    seed: int = 0,
    **config_overrides,
):
    """Save a random-init stock Llava checkpoint (weights, processor, generation config) into `out`."""
    from vlm.presets import LLM_PRESETS, TOWER_PRESETS
    from vlm.towers import tower_spec

    tokenizer = tiny_tokenizer()
    vision = TOWER_PRESETS[tower].build_config()
    text = LLM_PRESETS["llama"].build_config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    spec = tower_spec(vision)
    grid = (vision.image_size // vision.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=grid + int(spec.has_cls_token and strategy == "full"),
        projector_hidden_act=act,
        multimodal_projector_bias=bias,
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # Random init leaves the projector's biases at zero; give them values so a dropped bias would show.
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.normal_(0, 0.2)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(out)
    LlavaProcessor(
        image_processor=spec.image_processor(vision.image_size),
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=int(spec.has_cls_token),
        chat_template=chat_template,
    ).save_pretrained(out)
    return out


# Two stock layouts covering every field the importer maps: LLaVA-1.5's (CLIP, drop CLS, layer -2, gelu, biased
# projector) and a SigLIP one (all patches, last layer, tanh gelu, no projector bias).
VARIANTS = {
    "clip-default": dict(tower="clip", strategy="default", layer=-2, bias=True, act="gelu"),
    "siglip-full": dict(tower="siglip", strategy="full", layer=-1, bias=False, act="gelu_pytorch_tanh"),
}


@functools.cache
def stock(variant: str) -> Path:
    """A stock llava-hf checkpoint on disk, built once per session."""
    return tiny_llava(_ROOT / f"llava-{variant}", **VARIANTS[variant])


@functools.cache
def imported(variant: str) -> Path:
    """`stock(variant)` imported and saved as a vlm checkpoint, once per session."""
    from vlm.build import save_checkpoint
    from vlm.importer import import_checkpoint

    model, processor = import_checkpoint("llava-hf", str(stock(variant)))
    return save_checkpoint(model, processor, _ROOT / f"vlm-{variant}")
