"""The LLM's context against one image's tokens: `vlm init` and `vlm import` refuse a checkpoint that cannot hold
one image and a minimal chat, the tiny presets hold a real tower's image, and `generate` refuses a prompt longer
than the context as vLLM does."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import chat, solid
from llava_helpers import stock

from vlm.budget import measured_tokens
from vlm.build import build_base_model, build_language_model, connector_dict
from vlm.cli import main
from vlm.config import VLMConfig
from vlm.context import ContextTooSmall, check_context, minimal_prompt_tokens
from vlm.importer import import_checkpoint
from vlm.presets import LLM_PRESETS, TOWER_PRESETS


def _short_context_llm(path, context: int):
    """A tiny Llama saved as a pretrained LLM directory, with its context cut to `context` positions."""
    model, tokenizer = build_language_model("llama")
    model.config.max_position_embeddings = context
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_init_refuses_clip_l_336_on_a_short_context(tmp_path, capsys):
    llm = _short_context_llm(tmp_path / "llm", 512)
    with pytest.raises(ContextTooSmall) as refused:
        build_base_model("clip-vit-l-14-336", str(llm), "mlp")
    message = str(refused.value)
    assert "one image takes 576 tokens" in message and "context (max_position_embeddings) is 512" in message
    fit = message.split("LLM presets that fit: ")[1].split(";")[0].split(", ")
    assert {"llama", "qwen2", "llama-7b", "qwen2-7b"} <= set(fit)  # all presets, all at least 2048 now
    # The command line: one clear line, exit status 2, no checkpoint written.
    out = tmp_path / "ckpt"
    argv = ["init", "--tower", "clip-vit-l-14-336", "--llm", str(llm), "--out", str(out)]
    assert main(argv) == 2
    assert "576 tokens" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("llm", ["llama", "qwen2"])
def test_tiny_presets_hold_a_clip_l_336_image(llm, build):
    _, processor = build("clip", llm, "mlp")  # the preset's tokenizer and chat template
    config = VLMConfig(
        vision_config=TOWER_PRESETS["clip-vit-l-14-336"].build_config(),
        text_config=LLM_PRESETS[llm].build_config(),
        connector=connector_dict("mlp", False, {}),
    )
    assert measured_tokens(config) == config.num_image_tokens == 576
    prompt = minimal_prompt_tokens(processor)
    assert (
        5 < prompt < 64
    )  # the chat scaffolding, question and answer: more than the words, far less than 576
    assert 576 + prompt <= config.text_config.max_position_embeddings
    check_context(config, processor, "clip-vit-l-14-336 + " + llm)  # no error
    too_short = VLMConfig(
        **{
            **config.to_dict(),
            "text_config": LLM_PRESETS[llm].build_config(max_position_embeddings=576 + prompt - 1),
        }
    )
    with pytest.raises(ContextTooSmall, match=f"{576 + prompt} in all, .* is {576 + prompt - 1}"):
        check_context(too_short, processor, "edge")


def test_import_refuses_a_llava_whose_context_is_too_short(tmp_path):
    src = tmp_path / "short"
    shutil.copytree(stock("clip-default"), src)
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 20  # 16 image tokens + LLaVA-1.5's prompt do not fit
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ContextTooSmall, match=f"{src}: one image takes 16 tokens .* context .* is 20"):
        import_checkpoint("llava-hf", str(src))


def test_generate_refuses_a_prompt_past_the_context(build):
    model, processor = build("clip", "llama", "mlp")
    context = model.config.text_config.max_position_embeddings
    # An image prompt padded with text to one token past the context: the 16 image placeholders count.
    prompt = chat(processor, "what colour is it?")
    base = processor(text=[prompt], images=[solid((255, 0, 0))], return_tensors="pt")
    n = base["input_ids"].shape[1]
    filler = torch.full((1, context + 1 - n), int(base["input_ids"][0, -1]))
    ids = torch.cat([filler, base["input_ids"]], dim=1)
    mask = torch.ones_like(ids)
    with pytest.raises(
        ValueError,
        match=rf"Input length \({context + 1}\) exceeds model's maximum context length \({context}\)",
    ):
        model.generate(
            input_ids=ids, attention_mask=mask, pixel_values=base["pixel_values"], max_new_tokens=1
        )
    # Padding does not count: the short prompt left-padded to past the context is within it.
    padded = torch.cat([torch.zeros((1, context), dtype=ids.dtype), base["input_ids"]], dim=1)
    pad_mask = (padded != 0).long()
    pad_mask[0, context:] = 1
    model.check_input_length(padded, pad_mask)
    with pytest.raises(ValueError, match=rf"Input length \({context + 1}\)"):
        model.check_input_length(ids)
