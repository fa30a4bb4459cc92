"""Chat templates: both content styles render alike, and assistant spans are exactly the supervised tokens."""

from __future__ import annotations

import pytest
from conftest import chat

from vlm.templates import available_templates, get_template


def test_registry():
    assert {"chatml", "plain"} <= set(available_templates())
    with pytest.raises(ValueError, match="unknown chat template 'chatlm'"):
        get_template("chatlm")


def test_string_and_part_content_render_the_same(build):
    _, processor = build("clip", "llama", "mlp")
    as_string = [{"role": "user", "content": "<image>\nwhat colour?"}]
    assert processor.apply_chat_template(as_string, add_generation_prompt=True) == chat(
        processor, "what colour?"
    )
    assert (
        chat(processor, "what colour?")
        == "<|im_start|>user\n<image>\nwhat colour?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "template,expected_text,expected_supervised",
    [
        (
            "chatml",
            "<|im_start|>user\n<image>\nwhat colour?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n",
            "red<|im_end|>",
        ),
        ("plain", "<image>two red circles.</s>", "two red circles.</s>"),
    ],
)
def test_assistant_mask_covers_exactly_the_answer(build, template, expected_text, expected_supervised):
    _, processor = build("clip", "llama", "mlp")
    tokenizer = processor.tokenizer
    answer = "red" if template == "chatml" else "two red circles."
    messages = [
        {"role": "user", "content": "<image>\nwhat colour?"},
        {"role": "assistant", "content": answer},
    ]
    jinja = get_template(template).jinja
    assert tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False) == expected_text
    out = tokenizer.apply_chat_template(
        messages, chat_template=jinja, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    supervised = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tokenizer.decode(supervised) == expected_supervised


def test_unknown_role_is_refused(build):
    _, processor = build("clip", "llama", "mlp")
    with pytest.raises(Exception, match="unknown role narrator"):
        processor.apply_chat_template([{"role": "narrator", "content": "hi"}])
