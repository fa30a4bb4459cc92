"""Real-size stage 1 training throughput on one GPU: CLIP ViT-L/14-336 + a 7B-class Llama (random init, bf16).

    python bench/gpu_train.py                 # on a GPU: samples/s, tokens/s, TFLOP/s, MFU, peak memory
    python bench/gpu_train.py --tiny          # the tiny presets, on the CPU too (checks the script runs)

Needs torch + transformers (+ this package); no DeepSpeed, vLLM or flash-attn. One process, one device, the
stage 1 freeze (only the connector learns; the frozen LLM still runs forward and the input-gradient backward).
Measured side by side in one run, each after warm-up steps, with the peak memory of each:
- padded batches, the tower running on pixels every step (the baseline);
- padded batches from cached tower features (what `feature_cache` gives from the 2nd epoch);
- packed rows (block-diagonal attention; `flex_attention` reads the sample boundaries from position_ids) from
  cached features.
MFU uses vlm.train.flops (model FLOPs; peak dense bf16 from its table, by device name).
Samples are synthetic: one image (576 placeholders) + lognormal caption text (median 48 tokens), like LLaVA's
558K stage 1 captions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch


def build_model(tiny: bool, attn: str, dtype: torch.dtype, device: torch.device):
    from vlm.config import VLMConfig
    from vlm.model import VLMForConditionalGeneration
    from vlm.presets import LLM_PRESETS, TOWER_PRESETS

    tower, llm = ("clip", "llama") if tiny else ("clip-vit-l-14-336", "llama-7b")
    text = LLM_PRESETS[llm].build_config()
    if tiny:
        text.vocab_size = 512
    config = VLMConfig(
        vision_config=TOWER_PRESETS[tower].build_config(),
        text_config=text,
        connector={"type": "mlp"},
        image_token_index=text.vocab_size - 1,
    )
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    with torch.device(device):
        model = VLMForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    model.requires_grad_(False)
    model.connector.requires_grad_(True)  # stage 1
    return model.train()


def make_samples(model, n: int, seed: int) -> list[dict]:
    """Token ids: BOS, 576 image placeholders, caption text (supervised)."""
    rng = np.random.default_rng(seed)
    config = model.config
    image_id, vocab = config.image_token_index, config.text_config.vocab_size
    size = config.vision_config.image_size
    samples = []
    for text_len in np.clip(rng.lognormal(np.log(48), 0.5, n).astype(int), 8, 256):
        text = torch.from_numpy(rng.integers(2, vocab - 1, text_len))
        ids = torch.cat([torch.tensor([1]), torch.full((config.num_image_tokens,), image_id), text])
        labels = torch.cat([torch.full((1 + config.num_image_tokens,), -100), text])
        pixels = torch.from_numpy(rng.standard_normal((1, 3, size, size), dtype=np.float32))
        samples.append({"id": len(samples), "input_ids": ids, "labels": labels, "pixel_values": pixels})
    return samples


def with_features(model, samples: list[dict], device, dtype) -> list[dict]:
    """The feature cache's view of the samples: tower features instead of pixels (computed once here)."""
    out = []
    with torch.no_grad():
        for s in samples:
            features = model.get_tower_features(s["pixel_values"].to(device, dtype)).cpu()
            out.append({k: v for k, v in s.items() if k != "pixel_values"} | {"image_features": features})
    return out


def batches(
    samples: list[dict], micro: int, pack: bool, max_length: int, pad_id: int, attn: str
) -> list[dict]:
    from vlm.data.collate import Collator, PackingCollator

    # flex_attention builds its block mask from the position_ids resets; SDPA takes the boolean 4D mask.
    mask = "none" if attn == "flex_attention" else "bool"
    # Packed rows padded to max_length: one shape, so a compiled flex_attention kernel is not rebuilt per batch.
    packer = PackingCollator(pad_id, max_length, pad_to_multiple_of=max_length, mask=mask)
    collate = packer if pack else Collator(pad_id)
    return [collate(samples[i : i + micro]) for i in range(0, len(samples) - micro + 1, micro)]


def run_variant(model, data: list[dict], steps: int, warmup: int, device, flop_model, peak) -> dict:
    from vlm.data.collate import model_inputs
    from vlm.train.flops import batch_flops

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, samples, tokens, flops = [], 0, 0, 0
    for i in range(warmup + steps):
        batch = data[i % len(data)]
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}
        _sync(device)
        t0 = time.perf_counter()
        model(**inputs, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            samples += len(batch["ids"])
            tokens += sum(batch["seq_lengths"])
            flops += batch_flops(flop_model, batch)
    total = sum(times)
    result = {
        "step_s": statistics.median(times),
        "samples_per_s": samples / total,
        "tokens_per_s": tokens / total,
        "tflops_per_s": flops / total / 1e12,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    if peak:
        result["mfu"] = flops / total / peak
    return result


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny presets (runs on the CPU)")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=None, help="packed row length (2048; --tiny: 256)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "flex_attention", "eager"])
    parser.add_argument(
        "--packed-attn",
        default=None,
        choices=["sdpa", "flex_attention"],
        help="LLM kernel for packed rows (default: flex_attention on a GPU; sdpa on the CPU: no flex backward)",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from vlm.train.flops import FlopModel, device_peak_flops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    packed_attn = args.packed_attn or ("flex_attention" if device.type == "cuda" else "sdpa")
    peak, why = device_peak_flops(dtype)
    if not peak:
        print(f"MFU omitted: {why}", file=sys.stderr)
    model = build_model(args.tiny, args.attn, dtype, device)
    flop_model = FlopModel.for_model(model, llm_trains=False)
    n = args.micro_batch * (args.steps + args.warmup)
    samples = make_samples(model, n, seed=0)
    cached = with_features(model, samples, device, dtype)
    max_length = max(
        args.max_length or (256 if args.tiny else 2048), max(len(s["input_ids"]) for s in samples)
    )
    results = {}
    variants = (
        ("padded, tower on pixels", samples, False, args.attn),
        ("padded, cached features", cached, False, args.attn),
        ("packed, cached features", cached, True, packed_attn),
    )
    for name, data, pack, attn in variants:
        model.language_model.set_attn_implementation(attn)  # the LLM's kernel; the tower keeps --attn
        data = batches(data, args.micro_batch, pack, max_length, pad_id=0, attn=attn)
        results[name] = run_variant(model, data, args.steps, args.warmup, device, flop_model, peak)
        print(name, json.dumps(results[name]), flush=True)
    base = results["padded, tower on pixels"]["samples_per_s"]
    for name, r in results.items():
        print(
            f"{name:<28} {r['samples_per_s']:8.2f} samples/s  {r['samples_per_s'] / base:5.2f}x", flush=True
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "tiny": args.tiny, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
