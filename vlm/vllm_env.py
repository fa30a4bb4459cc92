"""The environment every vLLM engine start here relies on (`vlm serve`, `vlm caption`, `vlm eval`, benches).

It lives at the bottom of the package because serving and evaluation both start engines and must not import each
other; the vLLM plugin itself is vlm/serve/engine/.
"""

from __future__ import annotations

import logging
import os

# vLLM's CPU backend reserves this many GiB of KV cache; unset it takes most of the machine's RAM.
DEFAULT_CPU_KVCACHE_GIB = "1"


def set_engine_env(verbose: bool = False) -> None:
    """Environment every offline engine start here (`vlm caption`, `vlm eval`) relies on; a user's setting wins.

    Not verbose, vLLM logs warnings only: its hundred-odd INFO lines per start buried the command's own output.
    Its logs go to stderr either way, so stdout holds only results (the eval tables). Call before importing
    vllm: it reads these variables at import and in every engine process it starts.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if "VLLM_LOGGING_LEVEL" in os.environ:
        # Until the engine configures vLLM's loggers (at LLM()), their records reach our root handler.
        logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())


def engine_dtype(requested: str) -> str:
    """The dtype to give vLLM: `auto` means float32 on a CPU without native bf16 (no AVX512-BF16 or AMX).

    vLLM's `auto` turns a float32 checkpoint into bfloat16 on its CPU backend, and on an AVX2-only CPU bf16 matmuls
    are emulated: `make real-shapes` measured a Qwen2-0.5B-shaped chat at minutes instead of seconds. With a GPU,
    or a CPU with native bf16, `auto` is left to vLLM.
    """
    if requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available():
        return requested
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return requested if native_bf16 else "float32"
