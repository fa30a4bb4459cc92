"""Checkpoints: save/load round trip, Auto classes, pretrained parts via from_pretrained, llava-hf interop."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONNECTORS, chat
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
)

import vlm
from vlm.build import build_base_model, save_checkpoint
from vlm.export import export_llava_hf, to_llava_hf


def _batch(processor, images):
    texts = [chat(processor, "what colour is the shape?"), chat(processor, "how many?")]
    return processor(text=texts, images=images[:2], padding=True, return_tensors="pt")


@pytest.mark.parametrize("connector", CONNECTORS)
def test_save_load_round_trip_is_exact(build, images, tmp_path, connector):
    model, processor = build("clip", "llama", connector)
    save_checkpoint(model, processor, tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    for key in (
        "architectures",
        "model_type",
        "vision_config",
        "text_config",
        "connector",
        "image_token_index",
        "vision_feature_layer",
        "vision_feature_select_strategy",
    ):
        assert key in config, key
    assert config["model_type"] == "vlm" and config["architectures"] == ["VLMForConditionalGeneration"]
    assert config["connector"]["type"] == connector
    assert (tmp_path / "chat_template.jinja").is_file() and (tmp_path / "model.safetensors").is_file()

    assert isinstance(AutoConfig.from_pretrained(tmp_path), vlm.VLMConfig)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, vlm.VLMForConditionalGeneration)
    assert isinstance(loaded_processor, vlm.VLMProcessor)
    assert loaded_processor.num_image_tokens == processor.num_image_tokens

    batch = _batch(processor, images)
    assert torch.equal(_batch(loaded_processor, images)["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert not any(p.requires_grad for p in loaded.vision_tower.parameters())


def test_pretrained_parts_load_through_from_pretrained(build, tmp_path):
    """A tower and an LLM saved as ordinary HF checkpoints load via the hub-id/path route, weights intact."""
    reference, processor = build("clip", "llama", "mlp")
    tower_dir, llm_dir = tmp_path / "tower", tmp_path / "llm"
    reference.vision_tower.save_pretrained(tower_dir)
    processor.image_processor.save_pretrained(tower_dir)
    reference.language_model.save_pretrained(llm_dir)
    processor.tokenizer.save_pretrained(llm_dir)

    model, new_processor = build_base_model(str(tower_dir), str(llm_dir), "mlp", seed=1)
    assert model.config.vision_tower_name_or_path == str(tower_dir)
    assert model.config.text_model_name_or_path == str(llm_dir)
    for ours, theirs in (
        (model.vision_tower, CLIPVisionModel.from_pretrained(tower_dir)),
        (model.language_model, AutoModelForCausalLM.from_pretrained(llm_dir)),
    ):
        for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    assert new_processor.num_image_tokens == 16


def test_unknown_tower_type_is_a_clear_error(tmp_path):
    llm_dir = tmp_path / "not_a_tower"
    AutoModelForCausalLM.from_config(
        vlm.VLMConfig().text_config.__class__(
            hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=300
        )
    ).save_pretrained(llm_dir)
    with pytest.raises(ValueError, match="unsupported vision tower model_type 'llama'"):
        build_base_model(str(llm_dir), "llama", "mlp")


def test_llava_interop_logits_match(build, images, tmp_path):
    """Same weights in transformers' own LlavaForConditionalGeneration give the same logits: the merge is Llava's."""
    model, processor = build("clip", "llama", "mlp")
    llava = to_llava_hf(model)
    batch = _batch(processor, images)
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = llava(**batch).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)

    # The exported directory is a stock Llava checkpoint that loads with plain transformers classes.
    export_llava_hf(model, processor, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava"
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    llava_processor = AutoProcessor.from_pretrained(tmp_path)
    llava_batch = llava_processor(
        text=[chat(processor, "what colour is the shape?")], images=images[:1], return_tensors="pt"
    )
    assert torch.equal(
        llava_batch["input_ids"],
        processor(
            text=[chat(processor, "what colour is the shape?")], images=images[:1], return_tensors="pt"
        )["input_ids"],
    )
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, ours, rtol=0, atol=1e-6)


def test_llava_export_refuses_other_connectors(build):
    model, _ = build("clip", "llama", "qformer")
    with pytest.raises(ValueError, match="mlp connector with depth 2"):
        to_llava_hf(model)
