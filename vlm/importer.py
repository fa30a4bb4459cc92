"""`vlm import`: other ecosystems' checkpoints become `vlm` checkpoints, through a registry of formats.

`llava-hf`: a stock `LlavaForConditionalGeneration` (LLaVA-1.5 layout) maps one to one onto ours: its vision
tower with the feature layer and select strategy, its two-layer projector as our mlp connector with the same
activation and bias, its language model, tokenizer and image processor unchanged. The chat template maps to a
registered one when it renders the same prompts, else it is carried over verbatim (serving only: training needs a
registered template's assistant spans). Whatever ours cannot compute exactly is refused, naming the field.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from huggingface_hub.errors import StrictDataclassError
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer, PretrainedConfig
from transformers.activations import ACT2FN

from .config import VLMConfig
from .constants import IMAGE_TOKEN
from .context import check_context
from .llava_names import from_llava_names
from .model import VLMForConditionalGeneration
from .processing import VLMProcessor
from .templates import led_by_bos, match_template
from .towers import SELECT_STRATEGIES, tower_spec

log = logging.getLogger(__name__)

Importer = Callable[[str], tuple[VLMForConditionalGeneration, VLMProcessor]]
_IMPORTERS: dict[str, Importer] = {}


class ImportRefused(ValueError):
    """The source checkpoint holds something a `vlm` checkpoint cannot represent exactly."""


def register_importer(name: str):
    def decorator(fn: Importer) -> Importer:
        if name in _IMPORTERS:
            raise ValueError(f"importer {name!r} is already registered")
        _IMPORTERS[name] = fn
        return fn

    return decorator


def available_importers() -> list[str]:
    return sorted(_IMPORTERS)


def import_checkpoint(source_format: str, src: str) -> tuple[VLMForConditionalGeneration, VLMProcessor]:
    if source_format not in _IMPORTERS:
        raise ValueError(
            f"unknown import format {source_format!r}; available: {', '.join(available_importers())}"
        )
    return _IMPORTERS[source_format](str(src))


def check_llava_config(config: PretrainedConfig, src: str) -> None:
    """Refuse a config ours cannot reproduce exactly, naming the field and its value."""
    if config.model_type != "llava":
        raise ImportRefused(
            f"{src}: config.json model_type is {config.model_type!r}; --from llava-hf reads 'llava' "
            "(LlavaForConditionalGeneration) checkpoints"
        )
    vision = config.vision_config
    try:
        spec = tower_spec(vision)
    except ValueError as err:
        raise ImportRefused(f"{src}: vision_config.model_type: {err}") from None
    act = config.projector_hidden_act
    if act not in ACT2FN:
        raise ImportRefused(f"{src}: projector_hidden_act {act!r} is not a transformers activation")
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ImportRefused(
            f"{src}: vision_feature_layer {layer!r}: several layers concatenated are not supported; "
            "one int layer is"
        )
    strategy = config.vision_feature_select_strategy
    if strategy not in SELECT_STRATEGIES:
        raise ImportRefused(
            f"{src}: vision_feature_select_strategy {strategy!r} is not supported (one of {SELECT_STRATEGIES})"
        )
    if strategy == "default" and not spec.has_cls_token:
        raise ImportRefused(
            f"{src}: vision_feature_select_strategy 'default' on a {vision.model_type} tower, which has no CLS: "
            "Llava drops its first patch there, which ours does not do; only 'full' is supported"
        )


def _load_config(src: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(src)
    except StrictDataclassError as err:  # transformers' own field validation (e.g. the select strategy)
        raise ImportRefused(f"{src}: config.json: {err}".replace("\n", " ")) from None


def _vlm_config(config: PretrainedConfig) -> VLMConfig:
    return VLMConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        connector={
            "type": "mlp",
            "depth": 2,
            "bias": bool(getattr(config, "multimodal_projector_bias", True)),
            "hidden_act": config.projector_hidden_act,
        },
        image_token_index=config.image_token_index,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )


def _map_state_dict(llava_state: dict[str, torch.Tensor], src: str) -> dict[str, torch.Tensor]:
    mapped, unmatched = from_llava_names(llava_state)
    if unmatched:
        raise ImportRefused(f"{src}: weight {unmatched[0]!r} has no place in a vlm checkpoint")
    return mapped


def _load_llava(src: str, config: PretrainedConfig):
    from transformers import LlavaForConditionalGeneration

    try:
        llava, info = LlavaForConditionalGeneration.from_pretrained(
            src, config=config, dtype="auto", output_loading_info=True
        )
    except OSError as err:
        raise ImportRefused(f"{src}: no loadable weights ({err})") from None
    # A tied lm_head is stored once, under the embeddings; anything else missing would load random.
    tied = config.text_config.tie_word_embeddings
    missing = [k for k in info["missing_keys"] if not (tied and k == "lm_head.weight")]
    if missing:
        raise ImportRefused(
            f"{src}: the checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[:5]}; "
            "they would load as random values"
        )
    return llava.eval()


def _check_processor(source, ours: VLMProcessor, config: VLMConfig, src: str) -> None:
    """The stock processor and ours must lay out and preprocess an image identically."""
    image_token = getattr(source, "image_token", IMAGE_TOKEN)
    if image_token != IMAGE_TOKEN:
        raise ImportRefused(
            f"{src}: processor image_token {image_token!r}; only {IMAGE_TOKEN!r} is supported"
        )
    token_id = source.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id != config.image_token_index:
        raise ImportRefused(
            f"{src}: image_token_index {config.image_token_index} in config.json, but the tokenizer's "
            f"{IMAGE_TOKEN} is id {token_id}"
        )
    probe = Image.new("RGB", (61, 37), (120, 40, 200))  # not square: crop or pad behaviour shows
    theirs = source(text=IMAGE_TOKEN, images=[probe], return_tensors="pt")
    n_theirs = int((theirs["input_ids"] == token_id).sum())
    if n_theirs != config.num_image_tokens:
        raise ImportRefused(
            f"{src}: the processor expands {IMAGE_TOKEN} into {n_theirs} tokens, the model computes "
            f"{config.num_image_tokens} (image_size {config.image_size}, patch_size "
            f"{config.vision_config.patch_size}, vision_feature_select_strategy "
            f"{config.vision_feature_select_strategy!r}); check the processor's patch_size and "
            "num_additional_image_tokens"
        )
    pixels = ours.image_processor(images=[probe], return_tensors="pt")["pixel_values"]
    if pixels.shape[-2:] != (config.image_size, config.image_size):
        raise ImportRefused(
            f"{src}: the image processor makes {tuple(pixels.shape[-2:])} pixels, the tower takes "
            f"image_size {config.image_size}"
        )
    if not torch.equal(pixels, theirs["pixel_values"]):
        raise ImportRefused(f"{src}: the image processor does not reproduce the stock processor's pixels")


def _chat_template(source, tokenizer, src: str) -> str | None:
    jinja = getattr(source, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    registered = match_template(jinja, tokenizer.special_tokens_map) if jinja else None
    if registered is not None:
        log.info("%s: chat template renders as the registered %r template", src, registered.name)
        return led_by_bos(registered.jinja, tokenizer)  # BOS as training renders it
    if jinja:
        log.warning(
            "%s: chat template matches no registered template; carried over verbatim (serving works; "
            "training needs template=NAME)",
            src,
        )
    else:
        log.warning("%s: no chat template; set one before serving chat requests", src)
    return jinja


@register_importer("llava-hf")
def import_llava_hf(src: str) -> tuple[VLMForConditionalGeneration, VLMProcessor]:
    """A stock llava-hf checkpoint (hub id or path) as our model and processor, weights bit for bit."""
    config = _load_config(src)
    check_llava_config(config, src)
    vlm_config = _vlm_config(config)
    source = AutoProcessor.from_pretrained(src, backend="pil")
    tokenizer = AutoTokenizer.from_pretrained(src)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs one; no new token, so no new embedding row
    processor = VLMProcessor(
        image_processor=AutoImageProcessor.from_pretrained(src, backend="pil"),
        tokenizer=tokenizer,
        num_image_tokens=vlm_config.num_image_tokens,
        chat_template=_chat_template(source, tokenizer, src),
    )
    _check_processor(source, processor, vlm_config, src)
    check_context(vlm_config, processor, src)

    llava = _load_llava(src, config)
    state = _map_state_dict(llava.state_dict(), src)
    model, info = VLMForConditionalGeneration.from_pretrained(
        None, config=vlm_config, state_dict=state, dtype=llava.dtype, output_loading_info=True
    )
    unplaced = [*info["missing_keys"], *info["unexpected_keys"], *info["mismatched_keys"]]
    if unplaced:
        raise ImportRefused(f"{src}: weights that do not fit the vlm model: {sorted(map(str, unplaced))[:5]}")
    model.generation_config = llava.generation_config
    return model.eval(), processor
