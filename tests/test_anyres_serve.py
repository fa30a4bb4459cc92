"""`vlm serve` on an anyres checkpoint: a chat's prompt tokens are the HF processor's count for the image's size,
and an image too small to tile is a 400 naming its size and the tile, not a 500; the server survives it."""

from __future__ import annotations

import pytest
from vllm_helpers import _ROOT, Server, data_url, noise_image, png_bytes

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

openai = pytest.importorskip("openai")

NAME = "anyres-serve"
QUESTION = "what colour is the shape?"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from vlm.build import build_base_model, save_checkpoint

    model, processor = build_base_model("clip", "llama", "mlp", seed=0, image_policy={"type": "anyres"})
    ckpt = save_checkpoint(model, processor, _ROOT / NAME)
    server = Server(NAME, ckpt, ["--enforce-eager"], tmp_path_factory.mktemp("logs"))
    try:
        server.wait_ready()
        yield server, processor
    finally:
        server.stop()


def chat(server, image):
    content = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(image))}}]
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
