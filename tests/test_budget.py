"""`vlm tokens` (vlm/budget.py): tokens per image under each policy from the one count, KV cache and prefill FLOPs
per request from the LLM config, clear errors, and `--measure` timing a real checkpoint."""

from __future__ import annotations

import pytest

from vlm.budget import (
    LLMShape,
    budget_rows,
    measure,
    parse_image_size,
    policy_conflict,
    real_shape_row,
)
from vlm.build import build_base_model, save_checkpoint
from vlm.cli import main
from vlm.config import VLMConfig
from vlm.policies import image_token_count
from vlm.presets import LLM_PRESETS

ANYRES = {"type": "anyres"}


@pytest.fixture(scope="module")
def anyres_checkpoint(tmp_path_factory):
    model, processor = build_base_model("clip", "llama", "mlp", image_policy=ANYRES)
    return save_checkpoint(model, processor, tmp_path_factory.mktemp("budget") / "anyres")


# -- the image size -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, size", [("672x336", (672, 336)), ("336", (336, 336)), (" 64X48 ", (64, 48)), ("1x1", (1, 1))]
)
def test_parse_image_size(text, size):
    assert parse_image_size(text) == size


@pytest.mark.parametrize(
    "text, message",
    [
        ("0x5", r"image size '0x5': width and height must be at least 1 px"),
        ("abc", r"image size 'abc' is not WxH or N"),
        ("64x", r"image size '64x' is not WxH"),
        ("-3x4", r"image size '-3x4' is not WxH"),
        ("2x2x2", r"image size '2x2x2' is not WxH"),
    ],
)
def test_parse_image_size_names_a_bad_value(text, message):
    with pytest.raises(ValueError, match=message):
        parse_image_size(text)


