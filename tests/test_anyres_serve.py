"""`vlm serve` on an anyres checkpoint: a chat's prompt tokens are the HF processor's count for the image's size,
and an image too small to tile, more images than the server takes, or tiles that overflow the context are each a
400 naming the count and the limit, not a 500; the server survives them."""

from __future__ import annotations

import pytest
from vllm_helpers import _ROOT, Server, data_url, noise_image, png_bytes

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

openai = pytest.importorskip("openai")

NAME = "anyres-serve"
MAX_MODEL_LEN = 256  # four 64 px images tile to 4 x 82 tokens: over it
QUESTION = "what colour is the shape?"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from vlm.build import build_base_model, save_checkpoint

    model, processor = build_base_model("clip", "llama", "mlp", seed=0, image_policy={"type": "anyres"})
    ckpt = save_checkpoint(model, processor, _ROOT / NAME)
    args = ["--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN)]
    server = Server(NAME, ckpt, args, tmp_path_factory.mktemp("logs"))
    try:
        server.wait_ready()
        yield server, processor
    finally:
        server.stop()


def chat(server, *images):
    content = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(im))}} for im in images]
    content.append({"type": "text", "text": QUESTION})
    return server.client().chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": content}], max_tokens=4, temperature=0.0
    )


@pytest.mark.parametrize("size", [(64, 48), (32, 96), (112, 63)])
def test_prompt_tokens_follow_the_image_size(served, size):
    server, processor = served
    image = noise_image(1, size)
    reply = chat(server, image)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    expected = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
    assert reply.usage.prompt_tokens == expected
    assert processor.image_token_count(*size) > processor.num_image_tokens  # tiled: more than one crop


def test_an_image_too_small_to_tile_is_a_400(served):
    server, _ = served
    with pytest.raises(openai.APIStatusError) as info:
        chat(server, noise_image(2, (20, 16)))
    assert info.value.status_code == 400, info.value.message
    assert "image 20x16 px is smaller than one 32 px tile" in info.value.message
    assert server.healthy()


def test_more_images_than_the_server_takes_is_a_400(served):
    server, _ = served
    with pytest.raises(openai.APIStatusError) as info:
        chat(server, *[noise_image(k, (40, 40)) for k in range(5)])
    assert info.value.status_code == 400, info.value.message
    assert "the request has 5 images; this server accepts at most 4" in info.value.message
    assert server.healthy()


def test_tiles_that_overflow_the_context_are_a_400_naming_the_count_and_the_limit(served):
    server, processor = served
    images = [noise_image(k, (64, 64)) for k in range(4)]
    assert 4 * processor.image_token_count(64, 64) > MAX_MODEL_LEN
    with pytest.raises(openai.APIStatusError) as info:
        chat(server, *images)
    assert info.value.status_code == 400, info.value.message
    assert str(MAX_MODEL_LEN) in info.value.message
    assert server.healthy()
    assert chat(server, images[0]).usage.prompt_tokens < MAX_MODEL_LEN  # one of them still fits
