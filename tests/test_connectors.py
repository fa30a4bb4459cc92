"""Connectors: shapes, token counts, gradients, config parsing, presets, position sensitivity, meta device."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from vlm.connectors import (
    available_connectors,
    build_connector,
    connector_config_from_dict,
    get_connector_class,
)

PRESETS = Path(__file__).resolve().parent.parent / "connectors"
VISION, TEXT = 32, 64  # tiny widths keep the whole file fast
ALL = ["linear", "mlp", "perceiver", "qformer"]


def tiny_config(name, **overrides):
    return connector_config_from_dict({"type": name, **get_connector_class(name).tiny_overrides, **overrides})


def tiny_connector(name, num_patches=16, **overrides):
    torch.manual_seed(0)
    return build_connector(tiny_config(name, **overrides), VISION, TEXT, num_patches)


def test_builtin_connectors_registered():
    assert available_connectors() == ALL


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("num_patches", [16, 10])
def test_output_shape(name, num_patches):
    connector = tiny_connector(name, num_patches)
    out = connector(torch.randn(3, num_patches, VISION))
    expected = type(connector).num_tokens(connector.config, num_patches)
    assert out.shape == (3, expected, TEXT)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name, tokens", [("linear", 576), ("mlp", 576), ("qformer", 32), ("perceiver", 64)])
def test_num_tokens_default_config(name, tokens):
    cls = get_connector_class(name)
    assert cls.num_tokens(cls.config_class(), 576) == tokens
    # Tiny overrides must not change how many tokens an image takes.
    assert cls.num_tokens(tiny_config(name), 576) == tokens


@pytest.mark.parametrize("name", ALL)
def test_backward_reaches_every_parameter(name):
    connector = tiny_connector(name).train()
    out = connector(torch.randn(2, 16, VISION))
    # A random readout, not out.sum(): a sum can be blind to directions a final norm removes.
    (out * torch.randn_like(out)).sum().backward()
    for param_name, param in connector.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), param_name
        # A key bias shifts every score of a query equally, which softmax cancels: its true gradient is 0.
        if not param_name.endswith("key.bias"):
            assert param.grad.abs().sum() > 0, f"{param_name} has an all-zero gradient"


@pytest.mark.parametrize("name", ALL)
def test_eval_deterministic_and_seeded_init(name):
    a, b = tiny_connector(name).eval(), tiny_connector(name).eval()
    for (key, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), f"{key} differs between two builds under the same seed"
    x = torch.randn(2, 16, VISION)
    with torch.no_grad():
        assert torch.equal(a(x), a(x))
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("name", ["qformer", "perceiver"])
def test_learned_queries_are_distinct(name):
    # Identical queries would give identical visual tokens for every image (transformers' own init does that).
    out = tiny_connector(name).eval()(torch.randn(1, 16, VISION))
    assert not torch.allclose(out[0, 0], out[0, 1], atol=1e-4)


@pytest.mark.parametrize(
    "name, typo, suggestion",
    [("linear", "biass", "bias"), ("mlp", "dept", "depth"), ("qformer", "num_querys", "num_queries"),
     ("perceiver", "num_latent", "num_latents")],
)  # fmt: skip
def test_unknown_key_suggests_nearest(name, typo, suggestion):
    with pytest.raises(ValueError, match=rf"unknown key '{typo}'.*did you mean '{suggestion}'"):
        connector_config_from_dict({"type": name, typo: 1})


def test_unknown_connector_lists_available():
    with pytest.raises(ValueError) as info:
        connector_config_from_dict({"type": "qformerr"})
    message = str(info.value)
    assert "'qformerr'" in message and all(name in message for name in ALL)
    assert "did you mean 'qformer'" in message


@pytest.mark.parametrize(
    "name, bad, match",
    [
        ("qformer", {"hidden_size": 100, "num_heads": 3}, "divisible by num_heads"),
        ("qformer", {"num_queries": 0}, "num_queries must be >= 1"),
        ("qformer", {"cross_attention_frequency": 0}, "cross_attention_frequency"),
        ("qformer", {"hidden_act": "nope"}, "hidden_act"),
        ("qformer", {"dropout": 1.0}, "dropout"),
        ("perceiver", {"num_heads": 4, "num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ("perceiver", {"num_latents": 0}, "num_latents must be >= 1"),
        ("perceiver", {"projection_intermediate_size": 0}, "projection_intermediate_size"),
    ],
)
def test_invalid_values_rejected(name, bad, match):
    with pytest.raises(ValueError, match=match):
        connector_config_from_dict({"type": name, **bad})


def test_every_preset_loads_and_round_trips():
    presets = sorted(PRESETS.glob("*.yaml"))
    assert sorted(p.stem for p in presets) == ALL, "one preset per registered connector"
    for path in presets:
        raw = yaml.safe_load(path.read_text())
        assert raw["type"] == path.stem
        config = connector_config_from_dict(raw)
        assert config.to_dict() == raw, (
            f"{path.name} does not round-trip (a key missing, or a YAML type slip)"
        )
        # Full-size defaults, with the values `vlm init` gives new checkpoints (new_checkpoint).
        new = type(config)(**type(config).new_checkpoint)
        assert config == new, f"{path.name} should hold what vlm init builds at full size"
        assert connector_config_from_dict(config.to_dict()) == config


def test_perceiver_position_embedding_makes_it_position_sensitive():
    x = torch.randn(2, 16, VISION)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with_pos = tiny_connector("perceiver").eval()
        assert not torch.allclose(with_pos(x), with_pos(x[:, perm]), atol=1e-4)
        # Control: without the embedding, attention over patches is a set operation and ignores the order.
        without = tiny_connector("perceiver", position_embedding=False).eval()
        assert without.position_embedding is None
        torch.testing.assert_close(without(x), without(x[:, perm]), atol=1e-5, rtol=1e-5)


def test_perceiver_position_embedding_needs_matching_patch_count():
    with pytest.raises(ValueError, match="built for 16 patches"):
        tiny_connector("perceiver", 16)(torch.randn(1, 9, VISION))
    # Without position embeddings any patch count works.
    assert tiny_connector("perceiver", 16, position_embedding=False)(torch.randn(1, 9, VISION)).shape == (
        1,
        64,
        TEXT,
    )


@pytest.mark.parametrize("name", ALL)
def test_meta_device_real_size(name):
    config = get_connector_class(name).config_class()  # full-size defaults
    with torch.device("meta"):
        connector = build_connector(config, vision_hidden_size=1024, text_hidden_size=4096, num_patches=576)
        out = connector(torch.empty(2, 576, 1024))
    assert all(p.is_meta for p in connector.parameters()), "meta construction allocated real weights"
    assert out.is_meta
    assert out.shape == (2, type(connector).num_tokens(config, 576), 4096)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mlp_depth(depth):
    connector = tiny_connector("mlp", depth=depth)
    linears = [m for m in connector.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == depth
    assert connector(torch.randn(2, 7, VISION)).shape == (2, 7, TEXT)


@pytest.mark.parametrize("depth", [0, -1])
def test_mlp_depth_below_one_rejected(depth):
    with pytest.raises(ValueError, match="depth must be >= 1"):
        connector_config_from_dict({"type": "mlp", "depth": depth})


def test_qformer_keeps_blip2_weight_names():
    names = set(tiny_connector("qformer").state_dict())
    for expected in [
        "query_tokens",
        "vision_norm.weight",
        "qformer.layernorm.weight",
        "qformer.encoder.layer.0.attention.attention.query.weight",
        "qformer.encoder.layer.0.crossattention.attention.key.weight",
        "qformer.encoder.layer.0.output_query.dense.weight",
        "language_projection.weight",
    ]:
        assert expected in names, expected
    # cross_attention_frequency=2: layer 1 has no cross-attention.
    assert not any(n.startswith("qformer.encoder.layer.1.crossattention") for n in names)


def test_perceiver_keeps_idefics2_weight_names():
    names = set(tiny_connector("perceiver").state_dict())
    for expected in [
        "modality_projection.gate_proj.weight",
        "position_embedding.weight",
        "perceiver_resampler.latents",
        "perceiver_resampler.layers.0.self_attn.k_proj.weight",
        "perceiver_resampler.layers.1.mlp.down_proj.weight",
        "perceiver_resampler.norm.weight",
    ]:
        assert expected in names, expected


def test_config_dict_has_every_field():
    for name in ALL:
        config = get_connector_class(name).config_class()
        assert set(config.to_dict()) == {"type"} | {f.name for f in dataclasses.fields(config)}


def test_qformer_position_embedding_makes_it_position_sensitive():
    x = torch.randn(2, 16, VISION)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with_pos = tiny_connector("qformer", position_embedding=True).eval()
        assert not torch.allclose(with_pos(x), with_pos(x[:, perm]), atol=1e-4)
        # Control: without it, cross-attention over the patches ignores their order.
        without = tiny_connector("qformer").eval()
        torch.testing.assert_close(without(x), without(x[:, perm]), atol=1e-5, rtol=1e-5)
    # No new weight: the names stay BLIP-2's.
    assert set(with_pos.state_dict()) == set(without.state_dict())


def test_qformer_sincos_2d_encodes_row_and_column():
    from vlm.connectors.qformer import sincos_2d

    table = sincos_2d(4, 4, 16)
    assert table.shape == (16, 16)
    # Patches in the same row share the row half; in the same column, the column half.
    torch.testing.assert_close(table[1, :8], table[2, :8])
    torch.testing.assert_close(table[1, 8:], table[5, 8:])
    assert not torch.allclose(table[1, 8:], table[2, 8:])
    assert len({tuple(row.tolist()) for row in table}) == 16


def test_qformer_position_embedding_needs_a_square_grid():
    with pytest.raises(ValueError, match="square patch grid, got 10"):
        tiny_connector("qformer", 10, position_embedding=True)
    with pytest.raises(ValueError, match="built for 16 patches"):
        tiny_connector("qformer", 16, position_embedding=True)(torch.randn(1, 9, VISION))


def test_old_config_without_new_keys_loads_the_old_way():
    # A config.json written before the keys existed: the dataclass defaults keep its architecture.
    old = connector_config_from_dict({"type": "qformer", **get_connector_class("qformer").tiny_overrides})
    assert old.position_embedding is False and old.output_scale is False
    assert tiny_connector("qformer").log_output_scale is None


@pytest.mark.parametrize("name", ALL)
def test_output_scale_multiplies_the_output_and_learns(name):
    base = tiny_connector(name)
    scaled = tiny_connector(name, output_scale=True)
    scaled.load_state_dict({**base.state_dict(), "log_output_scale": torch.zeros(1)})
    x = torch.randn(2, 16, VISION)
    with torch.no_grad():
        torch.testing.assert_close(scaled(x), base(x))
        scaled.log_output_scale.fill_(torch.log(torch.tensor(0.02)))
        torch.testing.assert_close(scaled(x), 0.02 * base(x))
    (scaled(x) * torch.randn(2, 1, 1)).sum().backward()
    assert scaled.log_output_scale.grad is not None and scaled.log_output_scale.grad != 0


@pytest.mark.parametrize("name", ["qformer", "perceiver"])
def test_calibrate_output_scale_hits_the_target_rms(name):
    connector = tiny_connector(name, output_scale=True)
    x = torch.randn(4, 16, VISION)
    connector.calibrate_output_scale(x, 0.02)
    with torch.no_grad():
        rms = connector(x).pow(2).mean().sqrt()
    assert abs(float(rms) - 0.02) < 1e-5
