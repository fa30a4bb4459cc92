"""`vlm init`: assemble a base checkpoint (tower + fresh connector + LLM) from presets or pretrained parts."""

from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path
from typing import Any

from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    set_seed,
)

from .config import VLMConfig
from .connectors import connector_config_from_dict, get_connector_class
from .context import check_context
from .model import VLMForConditionalGeneration
from .plugins import load_plugin
from .policies import pool_patches
from .presets import LLM_PRESETS, TOWER_PRESETS, tiny_preset_of
from .processing import VLMProcessor
from .templates import DEFAULT_CHAT_TEMPLATE, IM_END, IM_START, IMAGE_TOKEN, chat_template_for, get_template
from .tokenizer import train_bpe_tokenizer
from .towers import load_tower, tower_spec

log = logging.getLogger(__name__)

TINY_VOCAB_SIZE = 512
CORPUS_GROUP, TINY_CORPUS = "vlm.tokenizer_corpora", "synthetic"


def tokenizer_corpus(seed: int) -> list[str]:
    """Text the tiny tokenizer learns from: the synthetic world's captions/QA plus the chat scaffolding.

    The world's text comes through the `vlm.tokenizer_corpora` entry point ("synthetic" is vlm.data.synth's):
    the data layer sits above this one, so the core names it and never imports it.
    """
    scaffolding = ["system", "user", "assistant", "You are a helpful assistant.", "Describe the image."]
    return load_plugin(CORPUS_GROUP, TINY_CORPUS)(seed=seed) + scaffolding


def resolve_vision(tower: str, **overrides) -> tuple[PretrainedConfig, PreTrainedModel | None, str | None]:
    """(vision config, pretrained tower or None for a preset, source id recorded in config.json)."""
    if tower in TOWER_PRESETS:
        return TOWER_PRESETS[tower].build_config(**overrides), None, None
    try:
        model = load_tower(tower)
    except OSError as err:
        if Path(tower).exists():
            raise
        raise FileNotFoundError(
            f"tower {tower!r} is not a preset ({', '.join(TOWER_PRESETS)}), a local model directory, or a "
            f"reachable hub id; the contrastive tiny tower (runs/stage0/final) comes from `make stage0`: run make "
            f"stage0 first"
        ) from err
    return model.config, model, str(tower)


def resolve_llm(llm: str) -> tuple[PretrainedConfig, PreTrainedModel | None, str | None]:
    """A preset's config, or a pretrained causal LM: a hub id or a local directory (make lm's runs/lm/final)."""
    if llm in LLM_PRESETS:
        return LLM_PRESETS[llm].build_config(), None, None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(llm))
    except OSError as err:
        if Path(llm).exists():
            raise
        raise FileNotFoundError(
            f"LLM {llm!r} is not a preset ({', '.join(LLM_PRESETS)}), a local model directory, or a reachable hub "
            f"id; the language-pretrained tiny LLM (runs/lm/final) comes from `make lm`: run make lm first"
        ) from err
    return model.config, model, str(llm)


def image_processor_for(tower: str, vision_config: PretrainedConfig):
    """The tower's own preprocessing when its checkpoint ships one, else the registry default for its family."""
    if tower not in TOWER_PRESETS:
        try:
            return AutoImageProcessor.from_pretrained(str(tower), backend="pil")
        except (OSError, ValueError):
            log.info(
                "no image processor config with %s; using the %s default", tower, vision_config.model_type
            )
    return tower_spec(vision_config).image_processor(vision_config.image_size)


@functools.lru_cache(maxsize=4)
def _tiny_tokenizer(seed: int):
    return train_bpe_tokenizer(tokenizer_corpus(seed), vocab_size=TINY_VOCAB_SIZE)


def fit_text_config(text_config: PretrainedConfig, tokenizer, pretrained: bool) -> None:
    """The LLM config's vocabulary and special ids from the tokenizer (`pretrained`: keep a larger vocab)."""
    text_config.vocab_size = max(text_config.vocab_size, len(tokenizer)) if pretrained else len(tokenizer)
    for name in ("bos", "eos", "pad"):
        setattr(text_config, f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))


def build_language_model(llm: str, seed: int = 0) -> tuple[PreTrainedModel, Any]:
    """(random-init causal LM, tokenizer) from an LLM preset: what `make lm` pretrains. The tokenizer is the one
    `vlm init` trains for the preset and carries the default chat template, so every base checkpoint built
    from the pretrained LLM (`vlm init --llm runs/lm/final`) uses that same tokenizer."""
    if llm not in LLM_PRESETS:
        raise ValueError(f"{llm!r} is not an LLM preset ({', '.join(LLM_PRESETS)})")
    tokenizer = prepare_tokenizer(llm, seed)
    tokenizer.chat_template = chat_template_for(DEFAULT_CHAT_TEMPLATE, tokenizer)
    config = LLM_PRESETS[llm].build_config()
    fit_text_config(config, tokenizer, pretrained=False)
    set_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = generation_config_for(tokenizer)
    return model, tokenizer


