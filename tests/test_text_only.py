"""Text-only batches (LLaVA's ShareGPT text in the stage 2 mix): the tower and connector still run, on one blank
image, for an exact zero loss term, so every ZeRO-3 rank joins the same collectives (the 2-rank run is in
tests/test_train_runs.py). Here: the loss is unchanged and the connector gets (zero) gradients, on pixels, on
cached features, and under LoRA and QLoRA.
"""

from __future__ import annotations

import copy

import pytest
import torch

from vlm.build import build_base_model, save_checkpoint
from vlm.data.collate import Collator, PackingCollator, model_inputs
from vlm.data.samples import SupervisedDataset
from vlm.train.feature_cache import build_feature_cache
from vlm.train.freeze import apply_freeze_policy, vlm_of
from vlm.train.modeling import load_model_for_training
from vlm.train.recipe import load_recipe

TEXT = [
    {"id": "t0", "images": [], "conversations": [{"from": "human", "value": "Say red."}, {"from": "gpt", "value": "red"}]},
    {"id": "t1", "images": [], "conversations": [{"from": "human", "value": "Count to two."}, {"from": "gpt", "value": "one two"}]},
]  # fmt: skip


def _text_batch(proc, pack: bool = False) -> dict:
    ds = SupervisedDataset(TEXT, proc, "chatml")
    pad = proc.tokenizer.pad_token_id
    collate = PackingCollator(pad, max_length=64) if pack else Collator(pad)
    return collate([ds[0], ds[1]])


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _loss_and_connector_grads(model, batch: dict):
    model.zero_grad(set_to_none=True)
    loss = model(**model_inputs(batch), use_cache=False).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "connector" in n and p.requires_grad]
    return loss.detach(), grads


@pytest.mark.parametrize("pack", [False, True])
def test_collators_keep_an_empty_image_tensor_for_a_text_only_batch(build, pack):
    _, proc = build("clip", "llama", "mlp")
    batch = _text_batch(proc, pack)
    assert batch["pixel_values"].shape == (0, 3, 32, 32)


@pytest.mark.parametrize("connector", ["mlp", "qformer", "perceiver"])
def test_text_only_batch_runs_tower_and_connector_and_keeps_the_loss(build, connector):
    base, proc = build("clip", "qwen2", connector)
    model = copy.deepcopy(base).train()
    model.connector.requires_grad_(True)
    batch = _text_batch(proc)
    tower, conn = _count_calls(model.vision_tower), _count_calls(model.connector)

    loss, grads = _loss_and_connector_grads(model, batch)
    assert tower == [1] and conn == [1], "the tower and connector must run once on the blank image"
    assert grads and all(g is not None and not g.any() for g in grads), "connector grads: present and zero"

    without = {**batch, "pixel_values": None}  # the old path: no tower, no connector
    ref, ref_grads = _loss_and_connector_grads(model, without)
    assert torch.equal(loss, ref)
    assert all(g is None for g in ref_grads)


def test_text_only_batch_from_the_feature_cache_runs_the_connector_only(build, tmp_path):
    base, proc = build("clip", "llama", "mlp")
    model = copy.deepcopy(base).train()
    model.connector.requires_grad_(True)
    ds = SupervisedDataset(TEXT, proc, "chatml")
    cached = build_feature_cache(model, proc, ds, tmp_path, 8, "cpu", 0, 1, "raise")
    batch = Collator(proc.tokenizer.pad_token_id)([cached[0], cached[1]])
    assert "pixel_values" not in batch and batch["image_features"].shape == (0, *cached.cache.shape)
    tower, conn = _count_calls(model.vision_tower), _count_calls(model.connector)

    loss, grads = _loss_and_connector_grads(model, batch)
    assert tower == [0] and conn == [1]
    assert grads and all(g is not None and not g.any() for g in grads)
    ref, _ = _loss_and_connector_grads(model, {**batch, "image_features": None})
    assert torch.equal(loss, ref)


@pytest.mark.parametrize("recipe", ["stage2_lora", "stage2_qlora"])
def test_text_only_batch_under_lora_and_qlora(tmp_path, recipe):
    if recipe == "stage2_qlora":
        pytest.importorskip("bitsandbytes")
    base, processor = build_base_model("clip", "llama", "mlp", seed=0)
    save_checkpoint(base, processor, tmp_path / "base")
    r = load_recipe(f"stages/{recipe}.yaml", [f"model={tmp_path / 'base'}", "lora.r=4", "lora.alpha=8"])
    model, processor = load_model_for_training(r, {"zero_optimization": {"stage": 2}}, "sdpa")
    model = apply_freeze_policy(model, r).train()
    batch = _text_batch(processor)
    conn = _count_calls(vlm_of(model).connector)

    # Reference first, with grad enabled: a no-grad pass would break the 4-bit layers' backward.
    ref = model(**{**model_inputs(batch), "pixel_values": None}, use_cache=False).loss.detach()
    loss, grads = _loss_and_connector_grads(model, batch)
    assert conn == [1]
    assert torch.equal(loss, ref)
    assert grads and all(g is not None and not g.any() for g in grads)
    lora = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora and all(g is not None and g.abs().sum() > 0 for g in lora), "LoRA still learns from text"
