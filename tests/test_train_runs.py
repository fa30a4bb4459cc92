"""Real training runs through the `deepspeed` launcher on the CPU: ZeRO-2, ZeRO-3, LoRA, the stage 1 -> ZeRO-3
stage 2 connector hand-over, SIGKILL + resume, and 1 vs 2 process data parallelism.

Each run is a few seconds of training on a tiny model; DeepSpeed's shm_comm op builds once per machine (cached).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm.build import build_base_model, save_checkpoint
from vlm.data.synth import generate

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    generate(root / "data", n=96, seed=0, n_eval=50, progress=False)
    model, processor = build_base_model("clip", "llama", "mlp", seed=0)
    save_checkpoint(model, processor, root / "base")
    return root


def _cmd(
    recipe: str, out: Path, ws: Path, *overrides: str, procs: int = 1, resume: bool = False
) -> list[str]:
    data = "caption_train" if "stage1" in recipe else "vqa_train"
    cmd = [
        sys.executable,
        "-m",
        "vlm.cli",
        "train",
        f"stages/{recipe}.yaml",
        f"output_dir={out}",
        f"data=[{ws / 'data' / (data + '.jsonl')}]",
        "micro_batch_size=8",
        "global_batch_size=16",
        "log_every=1",
        *overrides,
        "--num-gpus",
        str(procs),
    ]
    return cmd + (["--resume"] if resume else [])


def train(
    recipe: str, out: Path, ws: Path, *overrides: str, procs: int = 1, resume: bool = False, check=True
):
    result = subprocess.run(
        _cmd(recipe, out, ws, *overrides, procs=procs, resume=resume),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(path / "model.safetensors").items() if k.startswith(prefix)}


def assert_same(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="session")
def stage1(workspace):
    out = workspace / "stage1"
    train("stage1", out, workspace, f"model={workspace / 'base'}", "max_steps=6", "save_every=3")
    return out


def test_stage1_zero2_trains_only_the_connector(workspace, stage1):
    final = stage1 / "final"
    assert (final / "config.json").is_file() and (stage1 / "loss.png").is_file()
    assert (stage1 / "tb").is_dir() and len(losses(stage1)) == 6
    base = workspace / "base"
    assert_same(weights(final, "vision_tower."), weights(base, "vision_tower."))
    assert_same(weights(final, "language_model."), weights(base, "language_model."))
    changed = [
        k
        for k, v in weights(final, "connector.").items()
        if not torch.equal(v, weights(base, "connector.")[k])
    ]
    assert changed, "stage 1 did not change the connector"
    report = json.loads((stage1 / "train_report.json").read_text())
    assert report["steps"] == 6 and report["skipped_samples"] == {}


def test_stage1_connector_loads_into_zero3_stage2(workspace, stage1):
    """LLaVA's "size mismatch torch.Size([0])": the hand-over must work on partitioned ZeRO-3 parameters."""
    out = workspace / "stage2_handover"
    train(
        "stage2",
        out,
        workspace,
        f"model={workspace / 'base'}",
        f"init_connector_from={stage1 / 'final'}",
        "deepspeed=stages/zero3.json",
        "max_steps=1",
        "lr=1e-12",
        "warmup_ratio=0",
    )
    # With lr ~0 the weights after one step are the loaded ones: stage 1's connector, the base LLM.
    assert_same(weights(out / "final", "connector."), weights(stage1 / "final", "connector."), atol=1e-8)
    assert_same(
        weights(out / "final", "language_model."), weights(workspace / "base", "language_model."), atol=1e-8
    )
    # A ZeRO-3 save keeps the model's own weight names (no `vision_tower.vision_model.`, no `LayerNorm.gamma`).
    assert weights(out / "final", "").keys() == weights(workspace / "base", "").keys()


def test_handover_refuses_a_connector_from_another_model(workspace, stage1, tmp_path):
    model, processor = build_base_model("siglip", "llama", "mlp", seed=0)
    save_checkpoint(model, processor, tmp_path / "other")
    result = train(
        "stage2",
        tmp_path / "out",
        workspace,
        f"model={tmp_path / 'other'}",
        f"init_connector_from={stage1 / 'final'}",
        "max_steps=1",
        check=False,
    )
    assert result.returncode != 0
    assert "vision_config differs" in result.stdout + result.stderr


