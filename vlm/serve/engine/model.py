"""`VLMForConditionalGeneration` on vLLM: our tower and connector modules feed vLLM's own decoder.

- The vision tower and connector are the very PyTorch modules training uses (`build_tower`, `build_connector`,
  `select_features`), so every registered tower/connector serves with no second implementation to keep in step.
  They run once per image in `embed_multimodal`; their cost is small next to decoding.
- The decoder is vLLM's registered implementation of the text config's architecture (Llama, Qwen2, ...), built
  with `init_vllm_registered_model`, so the paged KV cache, continuous batching, chunked prefill and prefix
  caching all apply to it.
- Checkpoint names load unchanged (`vision_tower.*`, `connector.*`, `language_model.model.*`,
  `language_model.lm_head.*`); checkpoints from older transformers, which saved the tower as
  `vision_tower.vision_model.*`, lose that level.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from ...config import VLMConfig
from ...connectors import build_connector
from ...constants import IMAGE_TOKEN
from ...model import assemble_images
from ...policies import pool_patches
from ...towers import build_tower, select_features, tower_spec
from .processing import VLMDummyInputsBuilder, VLMMultiModalProcessor, VLMProcessingInfo


def text_architectures(config: VLMConfig) -> list[str]:
    """vLLM architecture names for the decoder: the text config's own, else transformers' causal-LM class."""
    text_config = config.text_config
    if getattr(text_config, "architectures", None):
        return list(text_config.architectures)
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text_config.model_type)
    if name is None:
        raise ValueError(f"no causal-LM architecture is known for text model_type {text_config.model_type!r}")
    return [name]


@MULTIMODAL_REGISTRY.register_processor(
    VLMMultiModalProcessor, info=VLMProcessingInfo, dummy_inputs=VLMDummyInputsBuilder
)
class VLMForConditionalGenerationVLLM(nn.Module, SupportsMultiModal):
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_regex={re.compile(r"^vision_tower\.vision_model\."): "vision_tower."}
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_TOKEN
        raise ValueError(f"only images are supported, got modality {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: VLMConfig = vllm_config.model_config.hf_config
        self.config = config
        self._has_cls = tower_spec(config.vision_config).has_cls_token

        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = build_tower(config.vision_config)
            self.connector = build_connector(
                config.connector_config,
                vision_hidden_size=config.vision_config.hidden_size,
                text_hidden_size=config.text_config.hidden_size,
                num_patches=config.connector_patches,
                image_newline=config.policy.uses_newline,
            )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=text_architectures(config),
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    # -- images ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _image_embeddings(
        self, pixel_values: torch.Tensor, image_sizes=None
    ) -> torch.Tensor | list[torch.Tensor]:
        tower = self.vision_tower
        out = tower(pixel_values.to(tower.dtype), output_hidden_states=True)
        features = select_features(
            out.hidden_states,
            self.config.vision_feature_layer,
            self.config.vision_feature_select_strategy,
            self._has_cls,
        )
        crops = self.connector(pool_patches(features, self.config.image_policy_config.pool))
        return assemble_images(self.config, crops, image_sizes, self.connector.image_newline)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.pop("pixel_values", None)
        image_sizes = kwargs.pop("image_sizes", None)
        if pixel_values is None:
            return []
        tiled = self.config.policy.tiled
        if isinstance(pixel_values, (list, tuple)):
            # A tiled policy's crops are a flat field: runs of crops, one run per image, concatenated.
            pixel_values = torch.cat(list(pixel_values)) if tiled else torch.stack(list(pixel_values))
        if isinstance(image_sizes, (list, tuple)):
            image_sizes = torch.stack([torch.as_tensor(s) for s in image_sizes])
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be (images, channels, height, width), got {tuple(pixel_values.shape)}"
            )
        # single: (images, num_image_tokens, hidden); tiled: one (tokens_i, hidden) per image.
        return self._image_embeddings(pixel_values, image_sizes)

    # -- decoder -----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(
            input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)

    def get_mm_mapping(self) -> MultiModelKeys:
        return MultiModelKeys.from_string_field(
            language_model="language_model", connector="connector", tower_model="vision_tower"
        )
