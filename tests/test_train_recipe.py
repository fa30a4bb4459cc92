"""Recipes, the freeze policy and the launcher command: fast, in-process."""

from __future__ import annotations

import shlex

import pytest

from vlm.train.freeze import apply_freeze_policy, format_parameter_table, parameter_counts
from vlm.train.launch import launcher_command, remove_shm_buffers
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


def test_a_runs_shm_buffers_are_removed_and_no_others(tmp_path):
    """DeepSpeed's CPU comm op never unlinks its per-rank buffers; `vlm train` removes its own run's, by port."""
    import os

    uid = os.getuid()
    ours = [f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_1234_{rank}" for rank in (0, 1)]
    others = [
        f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_12345_0",  # another run: a port that starts the same
        f"deepspeed_allreduce_buffer_{uid + 1}_127.0.0.1_1234_0",  # another user's
        "psm_1234",
    ]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_shm_buffers(1234, shm=tmp_path)
    assert sorted(p.name for p in removed) == ours
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)


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


def test_nonpositive_mix_weight_names_the_file_and_key(tmp_path):
    path = _write(tmp_path, BASE.replace("[d.jsonl]", "[a.jsonl, {path: b.jsonl, weight: 0}]"))
    with pytest.raises(
        RecipeError, match=r"r\.yaml: data\[1\]\.weight: must be > 0, got 0.0 \(source b.jsonl\)"
    ):
        load_recipe(path)


@pytest.mark.parametrize(
    "extra,message",
    [
        ("eval: {every: 5}\n", r"eval\.tasks: eval\.every is set but no eval file"),
        ("eval: {every: -1}\n", r"eval\.every: must be >= 0"),
        ("eval: {limit: 0}\n", r"eval\.limit: must be >= 1"),
        ("eval: {tasks: {vqa: v.jsonl, gqa: g.jsonl}}\n", r"eval\.tasks: unknown key 'gqa'"),
    ],
)
def test_bad_eval_settings_name_the_key(tmp_path, extra, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write(tmp_path, BASE + extra))


def test_preflight_names_recipe_file_key_and_make_target(tmp_path, monkeypatch):
    from vlm.train.preflight import check_inputs

    monkeypatch.chdir(tmp_path)  # the relative ./checkpoints/... case must not find a checkout's own base

    (tmp_path / "a.jsonl").write_text("")
    ok = f"stage: 2\ntune: full\noutput_dir: o\ndata: [{tmp_path / 'a.jsonl'}]\n"
    missing_data = ok.replace("data: [", f"data: [{tmp_path / 'gone.jsonl'}, ")
    cases = [
        (missing_data + "model: clip\n", r"r\.yaml: data\[0\]\.path: data file not found: .*gone\.jsonl"),
        (
            ok + f"model: {tmp_path}/runs/mlp/stage1/final\n",
            r"model: checkpoint not found: .*run `make stage1` first",
        ),
        (ok + "model: ./checkpoints/base-qformer\n", r"model: .*base-qformer \(run `make base` first\)"),
        (ok + f"model: {tmp_path}/runs/lm/final\n", r"run `make lm` first"),
        (
            ok + f"model: {tmp_path}\neval: {{every: 2, tasks: {{pope: {tmp_path}/p.jsonl}}}}\n",
            r"eval\.tasks\.pope: eval file not found",
        ),
    ]
    (tmp_path / "config.json").write_text("{}")
    for text, message in cases:
        path = _write(tmp_path, text)
        with pytest.raises(RecipeError, match=message):
            check_inputs(load_recipe(path), path)
    # A hub-style id is left to the loader (it may be downloadable); an existing checkpoint passes.
    check_inputs(load_recipe(_write(tmp_path, ok + "model: org/name\n")), "r.yaml")
    check_inputs(load_recipe(_write(tmp_path, ok + f"model: {tmp_path}\n")), "r.yaml")


def test_vlm_train_refuses_missing_inputs_before_launching(tmp_path, capsys):
    from vlm.cli import main

    path = _write(
        tmp_path,
        f"stage: 1\nmodel: {tmp_path}/runs/mlp/stage1/final\noutput_dir: o\ndata: [{tmp_path}/d.jsonl]\n",
    )
    assert main(["train", str(path)]) != 0
    assert "data[0].path: data file not found" in capsys.readouterr().err


@pytest.mark.parametrize("tune", ["full", "lora"])
def test_connector_lr_reaches_the_optimizer_groups(tmp_path, tune):
    from vlm.build import build_base_model
    from vlm.train.freeze import param_groups

    model, _ = build_base_model("clip", "llama", "mlp")
    text = (
        BASE.replace("stage: 1", "stage: 2")
        + f"tune: {tune}\nlr: 1e-3\nconnector_lr: 2e-5\nlora: {{r: 8, alpha: 16}}\n"
    )
    model = apply_freeze_policy(model, load_recipe(_write(tmp_path, text)))
    groups = param_groups(model, load_recipe(_write(tmp_path, text)))
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr: dict[float, set[str]] = {}
    for group in groups:
        by_lr.setdefault(group["lr"], set()).update(names[id(p)] for p in group["params"])
    assert set(by_lr) == {1e-3, 2e-5}
    assert by_lr[2e-5] and all("connector." in n for n in by_lr[2e-5])
    assert by_lr[1e-3] and all("language_model." in n for n in by_lr[1e-3])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert by_lr[2e-5] | by_lr[1e-3] == trainable and not by_lr[2e-5] & by_lr[1e-3]


def test_gradient_clipping_reaches_the_deepspeed_config(tmp_path):
    from vlm.train.loop import deepspeed_config

    for clip in (0.0, 0.5):
        recipe = load_recipe(
            _write(tmp_path, BASE + f"gradient_clipping: {clip}\ndeepspeed: stages/zero3.json\n")
        )
        assert deepspeed_config(recipe, 1, False)["gradient_clipping"] == clip


def test_cpu_ranks_get_a_fixed_mmap_threshold_unless_the_user_set_one(monkeypatch):
    import vlm.train.launch as launch

    monkeypatch.setattr(launch, "_has_cuda", lambda: False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert launch.launch_env(2)["MALLOC_MMAP_THRESHOLD_"] == str(1 << 20)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4096")
    assert launch.launch_env(2)["MALLOC_MMAP_THRESHOLD_"] == "4096"
    monkeypatch.setattr(launch, "_has_cuda", lambda: True)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert "MALLOC_MMAP_THRESHOLD_" not in launch.launch_env(1)
