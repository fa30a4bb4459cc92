"""`auto` dtype for vLLM engines: float32 on a CPU without native bf16, where vLLM's auto would emulate bf16."""

import torch

from vlm.vllm_env import engine_dtype


def test_explicit_dtype_is_passed_through():
    assert engine_dtype("bfloat16") == "bfloat16"
    assert engine_dtype("float32") == "float32"


def test_auto_is_float32_without_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert engine_dtype("auto") == "float32"


def test_auto_is_left_to_vllm_with_native_bf16_or_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert engine_dtype("auto") == "auto"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine_dtype("auto") == "auto"


def test_serve_argv_resolves_auto(monkeypatch):
    from vlm.cli import parse_args
    from vlm.serve.server import vllm_server_argv

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    argv = vllm_server_argv(parse_args(["serve", "ckpt"]), "ckpt")
    assert argv[argv.index("--dtype") + 1] == "float32"
