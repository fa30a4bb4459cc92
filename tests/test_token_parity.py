"""Training and serving see the same prompt ids: the training encoder, `vlm eval --engine hf`, batch captioning's
prompt and the vLLM plugin, for a tokenizer that adds BOS (Llama-style) and one that does not (Qwen2-style).

The rule (vlm/templates.py): the chat template owns special tokens and text is tokenized without adding any.
"""

from __future__ import annotations

import gc

import pytest
from vllm_helpers import bos_style_checkpoint, noise_image

from vlm.data.samples import encode_conversation
from vlm.eval.engines import HFEngine
from vlm.serve.caption import caption_prompt
from vlm.templates import resolve_template, tokenizer_adds_bos

STYLES = ["llama", "qwen2"]
QUESTION = "what colour is the shape?"


def _training_prompt(processor, image_path: str) -> list[int]:
    """The training ids before the first supervised token: the generation prompt, as training saw it."""
    record = {
        "id": "parity",
        "images": [image_path],
        "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"},
            {"from": "gpt", "value": "red"},
        ],
    }
    sample = encode_conversation(record, processor, "chatml", max_length=None)
    first = next(i for i, label in enumerate(sample.labels) if label != -100)
    return sample.input_ids[:first]


@pytest.fixture(scope="module", params=STYLES)
def parity(request, tmp_path_factory):
    ckpt = bos_style_checkpoint(request.param)
    image = tmp_path_factory.mktemp("img") / "shape.png"
    noise_image(0).save(image)
    engine = HFEngine(ckpt, batch_size=1)
    rendered = engine.render(([str(image)], QUESTION))
    ids = engine.inputs([rendered])["input_ids"][0].tolist()
    return request.param, ckpt, engine.processor, str(image), rendered, ids


def test_training_and_hf_eval_prompt_ids_are_identical(parity):
    style, ckpt, processor, image, (_, text), eval_ids = parity
    tok = processor.tokenizer
    # The loaded tokenizer kept its family's BOS behaviour through `vlm init --llm PATH` and the checkpoint.
    assert tokenizer_adds_bos(tok) == (style == "llama")
    assert _training_prompt(processor, image) == eval_ids
    assert eval_ids.count(tok.bos_token_id) == (1 if style == "llama" else 0)
    assert (eval_ids[0] == tok.bos_token_id) == (style == "llama")
    assert eval_ids.count(processor.image_token_id) == processor.num_image_tokens
    # `template: auto` recognises the checkpoint's template, BOS-led or not.
    assert resolve_template("auto", processor.chat_template) == "chatml"
    # Batch captioning renders its prompt the same way (vLLM then tokenizes it: the test below).
    assert caption_prompt(ckpt, QUESTION) == text


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_prompt_ids_equal_training_ids(parity):
    from vllm import LLM, SamplingParams

    from vlm.vllm_env import set_engine_env

    style, ckpt, _, image, (images, text), eval_ids = parity
    set_engine_env()
    llm = LLM(model=str(ckpt), dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=1)
        (out,) = llm.generate(
            [{"prompt": text, "multi_modal_data": {"image": images[0]}}], params, use_tqdm=False
        )
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    assert list(out.prompt_token_ids) == eval_ids, style
