"""Language pretraining (`objective: text`, stages/lm.yaml, `make lm`): the recipe, the text-only samples, the
LLM directory it writes, `vlm init --llm DIR` on it, and the Makefile wiring of the pretrained parts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm.build import build_base_model, build_language_model, prepare_tokenizer
from vlm.cli import main
from vlm.data.collate import Collator
from vlm.data.text import TextDataset
from vlm.presets import LLM_PRESETS, TOWER_PRESETS, tiny_preset_of
from vlm.templates import get_template
from vlm.train.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]

CAPTION = "two small red circles at the top left and bottom right."
RECORDS = [
    {
        "id": "lm-0",
        "conversations": [
            {"from": "human", "value": "Describe the picture."},
            {"from": "gpt", "value": CAPTION},
        ],
    },
    {
        "id": "lm-1",
        "conversations": [
            {"from": "human", "value": "Which colour is the square?"},
            {"from": "gpt", "value": "blue"},
            {"from": "human", "value": "How many shapes are there?"},
            {"from": "gpt", "value": "3"},
        ],
    },
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_lm_recipe_parses_and_is_stage_0_text():
    recipe = load_recipe(ROOT / "stages/lm.yaml")
    assert (recipe.stage, recipe.objective, recipe.model, recipe.tune) == (0, "text", "llama", "full")
    assert recipe.output_dir == "runs/lm" and recipe.data[0].path.endswith("lm_train.jsonl")
    with pytest.raises(RecipeError, match="stage 0 pretrains a part"):
        load_recipe(ROOT / "stages/lm.yaml", ["stage=1"])
    with pytest.raises(RecipeError, match="stage 0 pretrains a part"):
        load_recipe(ROOT / "stages/stage1.yaml", ["objective=text"])


def test_every_token_of_the_rendered_conversation_is_supervised():
    tokenizer = prepare_tokenizer("llama", 0)
    ds = TextDataset(RECORDS, tokenizer, "chatml", max_length=256)
    assert len(ds) == 2 and ds.lengths == [len(ds[0]["input_ids"]), len(ds[1]["input_ids"])]
    item = ds[1]
    assert torch.equal(item["input_ids"], item["labels"]) and "pixel_values" not in item
    messages = [
        {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
        for t in RECORDS[1]["conversations"]
    ]
    rendered = tokenizer.apply_chat_template(
        messages, chat_template=get_template("chatml").jinja, tokenize=False
    )
    assert tokenizer.decode(item["input_ids"]) == rendered  # the questions and the scaffolding too
    batch = Collator(tokenizer.pad_token_id)([ds[0], ds[1]])
    assert "pixel_values" not in batch and "image_features" not in batch  # the LLM alone gets the batch
    short = int(batch["attention_mask"][0].sum())
    assert (batch["labels"][0, short:] == -100).all() and (batch["labels"][0, :short] >= 0).all()


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"id": "img", "images": ["/x.png"], "conversations": RECORDS[0]["conversations"]}, "has_image"),
        (
            {
                "id": "marker",
                "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "a"}],
            },
            "has_image",
        ),
        (
            {
                "id": "long",
                "conversations": [{"from": "human", "value": "red " * 300}, {"from": "gpt", "value": "a"}],
            },
            "too_long",
        ),
    ],
)
def test_bad_records_name_the_file_and_record_or_are_counted(record, reason):
    tokenizer = prepare_tokenizer("llama", 0)
    with pytest.raises(ValueError, match=rf"lm_train.jsonl: sample '{record['id']}': {reason}"):
        TextDataset([RECORDS[0], record], tokenizer, "chatml", max_length=256, source="lm_train.jsonl")
    ds = TextDataset([RECORDS[0], record], tokenizer, "chatml", max_length=256, on_error="skip")
    assert len(ds) == 1 and ds.skip_report() == {reason: 1}
    with pytest.raises(ValueError, match="no usable text-only record"):
        TextDataset([record], tokenizer, "chatml", max_length=256, on_error="skip", source="f.jsonl")


def test_parts_pretrained_from_tiny_presets_count_as_tiny():
    model, _ = build_language_model("llama", 0)
    assert tiny_preset_of(model.config, LLM_PRESETS) == "llama"
    assert tiny_preset_of(TOWER_PRESETS["siglip"].build_config(), TOWER_PRESETS) == "siglip"
    assert tiny_preset_of(LLM_PRESETS["llama-7b"].build_config(), LLM_PRESETS) is None


@pytest.mark.parametrize("flag, hint", [("--llm", "run make lm first"), ("--tower", "run make stage0 first")])
def test_init_from_a_missing_pretrained_part_says_which_make_target(tmp_path, capsys, flag, hint):
    missing = str(tmp_path / "runs/part/final")
    assert main(["init", flag, missing, "--out", str(tmp_path / "base")]) == 2
    err = capsys.readouterr().err
    assert missing in err and hint in err


@pytest.mark.deepspeed
@pytest.mark.slow
def test_lm_run_writes_an_llm_that_vlm_init_takes_with_the_same_tokenizer(tmp_path):
    data = write_jsonl(tmp_path / "lm_train.jsonl", RECORDS * 16)
    out = tmp_path / "lm"
    result = subprocess.run(
        [sys.executable, "-m", "vlm.cli", "train", "stages/lm.yaml", f"output_dir={out}", f"data=[{data}]",
         "micro_batch_size=8", "global_batch_size=8", "max_steps=4", "log_every=1", "--num-gpus", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    final = out / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and (final / "chat_template.jinja").is_file()
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    assert (
        main(["init", "--tower", "clip", "--llm", str(final), "--connector", "qformer", "--out", str(base)])
        == 0
    )
    model, processor = build_base_model("clip", str(final), "qformer")
    lm_tokenizer, base_tokenizer = AutoTokenizer.from_pretrained(final), AutoTokenizer.from_pretrained(base)
    assert base_tokenizer.get_vocab() == lm_tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert base_tokenizer.all_special_tokens == lm_tokenizer.all_special_tokens
    text = "<|im_start|>user\n" + CAPTION + "<|im_end|>"
    assert base_tokenizer(text)["input_ids"] == lm_tokenizer(text)["input_ids"]
    # The base's LLM is the pretrained one, and its connector got the tiny overrides (a tiny-preset shape).
    lm_weights = load_file(final / "model.safetensors")
    base_weights = load_file(base / "model.safetensors")
    for name, tensor in lm_weights.items():
        torch.testing.assert_close(base_weights[f"language_model.{name}"], tensor, rtol=0, atol=0)
    base_config = json.loads((base / "config.json").read_text())
    assert base_config["text_model_name_or_path"] == str(final)
    assert base_config["connector"]["hidden_size"] == 128
    shutil.rmtree(out / "checkpoints")


def _make_n(*args: str) -> str:
    result = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_makefile_builds_base_checkpoints_from_the_pretrained_parts(tmp_path):
    parts = [f"DATA={tmp_path}/data", f"STAGE0_CKPT={tmp_path}/stage0/final", f"LM_CKPT={tmp_path}/lm/final"]
    default = _make_n("base", "CONNECTORS=mlp", *parts)
    assert f"vlm train stages/stage0.yaml output_dir={tmp_path}/stage0 " in default
    assert (
        f"vlm train stages/lm.yaml output_dir={tmp_path}/lm data=[{tmp_path}/data/lm_train.jsonl]" in default
    )
    assert (
        f"vlm init --tower {tmp_path}/stage0/final --llm {tmp_path}/lm/final --connector mlp --seed 0 "
        "--out checkpoints/base-mlp" in default
    )
    presets = _make_n("base", "CONNECTORS=mlp", "TOWER=clip", "LLM=llama", *parts)
    assert "stages/lm.yaml" not in presets and "stages/stage0.yaml" not in presets
    assert (
        "--tower clip --llm llama --connector mlp --seed 0 --out checkpoints/clip+llama/base-mlp" in presets
    )
    hub = _make_n("base", "CONNECTORS=mlp", "LLM=org/real-llm", *parts)
    assert "stages/lm.yaml" not in hub and "stages/stage0.yaml" in hub  # a real LLM: the lm stage is skipped
    assert "stages/lm.yaml" in _make_n("lm", *parts)
    assert "language pretraining is skipped" in _make_n("lm", "LLM=org/real-llm", *parts)
