"""vLLM (our plugin) against transformers under the `anyres` image policy: the same prompt ids (so the same
per-image token counts) and the same greedy tokens at five aspect ratios, and with two and with four images of
different shapes in one prompt."""

from __future__ import annotations

import pytest
from vllm_helpers import _ROOT, hf_greedy, noise_image, vllm_greedy

from vlm.vllm_env import set_engine_env

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_TOKENS = 12
# (width, height) at 1:1, 4:3, 3:4, 16:9, 1:3 on the 32 px tiny tower: several grids are chosen.
ASPECTS = [(64, 64), (40, 30), (48, 64), (112, 63), (32, 96)]
CHECKPOINTS = {  # name -> (tower, llm, connector, pool, enforce_eager)
    # Without enforce_eager the CPU worker runs its warm-up pass on the dummy inputs (the largest layout).
    "mlp": ("clip", "llama", "mlp", 1, False),
    "perceiver-pool2": ("siglip", "qwen2", "perceiver", 2, True),
}


def _checkpoint(name: str):
    from vlm.build import build_base_model, save_checkpoint

    tower, llm, connector, pool, _ = CHECKPOINTS[name]
    policy = {"type": "anyres", "pool": pool}
    model, processor = build_base_model(tower, llm, connector, seed=0, image_policy=policy)
    return save_checkpoint(model, processor, _ROOT / f"anyres-{name}")


def _requests():
    """(images, question): one image at each aspect ratio, then two and four of different shapes (so different
    grids and token counts side by side in one prompt)."""
    single = [([noise_image(k, size)], "what colour is the shape?") for k, size in enumerate(ASPECTS)]
    two = [noise_image(7, ASPECTS[4]), noise_image(8, ASPECTS[3])]
    four = [noise_image(9 + k, ASPECTS[a]) for k, a in enumerate((1, 4, 0, 3))]
    return [*single, (two, "compare them."), (four, "which picture is the odd one out?")]


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_vllm_matches_transformers_under_anyres(name):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from vllm import LLM

    ckpt = str(_checkpoint(name))
    processor = AutoProcessor.from_pretrained(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    config = model.config
    assert config.image_policy["type"] == "anyres"

    requests, expected = [], []
    for images, question in _requests():
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        batch = processor(text=[prompt], images=images, return_tensors="pt")
        counts = [config.image_token_count(*im.size) for im in images]
        assert int((batch["input_ids"] == config.image_token_index).sum()) == sum(counts)
        tokens, first_logprobs = hf_greedy(model, batch, MAX_TOKENS)
        expected.append((batch["input_ids"][0].tolist(), tokens, first_logprobs))
        requests.append(
            {"prompt": prompt, "multi_modal_data": {"image": images if len(images) > 1 else images[0]}}
        )

    set_engine_env()
    llm = LLM(
        model=ckpt,
        dtype="float32",
        max_model_len=1536,  # four perceiver images (pool 2): 193 + 259 + 322 + 322 tokens, then the text
        enforce_eager=CHECKPOINTS[name][4],
        seed=0,
        limit_mm_per_prompt={"image": 4},
    )
    outputs = vllm_greedy(llm, requests, MAX_TOKENS)

    for (images, _), (hf_ids, tokens, logprobs), output in zip(_requests(), expected, outputs, strict=True):
        shapes = [im.size for im in images]
        # The same expanded prompt: vLLM's prompt replacement gave each image the count the HF processor did.
        assert list(output.prompt_token_ids) == hf_ids, f"{name} {shapes}: prompt ids differ"
        got = list(output.outputs[0].token_ids)
        assert got == tokens, f"{name} {shapes}: vLLM {got} != HF {tokens}"
        for token_id, logprob in output.outputs[0].logprobs[0].items():
            assert logprob.logprob == pytest.approx(float(logprobs[token_id]), abs=2e-3), (name, shapes)
    assert sum(len(t) for _, t, _ in expected) >= len(expected) * MAX_TOKENS // 2  # not cut short
    answers = {tuple(t) for _, t, _ in expected[: len(ASPECTS)]}
    assert len(answers) > 1, f"{name}: outputs ignore the images"
