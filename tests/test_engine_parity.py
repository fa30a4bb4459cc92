"""vLLM (our plugin) against transformers `generate()`: the same greedy tokens, for every connector, on prompts
with one, two and four images (mixed sizes) and none, under the `single` image policy (anyres:
tests/test_anyres_vllm.py).

One engine per checkpoint, shared by all of that checkpoint's prompts; the four checkpoints together cover both
towers (CLIP, SigLIP) and both LLM families (Llama, Qwen2).
"""

from __future__ import annotations

import pytest
from vllm_helpers import hf_greedy, noise_image, tiny_checkpoint, vllm_greedy

from vlm.vllm_env import set_engine_env

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_TOKENS = 16
CHECKPOINTS = {  # connector -> (tower, llm)
    "linear": ("clip", "llama"),
    "mlp": ("siglip", "qwen2"),
    "qformer": ("siglip", "llama"),
    "perceiver": ("clip", "qwen2"),
}
QUESTIONS = [
    "what colour is the shape?",
    "how many shapes are there?",
    "where is the circle?",
    "describe it.",
]


SIZE = (40, 36)  # noise_image's default
MIXED = [(40, 36), (64, 64), (30, 50), (96, 32)]  # the single policy resizes each to the tower's size


def _samples():
    """(question, image sizes) pairs: one image each, two images, four of mixed sizes, and text only."""
    return [(q, [SIZE]) for q in QUESTIONS] + [
        ("compare the two pictures.", [SIZE, SIZE]),
        ("which picture is the odd one out?", MIXED),
        ("say something.", []),
    ]


@pytest.mark.parametrize("connector", list(CHECKPOINTS))
def test_vllm_greedy_matches_transformers(connector):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from vllm import LLM

    import vlm  # noqa: F401  (registers the Auto classes)

    tower, llm_name = CHECKPOINTS[connector]
    ckpt = str(tiny_checkpoint(tower, llm_name, connector))
    processor = AutoProcessor.from_pretrained(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()

    requests, expected, image_seed = [], [], 0
    for question, sizes in _samples():
        n_images = len(sizes)
        images = [noise_image(image_seed + k, size) for k, size in enumerate(sizes)]
        image_seed += n_images
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        batch = processor(text=[prompt], images=images or None, return_tensors="pt")
        expected.append(hf_greedy(model, batch, MAX_TOKENS))
        request = {"prompt": prompt}
        if images:
            request["multi_modal_data"] = {"image": images if n_images > 1 else images[0]}
        requests.append(request)

    set_engine_env()
    llm = LLM(
        model=ckpt,
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        seed=0,
        limit_mm_per_prompt={"image": len(MIXED)},
    )
    # Both sides stop on the checkpoint's generation_config stop tokens (</s>, <|im_end|>).
    outputs = vllm_greedy(llm, requests, MAX_TOKENS)

    for (question, sizes), (tokens, hf_logprobs), output in zip(_samples(), expected, outputs, strict=True):
        n_images = len(sizes)
        got = list(output.outputs[0].token_ids)
        assert got == tokens, f"{connector}: {question!r} with {n_images} image(s): vLLM {got} != HF {tokens}"
        # Same distribution, not only the same argmax: the top-5 log-probs of the first step agree.
        for token_id, logprob in output.outputs[0].logprobs[0].items():
            assert logprob.logprob == pytest.approx(float(hf_logprobs[token_id]), abs=2e-3), (
                connector,
                question,
            )
    # Substantive: the sequences are mostly full length, not cut short by an early stop token.
    assert sum(len(t) for t, _ in expected) >= len(expected) * MAX_TOKENS // 2
    # The image path is live: different pictures with the same question do not all give the same answer.
    single = [tuple(t) for (_, sizes), (t, _) in zip(_samples(), expected, strict=True) if len(sizes) == 1]
    assert len(set(single)) > 1, f"{connector}: outputs ignore the images"
