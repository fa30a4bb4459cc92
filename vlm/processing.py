"""`VLMProcessor`: image processor + tokenizer + chat template; expands each `<image>` into N placeholder ids."""

from __future__ import annotations

from PIL import Image
from transformers import ProcessorMixin
from transformers.image_transforms import to_pil_image
from transformers.image_utils import make_flat_list_of_images
from transformers.processing_utils import ProcessingKwargs

from .constants import IMAGE_TOKEN
from .policies import (
    get_image_policy,
    image_policy_config_from_dict,
    image_token_count,
    policy_pixels,
    tile_size_of,
)


class VLMProcessorKwargs(ProcessingKwargs, total=False):
    # Text reaching the processor is rendered by the chat template, which owns BOS (vlm/templates.py): the
    # tokenizer must not add its own, or a Llama-family prompt would start with two.
    _defaults = {"text_kwargs": {"add_special_tokens": False}}


class VLMProcessor(ProcessorMixin):
    """Turns (text with `<image>` markers, images) into `input_ids`, `attention_mask` and `pixel_values`.

    `num_image_tokens` is the connector's visual token count for one crop (patches for linear/mlp, after the
    policy's pooling; queries for qformer, latents for perceiver). `image_policy` (vlm/policies) says how an
    image becomes crops: `single` (one, the default and what a config without the key means) or `anyres`
    (a thumbnail plus tiles, so an image's token count depends on its size: `image_token_count`). Both are saved
    in `processor_config.json`, so a checkpoint describes its own prompt layout.
    Text is tokenized with `add_special_tokens=False` unless the caller asks otherwise (see VLMProcessorKwargs).
    """

    valid_processor_kwargs = VLMProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 1,
        chat_template=None,
        image_policy: dict | None = None,
        **kwargs,
    ):
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        self.num_image_tokens = num_image_tokens
        self.image_policy = image_policy_config_from_dict(image_policy).to_dict()
        self._tile_size: int | None = None
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {self.image_token!r} token; add it as a special token")
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @property
    def policy(self):
        return get_image_policy(self.image_policy)

    @property
    def tile_size(self) -> int:
        """The tower's square input (px), from the image processor."""
        if self._tile_size is None:
            self._tile_size = tile_size_of(self.image_processor)
        return self._tile_size

    def image_token_count(self, width: int, height: int) -> int:
        """Placeholder tokens a width x height image takes (vlm.policies.image_token_count)."""
        if not self.policy.tiled:
            return self.num_image_tokens  # the same for every size: no need to probe the tile size
        return image_token_count(self.image_policy, width, height, self.tile_size, self.num_image_tokens)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    def _process_images(self, images, **kwargs):
        """Pixel values and one placeholder run per image; a tiled policy's crops and `image_sizes`."""
        policy = self.policy
        if not policy.tiled:
            return super()._process_images(images, **kwargs)
        flat = [
            im if isinstance(im, Image.Image) else to_pil_image(im) for im in make_flat_list_of_images(images)
        ]
        processed = policy_pixels(policy, self.image_processor, flat, self.tile_size, **kwargs)
        replacements = [self.image_token * self.image_token_count(*im.size) for im in flat]
        return processed, replacements

    def process_images(self, images, **kwargs) -> dict:
        """Pixel values (and, tiled, image_sizes) for a list of PIL images, as `__call__` makes them."""
        return self._process_images(images, **kwargs)[0]

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)
        if text is None:
            return
        texts = [text] if isinstance(text, str) else list(text)
        n_markers = sum(t.count(self.image_token) for t in texts)
        n_images = 0 if images is None else len(make_flat_list_of_images(images))
        if n_markers != n_images:
            raise ValueError(
                f"the text holds {n_markers} {self.image_token} markers but {n_images} images were given; "
                f"put one {self.image_token} where each image goes"
            )