def prepare_tokenizer(llm: str, seed: int):
    """A locally trained BPE for tiny presets; a pretrained LLM's own tokenizer plus our special tokens otherwise."""
    if llm in LLM_PRESETS:
        return copy.deepcopy(_tiny_tokenizer(seed))  # cached: training takes seconds, callers may mutate
    tokenizer = AutoTokenizer.from_pretrained(str(llm))
    missing = [t for t in (IMAGE_TOKEN, IM_START, IM_END) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def connector_dict(connector: str | dict[str, Any], tiny: bool, options: dict[str, Any]) -> dict[str, Any]:
    """A connector name (registry defaults, tiny overrides for tiny parts) or a parsed YAML preset, plus options.

    Keys neither gives take the connector's `new_checkpoint` values (features old config.json files lack)."""
    name = connector.get("type") if isinstance(connector, dict) else connector
    cls = get_connector_class(name) if isinstance(name, str) else None
    values = {"type": name, **(cls.config_class.new_checkpoint if cls else {})}
    if isinstance(connector, dict):
        values.update(connector)
    elif tiny:
        values.update(cls.tiny_overrides)
    values.update(options)
    return connector_config_from_dict(values).to_dict()


def build_base_model(
    tower: str,
    llm: str,
    connector: str | dict[str, Any],
    seed: int = 0,
    connector_options: dict[str, Any] | None = None,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str | None = None,
    image_policy: dict[str, Any] | None = None,
) -> tuple[VLMForConditionalGeneration, VLMProcessor]:
    """image_policy: `{"type": "single" | "anyres", ...}` (vlm/policies); None is `single`."""
    set_seed(seed)
    vision_config, tower_model, tower_source = resolve_vision(tower)
    text_config, llm_model, llm_source = resolve_llm(llm)
    tokenizer = prepare_tokenizer(llm, seed)
    tiny = bool(tiny_preset_of(vision_config, TOWER_PRESETS) and tiny_preset_of(text_config, LLM_PRESETS))
    # A real-size preset (qwen2-0.5b) keeps its vocabulary, as a pretrained LLM does: the tiny tokenizer fills its
    # first ids and the embedding and head keep their real size (152k rows: the logits' real cost).
    keep_vocab = llm_model is not None or not LLM_PRESETS[llm].tiny
    fit_text_config(text_config, tokenizer, pretrained=keep_vocab)

    config = VLMConfig(
        vision_config=vision_config,
        text_config=text_config,
        connector=connector_dict(connector, tiny, connector_options or {}),
        image_policy=image_policy,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        vision_tower_name_or_path=tower_source,
        text_model_name_or_path=llm_source,
    )
    processor = VLMProcessor(
        image_processor=image_processor_for(tower, vision_config),
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        chat_template=chat_template_for(DEFAULT_CHAT_TEMPLATE, tokenizer),  # BOS where the tokenizer adds it
        image_policy=config.image_policy,
    )
    # Before building a model that could not serve one image.
    check_context(config, processor, f"--tower {tower} --llm {llm}")
    set_seed(seed)
    model = VLMForConditionalGeneration(config)
    if tower_model is not None:
        model.vision_tower.load_state_dict(tower_model.state_dict())
    if llm_model is not None:
        # To the config's size (never below the LLM's own): Qwen2-style vocabularies are larger than the tokenizer.
        llm_model.resize_token_embeddings(text_config.vocab_size)
        model.language_model.load_state_dict(llm_model.state_dict())
    model.generation_config = generation_config_for(tokenizer)
    if config.connector_config.output_scale:
        calibrate_connector(model, seed)
    return model, processor


def calibrate_connector(model: VLMForConditionalGeneration, seed: int, n_probe: int = 8) -> float:
    """Start image tokens at the text embeddings' RMS: the connector's output scale is set on tower features of
    random-noise images (the tower as loaded; normalised pixels are roughly unit-variance noise)."""
    import torch

    weight = model.get_input_embeddings().weight
    target = float(weight.detach().float().pow(2).mean().sqrt())
    size = model.config.vision_config.image_size
    pixels = torch.randn(n_probe, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        features = model.get_tower_features(pixels.to(model.vision_tower.dtype))
        features = pool_patches(features, model.config.image_policy_config.pool)
    scale = model.connector.calibrate_output_scale(features, target)
    log.info("connector output scale %.4g (text embedding RMS %.4g)", scale, target)
    return scale


def generation_config_for(tokenizer) -> GenerationConfig:
    stops = [tokenizer.eos_token_id] + [
        tokenizer.convert_tokens_to_ids(t) for t in get_template(DEFAULT_CHAT_TEMPLATE).stop_tokens
    ]
    return GenerationConfig(
        eos_token_id=sorted(set(stops)),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        do_sample=False,
    )


def save_checkpoint(
    model: VLMForConditionalGeneration, processor: VLMProcessor, out: str | Path, state_dict=None
) -> Path:
    """Weights, config and generation config (save_pretrained), tokenizer, processor and chat template.

    `state_dict`: weights gathered elsewhere (ZeRO-3 partitions them), saved under the model's own config.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Our own module names, always: reverting transformers' load-time conversions would depend on how the model
    # was loaded (under ZeRO-3 it re-adds legacy names such as `LayerNorm.gamma`, which vLLM cannot map).
    model.save_pretrained(out, state_dict=state_dict, save_original_format=False)
    processor.save_pretrained(out)
    return out


def text_head_dim(text_config: PretrainedConfig) -> int:
    return (
        getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    )


def describe(model: VLMForConditionalGeneration) -> dict[str, Any]:
    cfg = model.config
    counts = {
        name: sum(p.numel() for p in getattr(model, name).parameters())
        for name in ("vision_tower", "connector", "language_model")
    }
    return {
        "tower": cfg.vision_config.model_type,
        "llm": cfg.text_config.model_type,
        "connector": cfg.connector["type"],
        "image_tokens": cfg.num_image_tokens,
        "image_policy": cfg.image_policy,
        "max_image_tokens": cfg.max_image_tokens,
        "parameters": counts,
        "head_dim": text_head_dim(cfg.text_config),
    }
