"""`vlm init` and `vlm tokens`: determinism, size, head_dim, the real-size token budget, clear errors."""

from __future__ import annotations

import hashlib
import json

import pytest

from vlm.budget import budget_rows
from vlm.cli import main


def _digest(directory):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())}


def test_init_is_deterministic_small_and_vllm_ready(tmp_path, capsys):
    args = ["init", "--tower", "siglip", "--llm", "qwen2", "--connector", "qformer"]
    assert main([*args, "--seed", "3", "--out", str(tmp_path / "a")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert main([*args, "--seed", "3", "--out", str(tmp_path / "b")]) == 0
    assert main([*args, "--seed", "4", "--out", str(tmp_path / "c")]) == 0
    a, b, c = (_digest(tmp_path / d) for d in "abc")
    assert a == b, "same seed must give byte-identical checkpoints"
    assert a["model.safetensors"] != c["model.safetensors"]
    assert report["bytes"] < 5_000_000 and report["head_dim"] >= 32
    assert report["image_tokens"] == 32 and report["connector"] == "qformer"


def test_init_takes_a_yaml_preset_and_options(tmp_path):
    out = tmp_path / "ckpt"
    assert (
        main(["init", "--connector", "connectors/mlp.yaml", "--connector-opt", "depth=3", "--out", str(out)])
        == 0
    )
    connector = json.loads((out / "config.json").read_text())["connector"]
    assert connector == {"type": "mlp", "depth": 3, "bias": True, "hidden_act": "gelu", "output_scale": False}


def test_init_rejects_bad_connector_options(tmp_path, capsys):
    assert (
        main(["init", "--connector", "qformer", "--connector-opt", "num_querys=8", "--out", str(tmp_path)])
        == 2
    )
    assert "did you mean 'num_queries'" in capsys.readouterr().err
    assert main(["init", "--connector", "resampler", "--out", str(tmp_path)]) == 2
    assert "unknown connector 'resampler'" in capsys.readouterr().err


def test_token_budget_for_clip_l_336():
    rows = {
        r.connector: r
        for r in budget_rows("clip-vit-l-14-336", "llama-7b", ["linear", "mlp", "qformer", "perceiver"])
    }
    assert {name: r.tokens_per_image for name, r in rows.items()} == {
        "linear": 576,
        "mlp": 576,
        "qformer": 32,
        "perceiver": 64,
    }
    assert rows["mlp"].context == 4096 and rows["mlp"].share == pytest.approx(576 / 4096)


def test_tokens_cli_prints_the_table(capsys):
    assert (
        main(["tokens", "--tower", "siglip-so400m-14-384", "--connector", "mlp,qformer", "--llm", "qwen2-7b"])
        == 0
    )
    out = capsys.readouterr().out
    assert "mlp" in out and " 729 " in out and "qformer" in out and "32,768" in out
