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


BOS_LEAD = "{{- bos_token -}}"


def led_by_bos(jinja: str, tokenizer) -> str:
    """`jinja` led by `bos_token` when the tokenizer adds BOS to plain text (see the module docstring)."""
    return BOS_LEAD + jinja if tokenizer_adds_bos(tokenizer) else jinja


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

# llava-hf's LLaVA-1.5 layout ("USER: <image>\nq ASSISTANT:"): images first, then text parts, each followed by a
# space; a system turn has no role prefix. Prompts render exactly as llava-hf's template renders them. Answers
# end with the tokenizer's eos, as LLaVA-1.5 trained them (vicuna_v1's "</s>"), where llava-hf's ends them with a
# space, so a model tuned with this template learns to stop. The space after "ASSISTANT:" belongs to the answer:
# the prompt ends at the colon and byte-level BPE folds the space into the answer's first token.
LLAVA = register_template(
    ChatTemplate(
        name="llava",
        jinja="{%- for message in messages -%}"
        "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
        "{{ raise_exception('unknown role ' ~ message['role'] ~ '; expected system, user or assistant') }}"
        "{%- endif -%}"
        "{%- set content = message['content'] -%}"
        "{%- if content is string -%}{%- set text = content -%}"
        "{%- else -%}"
        "{%- set text = namespace(value='') -%}"
        "{%- for part in content if part['type'] in ['image', 'image_url'] -%}"
        "{%- set text.value = text.value ~ '" + IMAGE_TOKEN + "\n' -%}{%- endfor -%}"
        "{%- for part in content if part['type'] == 'text' -%}"
        "{%- set text.value = text.value ~ part['text'] ~ (' ' if message['role'] != 'assistant' else '') -%}"
        "{%- endfor -%}"
        "{%- set text = text.value -%}"
        "{%- endif -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{ 'ASSISTANT:' }}{% generation %}{{ ' ' ~ text ~ eos_token }}{% endgeneration %}"
        "{%- elif message['role'] == 'user' -%}{{ 'USER: ' ~ text }}{{ ' ' if content is string else '' }}"
        "{%- else -%}{{ text }}{{ ' ' if content is string else '' }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}",
        stop_tokens=(),  # the tokenizer's eos, which every generation config stops on
        description="LLaVA-1.5 (llava-hf) USER:/ASSISTANT: turns; imported llava-hf checkpoints",
    )
)

DEFAULT_CHAT_TEMPLATE = "chatml"
AUTO_TEMPLATE = "auto"  # recipes: the registered template the checkpoint's own chat template matches

# Conversations a chat template is compared on: prompts as a server or `vlm eval` renders them (OpenAI-style
# parts, a generation prompt), with one, two and no images and with a system turn.
_PROBES = (
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
    [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}],
        },
    ],
    [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
    [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is it?"}]},
    ],
)


def _render_probes(jinja: str, special_tokens: dict[str, str]) -> list[str] | None:
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(
            conversations=[list(p) for p in _PROBES],
            chat_template=jinja,
            add_generation_prompt=True,
            **special_tokens,
        )
    except Exception:  # noqa: BLE001  a template that cannot render a probe matches no registered one
        return None
    return rendered


def match_template(jinja: str, special_tokens: dict[str, str]) -> ChatTemplate | None:
    """The registered template that renders every probe prompt exactly as `jinja` does, if one does."""
    if not jinja:
        return None
    forms = [(t, form) for t in _TEMPLATES.values() for form in (t.jinja, BOS_LEAD + t.jinja)]
    for template, form in forms:
        if form == jinja:
            return template
    theirs = _render_probes(jinja, special_tokens)
    if theirs is None:
        return None
    for template, form in forms:
        if _render_probes(form, special_tokens) == theirs:
            return template
    return None


def resolve_template(name: str, checkpoint_jinja: str | None) -> str:
    """A recipe's template name; "auto" becomes the registered template the checkpoint's chat template is."""
    if name != AUTO_TEMPLATE:
        get_template(name)
        return name
    for template in _TEMPLATES.values():  # a checkpoint's template is led by BOS where its tokenizer adds one
        if template.jinja == (checkpoint_jinja or "").removeprefix(BOS_LEAD):
            return template.name
    raise ValueError(
        "template: auto needs the checkpoint's chat_template.jinja to be a registered template "
        f"({', '.join(available_templates())}), and it is not (it was carried over verbatim, e.g. by "
        "`vlm import`); set template=NAME to train with a registered one"
    )
