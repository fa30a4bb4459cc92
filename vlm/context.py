"""The LLM's context against the visual tokens: is there room for one image and a minimal chat?

Checked where a checkpoint is made (`vlm init`, `vlm import`): an image that does not fit would otherwise surface
only at serving time, where vLLM refuses every image request ("Input length (590) exceeds model's maximum context
length (512)"), or never, as transformers' `generate` runs positions the LLM was not built for.
"""

from __future__ import annotations

from .config import VLMConfig
from .presets import LLM_PRESETS

# The smallest useful exchange: one image, a one-word question and a short answer.
MINIMAL_CHAT = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
]
# Without a chat template (an import that carries none), the question and answer alone.
MINIMAL_TEXT = "What? Yes."


class ContextTooSmall(ValueError):
    """One image and a minimal prompt do not fit the LLM's context."""


def context_length(text_config) -> int:
    return int(text_config.max_position_embeddings)


def minimal_prompt_tokens(processor) -> int:
    """Text tokens around one image in MINIMAL_CHAT as the checkpoint's own template and tokenizer render it."""
    tokenizer = processor.tokenizer
    if processor.chat_template:
        text = processor.apply_chat_template(MINIMAL_CHAT, tokenize=False)
    else:
        text = MINIMAL_TEXT
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return sum(1 for i in ids if i != processor.image_token_id)


def presets_that_fit(needed: int) -> list[str]:
    return [name for name, preset in LLM_PRESETS.items() if context_length(preset.build_config()) >= needed]


def check_context(config: VLMConfig, processor, source: str) -> None:
    """Raise ContextTooSmall, naming both numbers and the LLM presets that fit, when one image and a minimal
    chat (MINIMAL_CHAT) exceed the LLM's max_position_embeddings."""
    # The largest layout the image policy can choose: any image must fit (`single`: num_image_tokens).
    image, prompt = config.max_image_tokens, minimal_prompt_tokens(processor)
    context = context_length(config.text_config)
    if image + prompt <= context:
        return
    fit = presets_that_fit(image + prompt)
    tiled = f", its largest {config.image_policy['type']} layout" if config.policy.tiled else ""
    raise ContextTooSmall(
        f"{source}: one image takes {image} tokens ({config.connector['type']} connector on a "
        f"{config.image_size}px tower{tiled}) and a minimal chat {prompt} more, {image + prompt} in all, but the LLM's "
        f"context (max_position_embeddings) is {context}. LLM presets that fit: {', '.join(fit) or 'none'}; or "
        f"choose a connector with fewer tokens per image (`vlm tokens` lists them)"
    )
