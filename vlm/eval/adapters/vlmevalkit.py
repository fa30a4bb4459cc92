"""VLMEvalKit model: our checkpoints behind VLMEvalKit's `BaseModel` interface.

VLMEvalKit (not on PyPI) calls `model.generate(message, dataset)`; its `BaseModel.generate` normalises the message
to a list of `{"type": "image" | "text", "value": ...}` dicts (image values are file paths) and calls
`generate_inner(message, dataset)`, which returns the answer string. Register it in a VLMEvalKit checkout's
`vlmeval/config.py` (see vlm/eval/README.md):

    from functools import partial
    from vlm.eval.adapters.vlmevalkit import VLMEvalKitModel
    supported_VLM["vlm-mlp"] = partial(VLMEvalKitModel, model_path="runs/mlp/stage2/final")

Outside a VLMEvalKit install, a minimal stand-in base with the same `generate` contract is used, so the adapter
imports and can be tested without it.
"""

from __future__ import annotations

from typing import Any

from ..engines import make_engine

try:  # the real base class when VLMEvalKit is installed
    from vlmeval.vlm.base import BaseModel
except ImportError:

    class BaseModel:  # the part of vlmeval.vlm.base.BaseModel's contract the adapter relies on
        INTERLEAVE = False
        allowed_types = ["text", "image"]

        def use_custom_prompt(self, dataset):
            return False

        def generate(self, message, dataset=None):
            if isinstance(message, str):
                message = [{"type": "text", "value": message}]
            for item in message:
                assert item["type"] in self.allowed_types, f"Invalid input type: {item['type']}"
            return self.generate_inner(message, dataset)


class VLMEvalKitModel(BaseModel):
    INTERLEAVE = True  # images and text are placed in the order the message gives them

    def __init__(
        self,
        model_path: str,
        engine: str = "hf",
        max_new_tokens: int = 64,
        dtype: str = "auto",
        **kwargs: Any,
    ):
        super().__init__()
        self.max_new_tokens = max_new_tokens
        self.engine = make_engine(engine, model_path, dtype=dtype, **kwargs)

    @staticmethod
    def to_request(message: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
        """VLMEvalKit message -> (image paths, one user chat message with parts in the message's order)."""
        images, parts = [], []
        for item in message:
            if item["type"] == "image":
                images.append(item["value"])
                parts.append({"type": "image"})
            elif item["type"] == "text":
                parts.append({"type": "text", "text": item["value"]})
            else:
                raise ValueError(f"unsupported message item type {item['type']!r} (image and text only)")
        return images, [{"role": "user", "content": parts}]

    def generate_inner(self, message: list[dict[str, Any]], dataset: str | None = None) -> str:
        return self.engine.generate([self.to_request(message)], max_new_tokens=self.max_new_tokens)[0]

    def batch_generate(self, messages: list[list[dict[str, Any]]], dataset: str | None = None) -> list[str]:
        """Several messages in one engine call (VLMEvalKit itself calls generate per sample)."""
        return self.engine.generate(
            [self.to_request(m) for m in messages], max_new_tokens=self.max_new_tokens
        )
