"""Helpers for the serving tests: tiny checkpoints on disk (built once per session), images, free ports."""

from __future__ import annotations

import atexit
import base64
import functools
import io
import re
import shutil
import socket
import tempfile
from pathlib import Path

from PIL import Image

_ROOT = Path(tempfile.mkdtemp(prefix="vlm-serving-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@functools.cache
def tiny_checkpoint(tower: str, llm: str, connector: str, seed: int = 0) -> Path:
    from vlm.build import build_base_model, save_checkpoint

    model, processor = build_base_model(tower, llm, connector, seed=seed)
    return save_checkpoint(model, processor, _ROOT / f"{tower}-{llm}-{connector}")


def noise_image(seed: int, size=(40, 36)) -> Image.Image:
    """Random pixels: distinct images give distinct tower features, unlike solid colours."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# vLLM's own log format: "(EngineCore pid=12) INFO 12-03 08:27:19 [core.py:133] ..." (the prefix is optional).
_VLLM_INFO = re.compile(r"(\([\w-]+ pid=\d+\) )?INFO \d\d-\d\d \d\d:\d\d:\d\d \[")


def vllm_info_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if _VLLM_INFO.match(line)]
