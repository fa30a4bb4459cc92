"""The LM head applied at supervised positions only gives the loss, the gradients and the per-source losses of
the full-logit path (transformers' ForCausalLMLoss over every position), in fp32, with several rows, padding and
a row without a supervised token; with LoRA (the head wrapped too) as without."""

from __future__ import annotations

import pytest
import torch
from conftest import chat, solid
from peft import LoraConfig, get_peft_model

from vlm.build import build_base_model
from vlm.constants import IGNORE_INDEX
from vlm.supervised_head import SupervisedLMOutput
from vlm.train.freeze import vlm_of
from vlm.train.source_loss import source_token_sums


def _batch(processor):
    """Three left-padded image chats: answers supervised in rows 0 and 2, nothing in row 1; sources per token."""
    questions = ["what colour is it?", "count the shapes, then name the largest one.", "where?"]
    prompts = [chat(processor, q) + f"answer {k}" for k, q in enumerate(questions)]
    images = [solid(c) for c in ((255, 0, 0), (0, 0, 255), (0, 200, 0))]
    processor.tokenizer.padding_side = "left"
    batch = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    labels[:, :-4] = IGNORE_INDEX  # the last tokens of each row, as an answer
    labels[2, -6:-4] = batch["input_ids"][2, -6:-4]  # a longer answer in row 2
    labels[1] = IGNORE_INDEX  # a row with no supervised token
    sources = torch.zeros_like(labels)
    sources[2] = 1
    return batch, labels, sources


def _step(model, batch, labels, supervised: bool, num_items):
    # Set on the VLM itself: a peft wrapper would take the attribute as its own.
    (model.get_base_model() if hasattr(model, "get_base_model") else model).supervised_head = supervised
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=labels, num_items_in_batch=num_items, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _compare(model, batch, labels, sources, num_items):
    full, full_grads = _step(model, batch, labels, False, num_items)
    ours, our_grads = _step(model, batch, labels, True, num_items)
    assert full.logits is not None and full.logits.shape[1] == labels.shape[1]
    assert isinstance(ours, SupervisedLMOutput) and ours.logits is None
    assert ours.token_losses.shape == (int((labels[:, 1:] != IGNORE_INDEX).sum()),)
    torch.testing.assert_close(ours.loss, full.loss, rtol=1e-5, atol=1e-6)
    assert full_grads.keys() == our_grads.keys() and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # Per-source losses: from the token losses as from the full logits.
    torch.testing.assert_close(
        source_token_sums(ours, labels, sources, 2), source_token_sums(full, labels, sources, 2)
    )
    return full_grads


@pytest.fixture(scope="module")
def base():
    model, processor = build_base_model("clip", "llama", "mlp")
    return model.float().train(), processor


@pytest.mark.parametrize("num_items", [None, 9.0])  # the token mean, and the trainer's global-count division
def test_full_tune_loss_and_gradients_match_the_full_logits(base, num_items):
    model, processor = base
    model.requires_grad_(True)
    vlm_of(model).freeze_vision_tower()
    batch, labels, sources = _batch(processor)
    grads = _compare(model, batch, labels, sources, None if num_items is None else torch.tensor(num_items))
    assert grads["language_model.lm_head.weight"].abs().sum() > 0 and any("connector" in n for n in grads)


def test_no_supervised_token_gives_zero_loss_and_gradients_in_both_paths(base):
    model, processor = base
    model.requires_grad_(True)
    vlm_of(model).freeze_vision_tower()
    batch, labels, sources = _batch(processor)
    labels[:] = IGNORE_INDEX  # a rank's micro-batch with nothing supervised: the head still runs (ZeRO-3)
    grads = _compare(model, batch, labels, sources, torch.tensor(5.0))
    assert all(float(g.abs().sum()) == 0 for g in grads.values())


def test_lora_with_a_wrapped_head_matches_the_full_logits(base):
    model, processor = base
    model.requires_grad_(False)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=r".*language_model\.(.*\.(q_proj|v_proj|down_proj)|lm_head)",
        modules_to_save=["connector"],
    )
    peft_model = get_peft_model(model, lora)
    try:
        head = vlm_of(peft_model).get_output_embeddings()
        assert hasattr(head, "lora_A")  # the head is LoRA-wrapped and called as a module
        for name, p in peft_model.named_parameters():  # LoRA B starts at zero: make every adapter matter
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        batch, labels, sources = _batch(processor)
        grads = _compare(peft_model, batch, labels, sources, torch.tensor(7.0))
        assert any("lm_head.lora_B" in n for n in grads) and all("base_layer" not in n for n in grads)
    finally:
        peft_model.unload()
