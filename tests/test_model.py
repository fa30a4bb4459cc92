"""The assembled model: every connector x tower x LLM, the embedding merge, padding, mixed batches, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import CONNECTORS, LLMS, TOWERS, chat

EXPECTED_TOKENS = {"linear": 16, "mlp": 16, "qformer": 32, "perceiver": 64}  # tiny tower: 32 px / patch 8


@pytest.mark.parametrize("llm", LLMS)
@pytest.mark.parametrize("tower", TOWERS)
@pytest.mark.parametrize("connector", CONNECTORS)
def test_forward_backward_and_frozen_tower(build, images, connector, tower, llm):
    model, processor = build(tower, llm, connector)
    assert model.config.num_image_tokens == EXPECTED_TOKENS[connector] == processor.num_image_tokens
    texts = [chat(processor, "what colour is the shape?"), chat(processor, "how many shapes are there?")]
    batch = processor(text=texts, images=images[:2], padding=True, return_tensors="pt")
    n_placeholders = int((batch["input_ids"] == model.config.image_token_index).sum())
    assert n_placeholders == 2 * EXPECTED_TOKENS[connector]

    model.zero_grad(set_to_none=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    try:
        assert all(p.grad is None for p in model.vision_tower.parameters()), "the frozen tower got gradients"
        assert not any(p.requires_grad for p in model.vision_tower.parameters())
        connector_grads = [p.grad for p in model.connector.parameters()]
        assert all(g is not None for g in connector_grads), "some connector parameters got no gradient"
        assert sum(float(g.abs().sum()) for g in connector_grads) > 0
        assert model.language_model.get_input_embeddings().weight.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)


def _single_logits(model, processor, text, imgs):
    batch = processor(text=[text], images=imgs or None, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits[0]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("connector", ["mlp", "perceiver"])
def test_mixed_batch_multi_image_and_padding(build, images, connector, side):
    """A batch mixing two images, none and one per sample gives each sample the logits it gets alone."""
    model, processor = build("clip", "llama", connector)
    samples = [
        (chat(processor, "compare the two shapes.", n_images=2), images[:2]),
        (
            processor.apply_chat_template(
                [{"role": "user", "content": "no picture here."}], add_generation_prompt=True
            ),
            [],
        ),
        (chat(processor, "what shape is it?"), images[2:]),
    ]
    tokenizer = processor.tokenizer
    tokenizer.padding_side = side
    try:
        flat_images = [img for _, imgs in samples for img in imgs]
        batch = processor(text=[t for t, _ in samples], images=flat_images, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    assert batch["pixel_values"].shape[0] == 3
    with torch.no_grad():
        logits = model(**batch).logits
    for i, (text, imgs) in enumerate(samples):
        alone = _single_logits(model, processor, text, imgs)
        valid = batch["attention_mask"][i].bool()
        torch.testing.assert_close(logits[i][valid], alone, atol=1e-4, rtol=1e-4)


def test_placeholder_image_mismatch_names_both_counts(build, images):
    model, processor = build("clip", "llama", "mlp")
    one_image = processor(text=[chat(processor, "what colour?")], images=images[:1], return_tensors="pt")
    with pytest.raises(ValueError, match=r"16 placeholder tokens .* 2 images"):
        model(input_ids=one_image["input_ids"], pixel_values=torch.cat([one_image["pixel_values"]] * 2))
    with pytest.raises(ValueError, match=r"16 placeholder tokens .* 0 images"):
        model(input_ids=one_image["input_ids"])
    with pytest.raises(ValueError, match=r"1 <image> markers but 2 images"):
        processor(text=[chat(processor, "what colour?")], images=images[:2])
    with pytest.raises(ValueError, match=r"2 <image> markers but 0 images"):
        processor(text=[chat(processor, "compare", n_images=2)])
    with pytest.raises(ValueError, match=r"n_images, channels, height, width"):
        model(input_ids=one_image["input_ids"], pixel_values=one_image["pixel_values"][0])


@pytest.mark.parametrize("connector", CONNECTORS)
def test_generate_with_kv_cache_equals_greedy_without(build, images, connector):
    model, processor = build("siglip", "qwen2", connector)
    texts = [chat(processor, "what colour is the shape?"), chat(processor, "where is the shape?")]
    batch = processor(text=texts, images=images[:2], padding=True, return_tensors="pt")
    # Left padding for batched generation, as usual for decoder-only models.
    processor.tokenizer.padding_side = "left"
    try:
        batch = processor(text=texts, images=images[:2], padding=True, return_tensors="pt")
    finally:
        processor.tokenizer.padding_side = "right"
    new = 8
    cached = model.generate(**batch, max_new_tokens=new, do_sample=False, use_cache=True, eos_token_id=None)
    uncached = model.generate(
        **batch, max_new_tokens=new, do_sample=False, use_cache=False, eos_token_id=None
    )
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)

    # And both equal a plain argmax loop over full forwards (no generate() machinery at all).
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        for _ in range(new):
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"]).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    torch.testing.assert_close(cached, ids, rtol=0, atol=0)


@pytest.mark.parametrize("connector", ["qformer", "perceiver"])
def test_init_matches_image_tokens_to_text_embedding_scale(build, images, tmp_path, connector):
    """`vlm init` turns the new connector features on and starts image tokens at the text embeddings' RMS;
    the calibrated scale survives a save/load."""
    from vlm.build import save_checkpoint
    from vlm.model import VLMForConditionalGeneration

    model, processor = build("clip", "llama", connector)
    cfg = model.config.connector
    assert cfg["output_scale"] is True and cfg.get("position_embedding", True) is True
    text_rms = float(model.get_input_embeddings().weight.detach().pow(2).mean().sqrt())
    pixels = processor.image_processor(images=images[:1], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image_rms = float(model.get_image_features(pixels).pow(2).mean().sqrt())
    assert 0.5 * text_rms < image_rms < 2 * text_rms, (image_rms, text_rms)
    save_checkpoint(model, processor, tmp_path / "ckpt")
    loaded = VLMForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(loaded.connector.log_output_scale, model.connector.log_output_scale)
