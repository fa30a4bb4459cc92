"""The physical limit for bench/serve_realistic.py: this machine's matmul rate and memory bandwidth, a model's
cost per token, and the roofline they give for prefill and decode.

    python bench/roofline.py [CKPT] [--dtype float32]

Measured: square matmuls (fp32 and bf16, torch, all threads) in GFLOP/s, and a large tensor copy in GB/s (bytes
read + written; with all threads and with one). Counted from the checkpoint's config (built on the meta device):
- decode reads every LLM weight once per step (the embedding table only by row; a tied LM head in full) plus
  each sequence's KV cache, and does 2 FLOPs per weight per token: at batch B a step takes at least
  max((weights + B x KV) / bandwidth, B x FLOPs per token / matmul rate);
- prefill is compute-bound: 2 FLOPs per LLM weight per prompt token, plus the tower (2 per weight per patch,
  CLS included) and the connector (2 per weight per patch) per image. Attention's own FLOPs are left out
  (at these context lengths they are a few % of the weight FLOPs), so the bounds are slightly optimistic.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

GB = 1e9


def matmul_gflops(dtype_name: str, seconds: float = 1.0) -> float:
    """Square matmuls of the largest size (512-4096) one of which takes under a tenth of `seconds`: bf16 on a
    CPU without bf16 instructions runs at a few GFLOP/s, where a 2048 matmul alone would take many seconds."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n, rate = 512, None
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up
        sync()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 4 or reps == 0:
            torch.mm(a, b)
            reps += 1
        sync()
        rate = 2 * n**3 * reps / (time.perf_counter() - t0)
        if n >= 4096 or 2 * (2 * n) ** 3 / rate > seconds / 10:
            return rate / 1e9
        n *= 2


def copy_gbps(mib: int = 512, threads: int | None = None, repeats: int = 5) -> float:
    """Bytes read + written per second by a copy of `mib` MiB (best of `repeats`)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        src = torch.ones(mib * 2**20 // 4, device=device)
        dst = torch.empty_like(src)
        best = float("inf")
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return 2 * src.numel() * 4 / best / GB
    finally:
        torch.set_num_threads(before)


def measure_machine() -> dict:
    return {
        "fp32_gflops": matmul_gflops("float32"),
        "bf16_gflops": matmul_gflops("bfloat16"),
        "copy_gbps": copy_gbps(),
        "copy_gbps_1thread": copy_gbps(threads=1),
    }


@dataclass
class ModelCost:
    weight_bytes: float  # read per decode step
    flops_per_token: float  # LLM, per token (prefill or decode)
    flops_per_image: float  # tower + connector
    kv_bytes_per_token: float
    llm_params: int
    tower_params: int
    image_tokens: int


def model_cost(ckpt: str, dtype_name: str) -> ModelCost:
    import torch
    from transformers import AutoConfig

    import vlm  # noqa: F401
    from vlm.build import text_head_dim
    from vlm.model import VLMForConditionalGeneration

    config = AutoConfig.from_pretrained(ckpt)
    with torch.device("meta"):
        model = VLMForConditionalGeneration(config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    llm, tower, connector = count(model.language_model), count(model.vision_tower), count(model.connector)
    embed = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    read = (
        llm - embed + (embed if tied else 0)
    )  # the embedding table is gathered by row; the head is read whole
    text = config.text_config
    size = torch.empty((), dtype=getattr(torch, dtype_name)).element_size()
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    patches = config.num_patches
    return ModelCost(
        weight_bytes=read * size,
        flops_per_token=2 * read,
        flops_per_image=2 * tower * (patches + 1) + 2 * connector * patches,
        kv_bytes_per_token=2 * text.num_hidden_layers * kv_heads * text_head_dim(text) * size,
        llm_params=llm,
        tower_params=tower,
        image_tokens=config.num_image_tokens,
    )


def decode_bound(cost: ModelCost, machine: dict, gflops: float, batch: int, context: float) -> float:
    """Output tokens/s at most, for `batch` sequences of `context` tokens decoding together."""
    memory_s = (cost.weight_bytes + batch * context * cost.kv_bytes_per_token) / (machine["copy_gbps"] * GB)
    compute_s = batch * cost.flops_per_token / (gflops * 1e9)
    return batch / max(memory_s, compute_s)


def prefill_seconds(cost: ModelCost, gflops: float, prompt_tokens: float, images: int = 1) -> float:
    return (cost.flops_per_token * prompt_tokens + cost.flops_per_image * images) / (gflops * 1e9)


def workload_bound(
    cost: ModelCost, machine: dict, gflops: float, prompts: list[int], outputs: list[int], batch: int
) -> float:
    """Output tokens/s at most for the whole workload at this concurrency: every prefill at the compute limit,
    then the output tokens in decode steps of `batch` sequences at the mean context (no overlap assumed)."""
    context = sum(prompts) / len(prompts) + sum(outputs) / len(outputs) / 2
    prefill = sum(prefill_seconds(cost, gflops, p) for p in prompts)
    decode = sum(outputs) / decode_bound(cost, machine, gflops, batch, context)
    return sum(outputs) / (prefill + decode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    machine = measure_machine()
    print(", ".join(f"{k} {v:.1f}" for k, v in machine.items()))
    if args.checkpoint:
        cost = model_cost(args.checkpoint, args.dtype)
        gflops = machine["bf16_gflops" if args.dtype == "bfloat16" else "fp32_gflops"]
        print(cost)
        for batch in (1, 8, 32):
            print(
                f"decode bound at batch {batch}: {decode_bound(cost, machine, gflops, batch, 600):.1f} tok/s"
            )
        print(f"prefill of 600 tokens + 1 image: {prefill_seconds(cost, gflops, 600) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
