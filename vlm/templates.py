"""Chat template registry. Templates are jinja, rendered by transformers' `apply_chat_template` and saved into
the checkpoint as `chat_template.jinja`.

Every template wraps the assistant's supervised text in `{% generation %}` so training masks labels from the
template's own assistant spans (`return_assistant_tokens_mask=True`), never by re-deriving them from strings.
Message content may be a string holding literal `<image>` markers (LLaVA JSON) or a list of OpenAI-style parts
(`{"type": "image"}` / `{"type": "text", "text": ...}`, as vLLM passes them); both render the same `<image>` tokens.

One rule for special tokens, so the ids of training, `vlm eval`, serving and captioning are the same: the chat
template owns them, and rendered text is always tokenized with `add_special_tokens=False` (as transformers'
`apply_chat_template` and vLLM's chat route do). `chat_template_for` leads a template with `bos_token` where the
tokenizer's family expects one (it adds BOS to plain text, as Llama's does; Qwen2's does not).
"""

from __future__ import annotations

import dataclasses

from .constants import IMAGE_TOKEN

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, IM_START, IM_END]


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    stop_tokens: tuple[str, ...]  # tokens that end an assistant turn (generation stops on any)
    description: str


_TEMPLATES: dict[str, ChatTemplate] = {}


def register_template(template: ChatTemplate) -> ChatTemplate:
    if template.name in _TEMPLATES:
        raise ValueError(f"chat template {template.name!r} is already registered")
    _TEMPLATES[template.name] = template
    return template


def get_template(name: str) -> ChatTemplate:
    if name not in _TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; available: {', '.join(available_templates())}")
    return _TEMPLATES[name]


def available_templates() -> list[str]:
    return sorted(_TEMPLATES)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer, left to its defaults, puts BOS before plain text (Llama's do, Qwen2's do not)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def led_by_bos(jinja: str, tokenizer) -> str:
    """`jinja` led by `bos_token` when the tokenizer adds BOS to plain text (see the module docstring)."""
    return "{{- bos_token -}}" + jinja if tokenizer_adds_bos(tokenizer) else jinja


def chat_template_for(name: str, tokenizer) -> str:
    """The registered template's jinja as this tokenizer's checkpoint and training render it."""
    return led_by_bos(get_template(name).jinja, tokenizer)


# Renders one message's content as text: image parts become "<image>\n", text parts their text.
_CONTENT_MACRO = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] in ['image', 'image_url'] -%}{{ '" + IMAGE_TOKEN + "' }}{{ '\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

# Counts images in one message's content, for the plain template which keeps only the images of user turns.
_IMAGE_COUNT_MACRO = (
    "{%- macro image_markers(content) -%}"
    "{%- if content is string -%}{{ '"
    + IMAGE_TOKEN
    + "' * (content.split('"
    + IMAGE_TOKEN
    + "') | length - 1) }}"
    "{%- else -%}{%- for part in content if part['type'] in ['image', 'image_url'] -%}{{ '"
    + IMAGE_TOKEN
    + "' }}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

CHATML = register_template(
    ChatTemplate(
        name="chatml",
        jinja=_CONTENT_MACRO + "{%- for message in messages -%}"
        "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
        "{{ raise_exception('unknown role ' ~ message['role'] ~ '; expected system, user or assistant') }}"
        "{%- endif -%}"
        "{{ '" + IM_START + "' ~ message['role'] ~ '\\n' }}"
        "{%- if message['role'] == 'assistant' -%}"
        "{% generation %}{{ render_content(message['content']) ~ '" + IM_END + "' }}{% endgeneration %}"
        "{%- else -%}{{ render_content(message['content']) ~ '" + IM_END + "' }}{%- endif -%}"
        "{{ '\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '" + IM_START + "assistant\\n' }}{%- endif -%}",
        stop_tokens=(IM_END,),
        description="ChatML turns; instruction tuning (stage 2) and serving",
    )
)

PLAIN = register_template(
    ChatTemplate(
        name="plain",
        jinja=_IMAGE_COUNT_MACRO + "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{ image_markers(message['content']) }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{% generation %}{{ message['content'] ~ '" + EOS_TOKEN + "' }}{% endgeneration %}"
        "{%- endif -%}"
        "{%- endfor -%}",
        stop_tokens=(EOS_TOKEN,),
        description="LLaVA 'plain': images then caption, the instruction dropped; alignment (stage 1)",
    )
)

DEFAULT_CHAT_TEMPLATE = "chatml"
