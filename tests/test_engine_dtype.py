"""`auto` dtype for vLLM engines: float32 on a CPU without native bf16, where vLLM's auto would emulate bf16."""

import pytest
import torch

from vlm.vllm_env import engine_dtype


@pytest.fixture
def machine(monkeypatch):
    """machine(gpu=..., avx512_bf16=..., amx=...): what torch reports about this machine."""

    def set_machine(gpu: bool = False, avx512_bf16: bool = False, amx: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    return set_machine


def test_explicit_dtype_is_passed_through(machine):
    machine()
    assert engine_dtype("bfloat16") == "bfloat16"
    assert engine_dtype("float32") == "float32"


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        ({}, "float32"),
        ({"avx512_bf16": True}, "auto"),
        ({"amx": True}, "auto"),
        ({"gpu": True}, "auto"),
    ],
)
def test_auto_is_float32_only_on_a_cpu_without_native_bf16(machine, features, expected):
    machine(**features)
    assert engine_dtype("auto") == expected


def test_serve_argv_resolves_auto(machine):
    from vlm.cli import parse_args
    from vlm.serve.server import vllm_server_argv

    machine()
    argv = vllm_server_argv(parse_args(["serve", "ckpt"]), "ckpt")
    assert argv[argv.index("--dtype") + 1] == "float32"
