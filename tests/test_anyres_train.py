"""A real stage 1 run (the `deepspeed` launcher, ZeRO-2 on the CPU) under the anyres image policy: the batches
carry each image's crops and image_sizes, the connector and its image_newline train, the tower and LLM do not,
and the final checkpoint keeps the policy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm.build import build_base_model, save_checkpoint
from vlm.data.synth import generate

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
POLICY = {"type": "anyres", "pool": 2, "grids": [[1, 2], [2, 1], [2, 2]]}


def weights(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(path / "model.safetensors").items() if k.startswith(prefix)}


def test_stage1_trains_the_connector_and_newline_under_anyres(tmp_path):
    generate(tmp_path / "data", n=32, seed=0, n_eval=8, progress=False)
    model, processor = build_base_model("clip", "llama", "mlp", seed=0, image_policy=POLICY)
    base = save_checkpoint(model, processor, tmp_path / "base")
    out = tmp_path / "stage1"
    cmd = [
        sys.executable,
        "-m",
        "vlm.cli",
        "train",
        "stages/stage1.yaml",
        f"output_dir={out}",
        f"model={base}",
        f"data=[{tmp_path / 'data' / 'caption_train.jsonl'}]",
        "micro_batch_size=8",
        "global_batch_size=8",
        "log_every=1",
        "max_steps=3",
        "--num-gpus",
        "1",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    final = out / "final"
    assert json.loads((final / "config.json").read_text())["image_policy"] == POLICY
    assert json.loads((final / "processor_config.json").read_text())["image_policy"] == POLICY
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    for frozen in ("vision_tower.", "language_model."):
        before, after = weights(base, frozen), weights(final, frozen)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    before, after = weights(base, "connector."), weights(final, "connector.")
    assert not torch.equal(before["connector.image_newline"], after["connector.image_newline"])
    assert not torch.equal(before["connector.proj.0.weight"], after["connector.proj.0.weight"])