# -- tokens: the one count, the meta-device forward --------------------------------------------------------------
@pytest.mark.parametrize(
    "policy, size",
    [
        (None, (32, 32)),
        (None, (640, 100)),  # single: any size is one crop
        (ANYRES, (64, 64)),
        (ANYRES, (112, 63)),
        ({"type": "anyres", "grids": [[1, 2], [3, 1]]}, (32, 96)),
        ({"type": "anyres", "pool": 2}, (96, 96)),
    ],
)
def test_tokens_per_image_match_image_token_count(policy, size):
    rows = budget_rows("clip", "llama", ["mlp", "qformer"], *size, policy=policy)
    for row in rows:  # budget_rows itself raises when the forward and the count disagree
        config = VLMConfig(
            vision_config={"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8},
            connector={"type": row.connector},
            image_policy=policy,
        )
        expected = image_token_count(policy, *size, 32, row.tokens_per_crop)
        assert row.tokens_per_image == expected
        assert row.crops == config.policy.layout(*size, 32).n_crops
    mlp = rows[0]
    assert mlp.tokens_per_crop == (4 if policy and policy.get("pool") == 2 else 16)


def test_clip_l_336_llama_7b_single_and_anyres():
    (single,) = budget_rows("clip-vit-l-14-336", "llama-7b", ["mlp"])
    assert (single.layout, single.crops, single.tokens_per_image) == ("base", 1, 576)
    (tiled,) = budget_rows("clip-vit-l-14-336", "llama-7b", ["mlp"], 672, 672, ANYRES)
    # LLaVA-NeXT's 2x2 grid plus the base crop, and one newline per row of tiles.
    assert (tiled.layout, tiled.crops, tiled.tokens_per_image) == ("base+2x2", 5, 5 * 576 + 2)
    assert tiled.share == pytest.approx(2882 / 4096)


# -- KV cache and FLOPs -------------------------------------------------------------------------------------------
def test_kv_mib_for_llama_7b_by_hand():
    shape = LLMShape.from_config(LLM_PRESETS["llama-7b"].build_config())
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (32, 32, 128)
    per_token = 2 * 32 * 32 * 128 * 2  # K and V, layers, KV heads, head dim, bf16 bytes
    assert shape.kv_bytes_per_token("bf16") == per_token == 2**19  # 0.5 MiB
    assert shape.kv_bytes_per_token("fp32") == 2 * per_token
    (row,) = budget_rows("clip-vit-l-14-336", "llama-7b", ["mlp"], text_tokens=100)
    assert row.kv_mib == pytest.approx(0.5 * (576 + 100))


def test_kv_uses_gqa_heads_and_head_dim():
    shape = LLMShape.from_config(LLM_PRESETS["qwen2-7b"].build_config())
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (28, 4, 128)  # 3584 / 28 heads
    assert shape.kv_bytes_per_token("bf16") == 2 * 28 * 4 * 128 * 2
    assert LLMShape.from_config(LLM_PRESETS["qwen2-0.5b"].build_config()).kv_bytes_per_token("fp16") == (
        2 * 24 * 2 * 64 * 2
    )


def test_llm_flops_follow_the_formula_and_grow_with_tokens():
    shape = LLMShape.from_config(LLM_PRESETS["llama-7b"].build_config())
    # 32 layers of q, k, v, o (4096^2 each) and gate, up, down (4096 x 11008 each): Llama-7B's 6.48 B.
    assert shape.matmul_params == 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    t = 704
    assert shape.prefill_flops(t) == 2 * shape.matmul_params * t + 2 * 32 * t**2 * 4096 + 2 * 4096 * 32000
    flops = [shape.prefill_flops(t) for t in (1, 64, 576, 2882, 4096)]
    assert flops == sorted(flops) and len(set(flops)) == len(flops)


def test_prefill_flops_grow_with_the_image_tokens():
    grids = {"type": "anyres", "grids": [[1, 1], [1, 2], [2, 2]]}
    sizes = [(32, 32), (64, 32), (64, 64)]  # 2, 3 and 5 crops
    rows = [budget_rows("clip", "llama", ["mlp"], *s, grids)[0] for s in sizes]
    for key in ("tokens_per_image", "tower_flops", "connector_flops", "llm_flops", "prefill_flops", "kv_mib"):
        values = [getattr(r, key) for r in rows]
        assert values == sorted(values) and len(set(values)) == 3, key
    # The tower runs once per crop: its FLOPs scale with the crop count exactly.
    assert [r.crops for r in rows] == [2, 3, 5] and 2 * rows[2].tower_flops == 5 * rows[0].tower_flops
    pooled = budget_rows("clip", "llama", ["mlp"], 64, 64, {**grids, "pool": 2})[0]
    assert pooled.tokens_per_image < rows[2].tokens_per_image and pooled.llm_flops < rows[2].llm_flops


# -- bad input ----------------------------------------------------------------------------------------------------
def test_errors_name_the_value():
    with pytest.raises(ValueError, match=r"image 5x5 px is smaller than one 32 px tile"):
        budget_rows("clip", "llama", ["mlp"], 5, 5, ANYRES)
    with pytest.raises(
        ValueError, match=r"mlp: .* takes 2882 tokens .* 3010 in all, over the LLM's context of 3000"
    ):
        budget_rows("clip-vit-l-14-336", "llama-7b", ["mlp"], 672, 672, ANYRES, context=3000)
    with pytest.raises(ValueError, match=r"dtype 'int8' is not one of bf16, fp16, fp32"):
        budget_rows("clip", "llama", ["mlp"], dtype="int8")
    with pytest.raises(ValueError, match=r"grids\[0\] must be \[rows, cols\]"):
        budget_rows("clip", "llama", ["mlp"], policy={"type": "anyres", "grids": [[0, 2]]})
    with pytest.raises(ValueError, match=r"needs a tower preset .* got 'clip-h'"):
        budget_rows("clip-h", "llama", ["mlp"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--image-size", "0x5"],
            "argument --image-size: image size '0x5': width and height must be at least 1",
        ),
        (["--image-size", "abc"], "argument --image-size: image size 'abc' is not WxH"),
        (["--policy", "anyres", "--grids", "2x2,3"], "argument --grids: --grids: '3' is not ROWSxCOLS"),
        (["--policy", "tiles"], "argument --policy/--image-policy: invalid choice: 'tiles'"),
    ],
)
def test_cli_refuses_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tokens", "--tower", "clip", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--tower", "clip", "--policy", "anyres", "--image-size", "5x5"],
            "image 5x5 px is smaller than one 32",
        ),
        (["--tower", "clip", "--grids", "2x2"], "--grids applies to --image-policy anyres, not 'single'"),
        (["--context", "600", "--connector", "mlp"], "576 tokens (base) and the text 128 more, 704 in all"),
    ],
)
def test_cli_reports_bad_values(argv, message, capsys):
    assert main(["tokens", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_prints_the_anyres_table(capsys):
    argv = ["tokens", "--tower", "clip", "--llm", "llama", "--image-size", "64x64", "--policy", "anyres"]
    assert main([*argv, "--text-tokens", "50"]) == 0
    out = capsys.readouterr().out
    assert "image 64x64 px, policy anyres" in out and "the image + 50 text tokens" in out
    mlp = next(line.split() for line in out.splitlines() if line.startswith("mlp "))
    assert mlp[:5] == ["mlp", "base+2x2", "5", "16", "82"]
    assert float(mlp[6]) == pytest.approx(round((82 + 50) * 1024 / 2**20, 3), rel=1e-2)  # 1 KiB per token


# -- measured -----------------------------------------------------------------------------------------------------
def test_measure_times_a_tiny_anyres_checkpoint(anyres_checkpoint):
    m = measure(
        anyres_checkpoint, 64, 64, text_tokens=40, dtype="fp32", kv_budget_gib=0.001, repeats=2, warmup=1
    )
    assert m.encoder_ms > 0 and m.prefill_ms > 0 and m.repeats == 2
    assert (m.row.layout, m.row.tokens_per_image) == ("base+2x2", 5 * 16 + 2)
    assert m.prompt_tokens == m.row.tokens == 82 + m.row.text_tokens
    assert m.row.text_tokens == 40  # the filler question brings the template's text to the tokens asked for
    per_request = m.row.kv_bytes_per_token * m.prompt_tokens
    assert m.row.kv_bytes_per_token == 2 * 2 * 2 * 64 * 4  # fp32, tiny llama
    assert m.requests_in_budget == int(0.001 * 2**30) // per_request > 0
    assert (m.visual_tokens, m.kv_mib) == (82, per_request / 2**20)
    with pytest.raises(ValueError, match=r"image 8x8 px is smaller than one 32 px tile"):
        measure(anyres_checkpoint, 8, 8)


def test_measure_cli_notes_a_policy_conflict_and_shows_real_shapes(anyres_checkpoint, capsys):
    argv = ["tokens", "--measure", str(anyres_checkpoint), "--image-size", "64x32", "--policy", "single"]
    assert main([*argv, "--repeats", "1", "--kv-budget-gib", "0.5"]) == 0
    captured = capsys.readouterr()
    assert "measuring the checkpoint's" in captured.err and "'type': 'single'" in captured.err
    lines = captured.out.splitlines()
    header = next(line for line in lines if line.startswith("connector"))
    assert "encoder ms" in header and "prefill ms" in header and "fit 0.5 GiB" in header
    assert any(line.startswith("mlp ") and "base+1x2" in line for line in lines)
    assert (
        "clip-vit-l-14-336 + llama-7b" in captured.out
        and "scaled by the tile ratio to 672x336" in captured.out
    )
    assert main(["tokens", "--measure", str(anyres_checkpoint), "--tower", "clip"]) == 2
    assert "--measure reads the tower, LLM, connector and context from the checkpoint; drop --tower" in (
        capsys.readouterr().err
    )


def test_real_shape_row_keeps_the_grid(anyres_checkpoint):
    config = VLMConfig.from_pretrained(anyres_checkpoint)
    row, size = real_shape_row(config, 64, 64, 128, "bf16")
    assert size == (672, 672) and row.layout == "base+2x2" and row.tokens_per_image == 2882
    assert policy_conflict(None, config.image_policy) is None
    assert policy_conflict(ANYRES, config.image_policy) is None  # the defaults filled in are the same policy
