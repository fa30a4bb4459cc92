"""vLLM's caches stay correct with images: prefix caching, the multimodal processor cache and chunked prefill, all
on in one engine (as in serve/cpu.yaml), against transformers' greedy `generate()` for every request.

- The same shared system prompt and question with different images: each answer is transformers' answer for its
  own image, while the prefix cache is hit (the system prompt's blocks), so no image's KV was taken for another's.
- The same image twice: the same answer, with a hit in the multimodal processor cache and the prefix cache.
- The first request runs on a fresh engine whose token budget per step ends inside the image's 16 placeholder
  tokens, so its prefill is split there; its answer is transformers' unchunked one.
"""

from __future__ import annotations

import gc

import pytest
import torch
from vllm_helpers import noise_image, tiny_checkpoint

from vlm.vllm_env import set_engine_env

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_TOKENS = 16
BLOCK = 32  # KV block size: the prefix cache shares whole blocks only
SYSTEM = (
    "you are a careful assistant. you look at the picture and answer questions about the shapes in it, "
    "their colours, where they are and how many there are, in a few words. "
) * 2
QUESTION = "what colour is the shape, and where is it in the picture? answer in a few words please."
SHARED = [10, 11, 12, 13]  # image seeds sent with the same text
SPLIT = 20  # the first request: its own image


def messages(question: str = QUESTION) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
    ]


@pytest.fixture(scope="module")
def reference():
    """transformers' greedy tokens for each image seed, the prompt, and where its image tokens start."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vlm  # noqa: F401  (registers the Auto classes)

    ckpt = str(tiny_checkpoint("clip", "llama", "mlp"))
    processor = AutoProcessor.from_pretrained(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    prompt = processor.apply_chat_template(messages(), add_generation_prompt=True)
    tokens, image_start, length = {}, None, None
    for seed in [SPLIT, *SHARED]:
        batch = processor(text=[prompt], images=[noise_image(seed)], return_tensors="pt")
        ids = batch["input_ids"][0].tolist()
        positions = [i for i, t in enumerate(ids) if t == model.config.image_token_index]
        image_start, length = positions[0], len(ids)
        assert positions == list(range(image_start, image_start + 16))
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=MAX_TOKENS, do_sample=False)
        tokens[seed] = out[0, len(ids) :].tolist()
    return {"ckpt": ckpt, "prompt": prompt, "tokens": tokens, "image_start": image_start, "length": length}


def counters(llm) -> dict[str, float]:
    return {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}


@pytest.fixture(scope="module")
def served(reference):
    """Every request, in order, on one engine with all the caches on; answers and cache counters per step."""
    from vllm import LLM, SamplingParams

    budget = reference["image_start"] + 8  # the first prefill chunk ends in the middle of the image
    set_engine_env()
    llm = LLM(
        model=reference["ckpt"],
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        seed=0,
        limit_mm_per_prompt={"image": 1},
        block_size=BLOCK,
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=budget,
        max_num_seqs=4,
        mm_processor_cache_gb=1,
        disable_log_stats=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    steps = []
    try:
        for seed in [SPLIT, *SHARED, SHARED[0]]:  # one at a time: each finds the previous ones cached
            request = {"prompt": reference["prompt"], "multi_modal_data": {"image": noise_image(seed)}}
            before = counters(llm)
            output = llm.generate([request], params, use_tqdm=False)[0]
            after = counters(llm)
            delta = {k: after[k] - before.get(k, 0) for k in after}
            steps.append((seed, list(output.outputs[0].token_ids), delta))
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return {"budget": budget, "steps": steps}


def test_a_prefill_split_inside_the_image_gives_the_unchunked_answer(reference, served):
    start, budget = reference["image_start"], served["budget"]
    assert start < budget < start + 16 < reference["length"]  # the first chunk ends inside the image
    seed, tokens, delta = served["steps"][0]
    assert delta["vllm:prefix_cache_hits"] == 0  # a fresh engine: the whole prompt was prefilled, in chunks
    assert tokens == reference["tokens"][seed]


def test_different_images_with_the_same_text_never_share_kv(reference, served):
    shared = served["steps"][1 : 1 + len(SHARED)]
    for seed, tokens, _ in shared:
        assert tokens == reference["tokens"][seed], f"image {seed}"
    # The test has teeth: the images change the answer, and the system prompt's blocks did come from the cache.
    assert len({tuple(t) for _, t, _ in shared}) > 1
    whole_blocks_before_image = reference["image_start"] // BLOCK * BLOCK
    assert whole_blocks_before_image >= BLOCK
    for _, _, delta in shared:
        assert delta["vllm:prefix_cache_hits"] == whole_blocks_before_image


def test_the_same_image_twice_gives_the_same_answer_from_the_caches(reference, served):
    seed, first, first_delta = served["steps"][1]
    again_seed, again, delta = served["steps"][-1]
    assert again_seed == seed and again == first == reference["tokens"][seed]
    assert first_delta["vllm:mm_cache_hits"] == 0 and delta["vllm:mm_cache_hits"] == 1
    # Every whole block of the prompt, image included, came from the prefix cache.
    assert delta["vllm:prefix_cache_hits"] == (reference["length"] - 1) // BLOCK * BLOCK
