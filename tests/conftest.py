"""Shared fixtures: tiny random-init models built in memory, and synthetic images."""

from __future__ import annotations

import functools
import os
import tempfile

import pytest
import torch
from hypothesis import settings
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# stages/stage1.yaml caches tower features (feature_cache: auto): keep the tests' caches out of ~/.cache.
os.environ.setdefault("VLM_FEATURE_CACHE", tempfile.mkdtemp(prefix="vlm-test-features-"))
os.environ.setdefault("VLM_DATA_CACHE", tempfile.mkdtemp(prefix="vlm-test-encoded-"))  # encoded_index.py
torch.set_num_threads(min(2, torch.get_num_threads()))

# Fuzz suites: `make test` (and CI) replays the same derandomized examples every run, so a red run is a real
# regression, not a new draw; `make fuzz` (HYPOTHESIS_PROFILE=explore) draws fresh ones and keeps failures in
# .hypothesis/ so they replay until fixed.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@functools.cache
def _vllm_import_error() -> str | None:
    try:
        import vllm  # noqa: F401
    except Exception as err:  # noqa: BLE001  any failure to import means the serving stack is broken
        return f"{type(err).__name__}: {err}"
    return None


def pytest_runtest_setup(item):
    """A `vllm` test without an importable vLLM fails: skipping would hide a broken serving stack. Only outside
    CI, and only when asked (VLM_ALLOW_NO_VLLM=1), does it skip; `gpu` tests skip without CUDA."""
    if item.get_closest_marker("vllm") and (error := _vllm_import_error()):
        if os.environ.get("VLM_ALLOW_NO_VLLM") and not os.environ.get("CI"):
            pytest.skip(f"vllm does not import ({error}); VLM_ALLOW_NO_VLLM is set")
        pytest.fail(f"this test needs vLLM (the serve extra) and it does not import: {error}")
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


CONNECTORS = ["linear", "mlp", "qformer", "perceiver"]
TOWERS = ["clip", "siglip"]
LLMS = ["llama", "qwen2"]


@functools.cache
def _build(tower: str, llm: str, connector: str, seed: int = 0):
    from vlm.build import build_base_model

    model, processor = build_base_model(tower, llm, connector, seed=seed)
    return model.eval(), processor


@pytest.fixture(scope="session")
def build():
    """build(tower, llm, connector) -> (model, processor); cached, so tests must not mutate the model's weights."""
    return _build


def solid(colour, size=32):
    return Image.new("RGB", (size, size), colour)


@pytest.fixture(scope="session")
def images():
    return [solid((255, 0, 0)), solid((0, 0, 255), 48), solid((0, 200, 0), 64)]


def chat(processor, question: str, n_images: int = 1) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
