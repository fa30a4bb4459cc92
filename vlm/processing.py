"""`VLMProcessor`: image processor + tokenizer + chat template; expands each `<image>` into N placeholder ids."""

from __future__ import annotations

from transformers import ProcessorMixin
from transformers.image_utils import make_flat_list_of_images
from transformers.processing_utils import ProcessingKwargs

from .constants import IMAGE_TOKEN


class VLMProcessorKwargs(ProcessingKwargs, total=False):
    # Text reaching the processor is rendered by the chat template, which owns BOS (vlm/templates.py): the
    # tokenizer must not add its own, or a Llama-family prompt would start with two.
    _defaults = {"text_kwargs": {"add_special_tokens": False}}


class VLMProcessor(ProcessorMixin):
    """Turns (text with `<image>` markers, images) into `input_ids`, `attention_mask` and `pixel_values`.

    `num_image_tokens` is the connector's visual token count (patches for linear/mlp, queries for qformer, latents
    for perceiver); it is saved in `processor_config.json` so a checkpoint describes its own prompt layout.
    Text is tokenized with `add_special_tokens=False` unless the caller asks otherwise (see VLMProcessorKwargs).
    """

    valid_processor_kwargs = VLMProcessorKwargs

    def __init__(
        self, image_processor=None, tokenizer=None, num_image_tokens: int = 1, chat_template=None, **kwargs
    ):
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        self.num_image_tokens = num_image_tokens
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {self.image_token!r} token; add it as a special token")
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

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