def test_lora_run_merges_into_a_plain_checkpoint(workspace, stage1, tmp_path):
    out = workspace / "lora"
    train(
        "stage2_lora", out, workspace, f"model={stage1 / 'final'}", "max_steps=3", "lora.r=4", "lora.alpha=8"
    )
    assert (out / "adapter" / "adapter_config.json").is_file()
    final = weights(out / "final", "")
    assert not any("lora_" in k for k in final), "the final checkpoint must be merged"
    merged_dir = tmp_path / "merged"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "vlm.cli",
            "export",
            str(out / "adapter"),
            "--merge-lora",
            "--out",
            str(merged_dir),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    assert_same(weights(merged_dir, ""), final)
    assert not torch.equal(
        final["language_model.model.layers.0.self_attn.q_proj.weight"],
        weights(stage1 / "final", "")["language_model.model.layers.0.self_attn.q_proj.weight"],
    )


def test_sigkill_and_resume_reproduces_the_uninterrupted_losses(workspace):
    common = (
        f"model={workspace / 'base'}",
        "micro_batch_size=4",
        "global_batch_size=8",
        "epochs=3",
        "save_every=4",
    )
    reference = workspace / "resume_ref"
    train("stage1", reference, workspace, *common)
    expected = losses(reference)
    assert len(expected) >= 24

    out = workspace / "resume_killed"
    proc = subprocess.Popen(
        _cmd("stage1", out, workspace, *common),
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 11):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert done < len(expected), "the run finished before it could be killed"

    train("stage1", out, workspace, *common, resume=True)
    got = losses(out)
    assert len(got) == len(expected)
    assert got == pytest.approx(expected, rel=0, abs=1e-6)


@pytest.fixture(scope="session")
def one_process(workspace):
    out = workspace / "dp1"
    train(
        "stage2", out, workspace, f"model={workspace / 'base'}", "deepspeed=stages/zero2.json", "max_steps=4"
    )
    return losses(out)


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_processes_match_one(workspace, one_process, zero):
    out = workspace / f"dp2_{zero}"
    train(
        "stage2",
        out,
        workspace,
        f"model={workspace / 'base'}",
        f"deepspeed=stages/{zero}.json",
        "max_steps=4",
        "save_every=2",
        procs=2,
    )
    assert losses(out) == pytest.approx(one_process, rel=0, abs=1e-5)


def test_resume_with_another_process_count_is_refused(workspace):
    out = workspace / "dp2_zero2"
    if not (out / "checkpoints").is_dir():
        train("stage2", out, workspace, f"model={workspace / 'base'}", "max_steps=4", "save_every=2", procs=2)
    result = train(
        "stage2",
        out,
        workspace,
        f"model={workspace / 'base'}",
        "max_steps=6",
        procs=1,
        resume=True,
        check=False,
    )
    assert result.returncode != 0
    assert "written by 2 processes but this run has 1" in result.stdout + result.stderr


def test_divergence_stops_with_step_and_batch_ids(workspace, tmp_path):
    result = train(
        "stage1",
        tmp_path / "diverge",
        workspace,
        f"model={workspace / 'base'}",
        "lr=1e30",
        "max_steps=6",
        "warmup_ratio=0",
        "gradient_clipping=0",
        check=False,
    )
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "loss is not finite at step" in text and "batch ids: train-" in text


def test_packed_training_matches_unpacked(workspace):
    """Packing changes the layout, not the maths: same batches, same per-step losses (fp32, CPU)."""
    common = (f"model={workspace / 'base'}", "max_steps=3", "group_by_length=false", "max_length=256")
    train("stage2", workspace / "packed", workspace, *common, "pack=true")
    train("stage2", workspace / "unpacked", workspace, *common, "pack=false")
    assert losses(workspace / "packed") == pytest.approx(losses(workspace / "unpacked"), rel=0, abs=1e-5)


