"""`VLMForConditionalGeneration`: frozen vision tower -> connector -> decoder LLM, as one `PreTrainedModel`.

The embedding merge follows transformers' `modeling_llava.py`: the prompt carries N placeholder ids per image and
the connector's N output vectors replace them in order (row-major over the batch), so batches may mix samples with
and without images, hold several images per sample, and be padded on either side.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import VLMConfig
from .connectors import Connector, build_connector
from .policies import pool_patches
from .supervised_head import SupervisedLMOutput, supervised_head_loss
from .towers import build_tower, select_features, tower_spec


class VLMPreTrainedModel(PreTrainedModel):
    config_class = VLMConfig
    config: VLMConfig
    base_model_prefix = "vlm"  # not an attribute: the whole model is the base model
    input_modalities = ("image", "text")
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # Raw parameters (query tokens, latents, position embeddings) that no generic init rule covers.
        if isinstance(module, Connector) and hasattr(module, "reset_parameters"):
            module.reset_parameters()


class VLMForConditionalGeneration(VLMPreTrainedModel, GenerationMixin):
    # With labels, the LM head runs at supervised positions only (SupervisedLMOutput, no logits); False gives the
    # LLM's own full-logit loss, for benchmarks and parity tests. Without labels the logits are always full.
    supervised_head = True

    def __init__(self, config: VLMConfig):
        super().__init__(config)
        self.vision_tower = build_tower(config.vision_config)
        self.connector: Connector = build_connector(
            config.connector_config,
            vision_hidden_size=config.vision_config.hidden_size,
            text_hidden_size=config.text_config.hidden_size,
            num_patches=config.connector_patches,
            image_newline=config.policy.uses_newline,
        )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self._has_cls = tower_spec(config.vision_config).has_cls_token
        self.freeze_vision_tower()
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info
        model.freeze_vision_tower()  # loading swaps in fresh Parameters, which default to requires_grad=True
        return loaded

    # -- parts -------------------------------------------------------------------------------------------------
    def freeze_vision_tower(self) -> None:
        """The tower is frozen in every stage of this stack (it is trained contrastively, elsewhere)."""
        self.vision_tower.requires_grad_(False)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    # -- images ------------------------------------------------------------------------------------------------
    def get_tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Selected tower hidden states (n_images, P, Dv); no autograd graph while the tower is frozen."""
        tower = self.vision_tower
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())
        with torch.set_grad_enabled(needs_grad):
            out = tower(pixel_values.to(tower.dtype), output_hidden_states=True)
        return select_features(
            out.hidden_states,
            self.config.vision_feature_layer,
            self.config.vision_feature_select_strategy,
            self._has_cls,
        )

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Tower features of crops (n_crops, P, Dv) -> connector outputs (n_crops, N, D_llm), after the image
        policy's pooling."""
        return self.connector(pool_patches(features, self.config.image_policy_config.pool))

    def get_image_features(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """LLM-space embeddings of each image: (n_images, num_image_tokens, D_llm) under the `single` policy; a
        tiled policy gives one (tokens_i, D_llm) per image (`pixel_values` holds all their crops, image_sizes
        (n_images, 2) their (height, width))."""
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be (n_images, channels, height, width) (a tiled policy: its crops), got shape {tuple(pixel_values.shape)}"
            )
        return self.assemble_images(self.project(self.get_tower_features(pixel_values)), image_sizes)

    def assemble_images(
        self, crop_embeds: torch.Tensor, image_sizes: torch.Tensor | None
    ) -> torch.Tensor | list[torch.Tensor]:
        """Per-crop connector outputs -> per-image token sequences, by the layout the policy recomputes from
        each image's size (the layout the processor cut it by)."""
        return assemble_images(self.config, crop_embeds, image_sizes, self.connector.image_newline)

    def merge_image_embeds(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        image_embeds: torch.Tensor | list[torch.Tensor],
    ) -> torch.Tensor:
        """Write image i's embeddings over the i-th run of placeholders (row-major over the batch)."""
        mask = input_ids == self.config.image_token_index
        n_placeholders = int(mask.sum())
        if isinstance(image_embeds, (list, tuple)):
            counts = [int(e.shape[0]) for e in image_embeds]
            if n_placeholders != sum(counts):
                raise ValueError(
                    f"image placeholders and images do not match: the input holds {n_placeholders} placeholder "
                    f"tokens but the {len(counts)} images take {sum(counts)} ({counts}, the image policy's "
                    f"count for each image's size); expand each <image> with VLMProcessor"
                )
            flat = torch.cat(list(image_embeds)).to(inputs_embeds.device, inputs_embeds.dtype)
            return inputs_embeds.masked_scatter(mask.unsqueeze(-1), flat)
        n_images, tokens_per_image = image_embeds.shape[:2]
        if n_placeholders != n_images * tokens_per_image:
            raise ValueError(
                f"image placeholders and images do not match: the input holds {n_placeholders} placeholder "
                f"tokens ({n_placeholders / tokens_per_image:g} images at {tokens_per_image} tokens each) but "
                f"{n_images} images were given; expand each <image> into {tokens_per_image} placeholder ids "
                f"(VLMProcessor does this)"
            )
        image_embeds = image_embeds.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), image_embeds)

    def _image_embeds(
        self,
        pixel_values: torch.Tensor | None,
        image_features: torch.Tensor | None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        # image_features: the tower's selected features (n_images, P, Dv) from a feature cache (a frozen tower),
        # so only the connector runs.
        if image_features is None:
            return self.get_image_features(pixel_values, image_sizes)
        return self.assemble_images(self.project(image_features.to(self.vision_tower.dtype)), image_sizes)

    def _zero_image_term(
        self, pixel_values: torch.Tensor | None, image_features: torch.Tensor | None
    ) -> torch.Tensor:
        """An exact 0 that depends on the tower and connector run on one blank image of the batch's kind.

        Under ZeRO-3 every rank must run the same modules in each step: their parameters are gathered by
        collectives in forward/backward hooks, so a rank whose micro-batch has no image and skips the tower and
        connector would leave the others waiting. The sum of an empty slice is exactly 0 whatever the features
        (unlike 0 x a NaN), and backward still passes through the connector (its gradients are zero), as
        LLaVA's dummy image does. The collators pass an empty (0, ...) tensor for such batches.
        """
        empty = pixel_values if image_features is None else image_features
        blank = torch.zeros((1, *empty.shape[1:]), dtype=empty.dtype, device=empty.device)
        features = (
            self.get_tower_features(blank) if image_features is None else blank.to(self.vision_tower.dtype)
        )
        embeds = self.project(features)
        zero = embeds[:0].sum()
        newline = self.connector.image_newline
        # The newline takes part too, so every trainable connector parameter is in the graph on every rank.
        return zero if newline is None else zero + newline[:0].sum()

    def _check_no_stray_placeholders(self, input_ids: torch.Tensor, past_key_values) -> None:
        # During cached decoding a generated token may equal the placeholder id; only prefill must be clean.
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            return
        n = int((input_ids == self.config.image_token_index).sum())
        if n:
            raise ValueError(
                f"image placeholders and images do not match: the input holds {n} placeholder tokens "
                f"({n / self.config.num_image_tokens:g} images at {self.config.num_image_tokens} tokens each) "
                f"but 0 images were given"
            )

    # -- generation --------------------------------------------------------------------------------------------
    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """transformers' generate, refusing a prompt longer than the LLM's context as vLLM does (the prompt length
        counts the expanded image placeholders; new tokens are not counted, as vLLM does not)."""
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if prompt is not None:
            self.check_input_length(prompt, kwargs.get("attention_mask"))
        return super().generate(inputs, *args, **kwargs)

    def check_input_length(self, prompt: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """The longest row's unpadded length against max_position_embeddings, with vLLM's message."""
        length = int(attention_mask.sum(-1).max()) if attention_mask is not None else prompt.shape[1]
        context = self.config.text_config.max_position_embeddings
        if length > context:
            raise ValueError(f"Input length ({length}) exceeds model's maximum context length ({context}).")

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass pixel_values or image_features (cached tower features), not both")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            images = pixel_values if image_features is None else image_features
            if images is not None and len(images) == 0:
                # An image-kind input with no image (a text-only training batch): see _zero_image_term.
                self._check_no_stray_placeholders(input_ids, past_key_values)
                inputs_embeds = inputs_embeds + self._zero_image_term(pixel_values, image_features)
            elif images is not None:
                inputs_embeds = self.merge_image_embeds(
                    input_ids, inputs_embeds, self._image_embeds(pixel_values, image_features, image_sizes)
                )
            else:
                self._check_no_stray_placeholders(input_ids, past_key_values)
        elif pixel_values is not None or image_features is not None:
            raise ValueError(
                "pixel_values need input_ids to locate the image placeholders, not inputs_embeds"
            )
        if labels is not None and self.supervised_head:
            return self._supervised_forward(
                inputs_embeds, attention_mask, position_ids, past_key_values, labels, use_cache, **kwargs
            )
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _supervised_forward(
        self, inputs_embeds, attention_mask, position_ids, past_key_values, labels, use_cache, **kwargs
    ) -> SupervisedLMOutput:
        """The decoder, then the head at supervised positions only (vlm/supervised_head.py); what the LLM's own
        forward does, less the logits nothing supervises. `logits` is None, `token_losses` per supervised token."""
        # The decoder takes num_items_in_batch too, as the LLM's own forward passes it.
        num_items = kwargs.get("num_items_in_batch")
        out = self.get_decoder()(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        loss, token_losses = supervised_head_loss(
            out.last_hidden_state,
            labels,
            self.get_output_embeddings(),
            num_items,
            getattr(self.config.text_config, "final_logit_softcapping", None),
        )
        return SupervisedLMOutput(
            loss=loss,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            token_losses=token_losses,
        )


def assemble_images(
    config: VLMConfig,
    crop_embeds: torch.Tensor,
    image_sizes: torch.Tensor | None,
    newline: torch.Tensor | None,
) -> torch.Tensor | list[torch.Tensor]:
    """(n_crops, N, D) connector outputs -> (n_images, N, D) under `single`, else one (tokens_i, D) per image,
    laid out by the policy from each image's (height, width). Shared by transformers' model and vLLM's."""
    policy = config.policy
    if not policy.tiled:
        return crop_embeds
    if image_sizes is None:
        raise ValueError(
            f"image_policy {config.image_policy['type']!r} needs image_sizes (n_images, 2), the (height, width) "
            f"of each image, to lay out its crops; VLMProcessor returns them with pixel_values"
        )
    layouts = [policy.layout(int(w), int(h), config.image_size) for h, w in image_sizes.tolist()]
    n_crops = sum(lay.n_crops for lay in layouts)
    if n_crops != crop_embeds.shape[0]:
        raise ValueError(
            f"the {len(layouts)} images' layouts take {n_crops} crops but pixel_values hold {crop_embeds.shape[0]}"
        )
    per_image = torch.split(crop_embeds, [lay.n_crops for lay in layouts])
    return [policy.assemble(crops, lay, newline) for crops, lay in zip(per_image, layouts, strict=True)]
