"""Serving presets (serve/*.yaml): every key is a `vlm serve` option, flags override them, typos are errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm.cli import main, parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_the_cpu_preset_is_exactly_the_flag_defaults():
    plain = vars(parse_args(["serve", "ckpt"]))
    preset = vars(parse_args(["serve", "ckpt", "--config", str(ROOT / "serve/cpu.yaml")]))
    for key in ("func", "preset", "config"):
        plain.pop(key), preset.pop(key)
    assert preset == plain  # `make serve` behaves as before


def test_the_gpu_preset_loads_its_engine_arguments():
    args = parse_args(["serve", "ckpt", "--config", str(ROOT / "serve/gpu.yaml")])
    assert args.dtype == "bfloat16" and "--gpu-memory-utilization=0.90" in args.vllm_args


def test_flags_override_the_preset_wherever_they_stand(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("port: 9000\nmax-images: 2\nvllm_args: ['--max-num-seqs=8']\nenforce_eager: true\n")
    for argv in (
        ["serve", "ckpt", "--port", "8000", "--config", str(preset), "--vllm-arg=--seed=1"],
        ["serve", "--config", str(preset), "ckpt", "--vllm-arg=--seed=1", "--port", "8000"],
    ):
        args = parse_args(argv)
        assert args.port == 8000  # the flag, although it equals the default
        assert args.max_images == 2 and args.enforce_eager is True  # from the preset
        assert args.vllm_args == ["--max-num-seqs=8", "--seed=1"]  # the preset's, then the command line's


@pytest.mark.parametrize(
    "text, message",
    [
        ("max_image: 3\n", "unknown option 'max_image'; did you mean 'max_images'"),
        ("port: eighty\n", "port: invalid literal"),
        ("- a list\n", "expected a mapping"),
        ("vllm_args: --x\n", "vllm_args must be a list of strings"),
        ("port: [1\n", "serving preset"),
    ],
)
def test_a_bad_preset_is_one_line_naming_the_file(tmp_path, capsys, text, message):
    preset = tmp_path / "bad.yaml"
    preset.write_text(text)
    assert main(["serve", "ckpt", "--config", str(preset)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: serving preset {preset}") and message in err, err


def test_a_missing_preset_is_named(tmp_path, capsys):
    assert main(["serve", "ckpt", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_the_presets_turn_the_caches_on(preset):
    from vlm.serve.server import vllm_server_argv

    args = parse_args(["serve", "ckpt", "--config", str(ROOT / f"serve/{preset}.yaml")])
    argv = vllm_server_argv(args, "m")
    assert "--enable-prefix-caching" in argv and "--enable-chunked-prefill" in argv
    assert argv[argv.index("--mm-processor-cache-gb") + 1] == "4.0"
    assert argv[argv.index("--mm-processor-cache-type") + 1] == "shm"


@pytest.mark.vllm
def test_vllm_reads_the_cache_flags_as_meant():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vlm.serve.server import vllm_server_argv

    args = parse_args(
        ["serve", "ckpt", "--no-prefix-caching", "--no-chunked-prefill", "--mm-processor-cache-gb=0"]
    )
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(vllm_server_argv(args, "m"))
    assert parsed.enable_prefix_caching is False and parsed.enable_chunked_prefill is False
    assert parsed.mm_processor_cache_gb == 0
    args = parse_args(["serve", "ckpt"])
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(vllm_server_argv(args, "m"))
    assert parsed.enable_prefix_caching is True and parsed.enable_chunked_prefill is True
    assert parsed.mm_processor_cache_gb == 4
    assert parsed.mm_processor_cache_type == "shm"  # lru's per-process copies drift after a refused request
