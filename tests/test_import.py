"""`vlm import --from llava-hf`: stock Llava checkpoints become ours bit for bit, answer as transformers' Llava
does, export back to the same tensors, and what cannot be represented is refused by field and value."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import chat
from llava_helpers import LLAVA_HF_TEMPLATE, VARIANTS, imported, stock, tiny_llava
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration
from vllm_helpers import noise_image

from vlm.build import build_base_model, save_checkpoint
from vlm.cli import main
from vlm.export import export_llava_hf
from vlm.importer import ImportRefused, import_checkpoint
from vlm.templates import get_template, resolve_template


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_maps_every_field(variant):
    spec = VARIANTS[variant]
    config = json.loads((imported(variant) / "config.json").read_text())
    assert config["model_type"] == "vlm"
    assert config["connector"] == {
        "type": "mlp",
        "depth": 2,
        "bias": spec["bias"],
        "hidden_act": spec["act"],
        "output_scale": False,
    }
    assert config["vision_feature_layer"] == spec["layer"]
    assert config["vision_feature_select_strategy"] == spec["strategy"]
    assert config["vision_config"]["model_type"] == f"{spec['tower']}_vision_model"
    # LLaVA-1.5's chat template maps onto the registered llava template.
    processor = AutoProcessor.from_pretrained(imported(variant))
    assert processor.chat_template == get_template("llava").jinja
    assert resolve_template("auto", processor.chat_template) == "llava"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_then_export_gives_the_same_tensors(variant, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(imported(variant))
    export_llava_hf(model, AutoProcessor.from_pretrained(imported(variant)), tmp_path)
    source, exported = (
        load_file(stock(variant) / "model.safetensors"),
        load_file(tmp_path / "model.safetensors"),
    )
    assert source.keys() == exported.keys() and source
    for name, tensor in source.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    theirs, ours = (json.loads((d / "config.json").read_text()) for d in (stock(variant), tmp_path))
    for key in (
        "projector_hidden_act",
        "multimodal_projector_bias",
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "image_token_index",
    ):
        assert ours[key] == theirs[key], key


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generate_matches_stock_llava(variant):
    """Same prompts through transformers' Llava (its own processor) and our imported checkpoint (ours)."""
    llava = LlavaForConditionalGeneration.from_pretrained(stock(variant)).eval()
    llava_processor = AutoProcessor.from_pretrained(stock(variant))
    model = AutoModelForImageTextToText.from_pretrained(imported(variant)).eval()
    processor = AutoProcessor.from_pretrained(imported(variant))
    answers = []
    for k, (question, n_images) in enumerate([("what colour is it?", 1), ("compare them.", 2), ("hi.", 0)]):
        images = [noise_image(10 * k + i) for i in range(n_images)] or None
        ids = []
        for proc, net in ((llava_processor, llava), (processor, model)):
            batch = proc(text=[chat(proc, question, n_images)], images=images, return_tensors="pt")
            with torch.no_grad():
                out = net.generate(**batch, max_new_tokens=12, do_sample=False)
            ids.append(out[0].tolist())
        assert ids[0] == ids[1], (variant, question)
        answers.append(tuple(ids[0]))
    assert len(set(answers)) == len(answers)


def test_cli_import_writes_a_checkpoint(tmp_path, capsys):
    assert main(["import", "--from", "llava-hf", str(stock("clip-default")), "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["connector"] == "mlp" and report["image_tokens"] == 16
    for name in ("config.json", "model.safetensors", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "model.safetensors").stat().st_size > 0


def test_unmatched_chat_template_is_carried_verbatim(tmp_path):
    custom = "{% for m in messages %}[{{ m['role'] }}]{% for p in m['content'] %}{{ p['text'] or '<image>' }}{% endfor %}{% endfor %}"
    _, processor = import_checkpoint("llava-hf", str(tiny_llava(tmp_path, chat_template=custom)))
    assert processor.chat_template == custom
    with pytest.raises(ValueError, match="template: auto needs .* set template=NAME"):
        resolve_template("auto", processor.chat_template)


def _edit_config(src: Path, dst: Path, **changes) -> Path:

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"projector_hidden_act": "swishy"}, "projector_hidden_act 'swishy'"),
        ({"vision_feature_layer": [-2, -1]}, r"vision_feature_layer \[-2, -1\]"),
        (
            {"vision_feature_select_strategy": "cls"},
            "field 'vision_feature_select_strategy'.* expected one of .*got cls",
        ),
    ],
)
def test_unrepresentable_configs_are_refused_by_field(tmp_path, changes, message):
    src = _edit_config(stock("clip-default"), tmp_path / "edited", **changes)
    with pytest.raises(ImportRefused, match=message):
        import_checkpoint("llava-hf", str(src))


def test_default_strategy_on_a_tower_without_cls_is_refused(tmp_path):
    src = tiny_llava(tmp_path, tower="siglip", strategy="default")
    with pytest.raises(
        ImportRefused, match="vision_feature_select_strategy 'default' on a siglip_vision_model"
    ):
        import_checkpoint("llava-hf", str(src))


def test_non_llava_config_is_refused(tmp_path, capsys):
    model, processor = build_base_model("clip", "llama", "mlp")
    save_checkpoint(model, processor, tmp_path)
    # (A `vlm init` base keeps ChatML, which the stage 2 recipes' template: auto picks.)
    assert resolve_template("auto", AutoProcessor.from_pretrained(tmp_path).chat_template) == "chatml"
    assert main(["import", "--from", "llava-hf", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "config.json model_type is 'vlm'; --from llava-hf reads 'llava'" in capsys.readouterr().err


def test_missing_weights_are_refused(tmp_path):
    src = _edit_config(stock("clip-default"), tmp_path / "partial")
    weights = load_file(src / "model.safetensors")
    # Saved in llava-hf's own (hub) names, as transformers writes them; loading renames them.
    dropped = "multi_modal_projector.linear_2.weight"
    assert dropped in weights
    save_file({k: v for k, v in weights.items() if k != dropped}, src / "model.safetensors")
    with pytest.raises(ImportRefused, match=f"lacks 1 weights.*'model.{dropped}'"):
        import_checkpoint("llava-hf", str(src))
    (src / "model.safetensors").unlink()
    with pytest.raises(ImportRefused, match="no loadable weights"):
        import_checkpoint("llava-hf", str(src))


def test_processor_expanding_another_token_count_is_refused(tmp_path):
    src = _edit_config(stock("clip-default"), tmp_path / "proc")
    config = json.loads((src / "processor_config.json").read_text())
    config["num_additional_image_tokens"] = 0  # as if the tower had no CLS: one token short
    (src / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ImportRefused, match="expands <image> into 15 tokens, the model computes 16"):
        import_checkpoint("llava-hf", str(src))


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown import format 'llava-next'; available: llava-hf"):
        import_checkpoint("llava-next", "x")


def test_llava_hf_template_is_stock():
    """The fixture's template is llava-hf's own: it renders LLaVA-1.5's prompt layout."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]],
        chat_template=LLAVA_HF_TEMPLATE,
        add_generation_prompt=True,
    )
    assert rendered[0] == "USER: <image>\nWhat? ASSISTANT:"
