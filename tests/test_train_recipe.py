"""Recipes, the freeze policy and the launcher command: fast, in-process."""

from __future__ import annotations

import shlex

import pytest

from vlm.train.freeze import apply_freeze_policy, format_parameter_table, parameter_counts
from vlm.train.launch import launcher_command
from vlm.train.recipe import RecipeError, load_recipe

STAGES = ["stages/stage1.yaml", "stages/stage2.yaml", "stages/stage2_lora.yaml", "stages/stage2_qlora.yaml"]


@pytest.mark.parametrize("path", STAGES)
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert recipe.data and recipe.output_dir
    assert recipe.gradient_accumulation(1) * recipe.micro_batch_size == recipe.global_batch_size


def test_recipes_document_the_llava_settings():
    text = {p: open(p).read() for p in STAGES}
    assert (
        "lr: 1e-3, global_batch_size: 256" in text["stages/stage1.yaml"]
        and "zero2" in text["stages/stage1.yaml"]
    )
    assert (
        "lr: 2e-5, global_batch_size: 128" in text["stages/stage2.yaml"]
        and "zero3" in text["stages/stage2.yaml"]
    )
    lora = text["stages/stage2_lora.yaml"]
    assert (
        "lora.r 128" in lora
        and "lora.alpha 256" in lora
        and "lr 2e-4" in lora
        and "connector_lr 2e-5" in lora
    )


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BASE = "stage: 1\nmodel: m\noutput_dir: o\ndata: [d.jsonl]\n"


@pytest.mark.parametrize(
    "extra,message",
    [
        ("learning_rate: 1e-3\n", "unknown key 'learning_rate'"),
        ("micro_batch: 4\n", "did you mean 'micro_batch_size'"),
        ("epochs: two\n", "epochs: expected int, got 'two'"),
        ("epochs: 0\n", "epochs must be >= 1"),
        ("lr_scheduler: cosin\n", "did you mean 'cosine'"),
        ("lora: {rank: 8}\n", "lora: unknown key 'rank'"),
        ("micro_batch_size: 48\n", "must be a multiple of micro_batch_size"),
        ("tune: full\n", "stage 1 trains only the connector"),
        ("pack: maybe\n", "pack: expected bool"),
    ],
)
def test_bad_recipes_name_the_problem(tmp_path, extra, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write(tmp_path, BASE + extra))


def test_missing_required_key_and_overrides(tmp_path):
    with pytest.raises(RecipeError, match="missing required key.*output_dir"):
        load_recipe(_write(tmp_path, "stage: 1\nmodel: m\ndata: [d.jsonl]\n"))
    recipe = load_recipe(
        _write(tmp_path, BASE), ["lr=2e-5", "lora.r=8", "data=[a.jsonl, {path: b.jsonl, weight: 3}]"]
    )
    assert recipe.lr == 2e-5 and recipe.lora.r == 8
    assert [(d.path, d.weight) for d in recipe.data] == [("a.jsonl", 1.0), ("b.jsonl", 3.0)]
    with pytest.raises(RecipeError, match="not key=value"):
        load_recipe(_write(tmp_path, BASE), ["lr"])


@pytest.mark.parametrize(
    "tune,trainable",
    [
        ("connector", {"connector"}),
        ("full", {"connector", "language_model"}),
        ("lora", {"connector", "language_model"}),
    ],
)
def test_freeze_policy(build, tmp_path, tune, trainable):
    from vlm.build import build_base_model

    model, _ = build_base_model("clip", "llama", "mlp")
    stage = 1 if tune == "connector" else 2
    recipe = load_recipe(
        _write(
            tmp_path,
            BASE.replace("stage: 1", f"stage: {stage}") + f"tune: {tune}\nlora: {{r: 8, alpha: 16}}\n",
        )
    )
    model = apply_freeze_policy(model, recipe)
    counts = parameter_counts(model)
    assert {m for m, (t, _) in counts.items() if t} == trainable
    assert counts["vision_tower"][0] == 0 and counts["vision_tower"][1] > 0
    if tune == "lora":
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        llm = [n for n in names if "language_model" in n]
        assert llm and all("lora_" in n for n in llm), "only LoRA adapters may train inside the LLM"
        assert not any("lora_" in n for n in names if "connector" in n or "vision_tower" in n)
        assert counts["language_model"][0] < counts["language_model"][1] / 4
    assert "vision_tower" in format_parameter_table(counts)


def test_launcher_command_single_node_and_hostfile(tmp_path):
    single = launcher_command("stages/stage1.yaml", ["lr=1e-4"], num_gpus=2, master_port=29555)
    assert single[1:] == [
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        "29555",
        "--module",
        "vlm.train.loop",
        "stages/stage1.yaml",
        "lr=1e-4",
    ]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    multi = launcher_command(
        "stages/stage2.yaml", [], resume=True, hostfile=str(hostfile), master_addr="node1", master_port=29600
    )
    text = shlex.join(multi)
    assert f"--hostfile {hostfile} --master_addr node1 --master_port 29600" in text
    assert "--num_gpus" not in multi and multi[-1] == "--resume"
    with pytest.raises(FileNotFoundError, match="hostfile not found"):
        launcher_command("stages/stage2.yaml", [], hostfile=str(tmp_path / "missing"))


def test_make_stage2_with_a_hostfile_builds_a_multinode_launch(tmp_path, capsys):
    import subprocess

    from vlm.cli import main

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-1 slots=8\nworker-2 slots=8\n")
    make = subprocess.run(
        ["make", "-n", "-W", "pyproject.toml", "stage2", f"HOSTFILE={hostfile}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    train_line = [line for line in make.splitlines() if " train stages/stage2.yaml" in line][-1]
    assert f"--hostfile {hostfile}" in train_line
    # The same arguments through `vlm train --dry-run` give the deepspeed launcher command.
    args = train_line.split(" train ", 1)[1].split()
    assert main(["train", *args, "--dry-run"]) == 0
    launched = capsys.readouterr().out
    assert (
        "deepspeed.launcher.runner --hostfile" in launched
        and "--module vlm.train.loop stages/stage2.yaml" in launched
    )