def test_qlora_run_trains_and_merges_to_full_precision(workspace, stage1):
    pytest.importorskip("bitsandbytes")
    out = workspace / "qlora"
    train(
        "stage2_qlora", out, workspace, f"model={stage1 / 'final'}", "max_steps=2", "lora.r=4", "lora.alpha=8"
    )
    config = json.loads((out / "final" / "config.json").read_text())
    assert "quantization_config" not in config, "the merged checkpoint must be plain full precision"
    final = weights(out / "final", "")
    assert not any("lora_" in k for k in final)
    assert final["language_model.model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
    assert len(losses(out)) == 2


def _text_only_step_loss(base: Path, records: list[dict]) -> float:
    """The first step's loss computed in-process, the text-only sample without any image path."""
    from vlm.data.samples import SupervisedDataset
    from vlm.model import VLMForConditionalGeneration
    from vlm.processing import VLMProcessor

    model = VLMForConditionalGeneration.from_pretrained(base).eval()
    ds = SupervisedDataset(records, VLMProcessor.from_pretrained(base), "chatml")
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            pixels = item["pixel_values"] if len(item["pixel_values"]) else None
            labels = item["labels"][None]
            n = int((labels[:, 1:] != -100).sum())
            loss = model(input_ids=item["input_ids"][None], pixel_values=pixels, labels=labels).loss
            total, tokens = total + float(loss) * n, tokens + n
    return total / tokens


def test_zero3_rank_with_a_text_only_micro_batch_neither_hangs_nor_changes_the_loss(workspace, tmp_path):
    """2 ranks, 1 sample each per step: one rank's micro-batch has an image, the other's has none."""
    image = json.loads((workspace / "data" / "vqa_train.jsonl").read_text().splitlines()[0])
    image["image"] = str(workspace / "data" / image["image"])
    text = {
        "id": "text-only",
        "conversations": [{"from": "human", "value": "Say red."}, {"from": "gpt", "value": "red"}],
    }
    data = tmp_path / "mix.jsonl"
    data.write_text(json.dumps(image) + "\n" + json.dumps(text) + "\n")
    out = tmp_path / "run"
    cmd = _cmd("stage2", out, workspace, f"model={workspace / 'base'}", procs=2)
    cmd[cmd.index("--num-gpus") : cmd.index("--num-gpus")] = [
        f"data=[{data}]",
        "deepspeed=stages/zero3.json",
        "micro_batch_size=1",
        "global_batch_size=2",
        "max_steps=2",
        "save_every=0",
    ]
    # Its own session, so a hang is killed whole (launcher and both ranks) instead of stalling CI.
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"ZeRO-3 with a text-only rank hung (killed after 300 s):\n{log[-3000:]}")
    assert proc.returncode == 0, log[-3000:]
    got = losses(out)
    assert len(got) == 2
    # rank 0 logs which rank had the text-only sample, every step (one sample per rank, two records)
    assert len(re.findall(r"step \d: text-only micro-batches by rank \{[01]: 1\}", log)) == 2, log[-3000:]
    expected = _text_only_step_loss(workspace / "base", [image, text])
    assert got[0] == pytest.approx(expected, rel=0, abs=1e-5)


def _mix_and_eval(ws: Path, every: int) -> list[str]:
    d = ws / "data"
    return [
        f"data=[{{path: {d / 'vqa_train.jsonl'}, weight: 0.6}}, {{path: {d / 'caption_train.jsonl'}, weight: 0.4}}]",
        f"eval={{every: {every}, limit: 6, tasks: {{vqa: {d / 'vqa_eval.jsonl'}, caption: {d / 'caption_eval.jsonl'}, "
        f"pope: {d / 'pope_eval.jsonl'}}}}}",
    ]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_mixed_run_logs_loss_per_source_and_evals_during_training(workspace):
    out = workspace / "mix_eval"
    result = train("stage2", out, workspace, f"model={workspace / 'base'}", "max_steps=5", "log_every=2",
                   *_mix_and_eval(workspace, every=2))  # fmt: skip
    rows = _rows(out)
    seen = {name for r in rows for name in r["source_loss"]}
    assert seen == {"vqa_train", "caption_train"}
    for r in rows:  # the sources' token-weighted losses are the step loss; never more sources than exist
        assert set(r["source_loss_ema"]) <= seen and r["source_loss"]
    assert [r["step"] for r in rows if "eval" in r] == [2, 4, 5]  # every 2 steps, and the last
    scores = rows[1]["eval"]
    assert {"vqa/accuracy", "caption/cider_d", "pope/f1", "pope/yes_ratio"} <= set(scores)
    assert all(0 <= scores[k] <= 1 for k in ("vqa/accuracy", "pope/f1"))
    assert "source loss (EMA): vqa_train" in result.stderr + result.stdout
    report = json.loads((out / "train_report.json").read_text())
    assert report["final_eval"] == rows[-1]["eval"]
    assert (out / "loss.png").is_file() and any((out / "tb").iterdir())


def test_eval_under_zero3_with_two_ranks_does_not_hang(workspace):
    """Every rank runs the eval forward (synced generate) under ZeRO-3; the run finishes within the timeout."""
    out = workspace / "mix_eval_zero3"
    train("stage2", out, workspace, f"model={workspace / 'base'}", "max_steps=2", "deepspeed=stages/zero3.json",
          *_mix_and_eval(workspace, every=1), procs=2)  # fmt: skip
    rows = _rows(out)
    assert [r["step"] for r in rows if "eval" in r] == [1, 2]
    assert {name for r in rows for name in r["source_loss"]} == {"vqa_train", "caption_train"}
