"""QLoRA on the CPU: a 4-bit (nf4) LLM with LoRA adapters must get real gradients in every layer.

bitsandbytes repacks a Linear4bit's weights the first time it runs without gradients and then silently loses
its backward (../shared/notes/deepspeed-cpu.md): every LoRA layer *below* such a layer would get zero gradient
while the loss still falls. The check below fails in exactly that case.
"""

from __future__ import annotations

import pytest
from conftest import chat

pytest.importorskip("bitsandbytes")

from vlm.build import build_base_model, save_checkpoint  # noqa: E402
from vlm.train.freeze import apply_freeze_policy  # noqa: E402
from vlm.train.modeling import load_model_for_training  # noqa: E402
from vlm.train.recipe import load_recipe  # noqa: E402


def _lora_grads(model) -> dict[str, float]:
    return {
        name: float(p.grad.abs().sum()) if p.grad is not None else 0.0
        for name, p in model.named_parameters()
        if "lora_B" in name
    }


def test_qlora_gradients_reach_every_layer(tmp_path, images):
    base, processor = build_base_model("clip", "llama", "mlp", seed=0)
    save_checkpoint(base, processor, tmp_path / "base")
    recipe = load_recipe(
        "stages/stage2_qlora.yaml", [f"model={tmp_path / 'base'}", "lora.r=4", "lora.alpha=8"]
    )
    model, processor = load_model_for_training(recipe, {"zero_optimization": {"stage": 2}}, "sdpa")
    import bitsandbytes as bnb

    assert isinstance(model.language_model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    model = apply_freeze_policy(model, recipe)
    model.train()

    texts = [chat(processor, "what colour is the shape?") + "red<|im_end|>"] * 2
    batch = processor(text=texts, images=images[:2], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels, use_cache=False).loss.backward()

    grads = _lora_grads(model)
    layers = model.base_model.model.language_model.config.num_hidden_layers
    targets = len(recipe.lora.target_modules)
    assert len(grads) == layers * targets, sorted(grads)
    zero = [name for name, g in grads.items() if g == 0.0]
    assert not zero, f"LoRA layers with zero gradient (bitsandbytes lost a backward?): {zero}"
    connector = [p.grad for n, p in model.named_parameters() if "connector" in n and p.requires_grad]
    assert connector and all(g is not None and g.abs().sum() > 0 for g in connector)


def test_qlora_under_zero3_is_refused(tmp_path):
    recipe = load_recipe("stages/stage2_qlora.yaml", ["deepspeed=stages/zero3.json"])
    with pytest.raises(ValueError, match="cannot run under ZeRO-3"):
        load_model_for_training(recipe, {"zero_optimization": {"stage": 3}}, "sdpa")
