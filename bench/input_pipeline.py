"""Input-pipeline headroom (issue 18 part 6): images/s the training DataLoader delivers per worker at 336 px,
against the samples/s one H100 consumes at 45% MFU.

    .venv/bin/python bench/input_pipeline.py [--workers 1,2] [--batches 40] [--size 336] [--node-workers 8]
                                             [--images scenes|photos]

Delivery (measured here): `vlm data synth` scenes drawn at --size px (PNG), stage 1 caption records, through
the trainer's own path: SupervisedDataset (decode + CLIP-L/14-336 preprocessing: resize, centre crop, normalise
to 3x336x336) and `vlm.data.loader.micro_batch_loader` (collation in the worker), micro-batches of 16, timed
after the first batch of each worker (start-up excluded). Per-worker rate = loader rate / workers, taken from
the runs where every worker and the training process had a core of their own (`per_worker_rate`).
--images photos swaps the flat-colour PNG scenes for 640x480 JPEG photo stand-ins (gradients, shapes and sensor
noise, quality 90: the size of a COCO / CC3M image), which cost a real decode and a real resize to 336.

Consumption (computed): vlm/train/flops.py's model FLOPs of one sample (576 image tokens + a text length,
forward + backward as the FLOP model counts them) at 45% of the H100 SXM's dense bf16 peak (989 TFLOP/s):
- stage 1: the qwen2-0.5b preset (24 layers, width 896, 14 heads, 2 KV heads, vocab 151,936), frozen LLM and
  tower, mlp connector trained; text 32 tokens (a caption plus the plain template);
- stage 2: the qwen2-7b preset, full fine-tuning (stages/stage2.yaml), text 256 tokens (a LLaVA-665K-like
  multi-turn conversation).
Headroom = per-worker rate x --node-workers (workers a node would give each GPU) / consumption. The worker
count multiplies a rate measured on this box's cores: that assumes a node has a free core per worker.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

PEAK_H100_BF16 = 989e12  # H100 SXM5, dense bf16 (vlm.train.flops.PEAK_BF16_DENSE)
MFU = 0.45
IMAGE_TOKENS = 576  # CLIP-L/14-336: (336 / 14)^2 patches, mlp connector keeps all of them
STAGES = (
    # name, LLM config, LLM trains, text tokens per sample
    ("stage 1, qwen2-0.5b preset", "qwen2-0.5b", False, 32),
    ("stage 2, qwen2-7b preset", "qwen2-7b", True, 256),
)


def processor_336():
    from vlm.build import image_processor_for, prepare_tokenizer, resolve_vision
    from vlm.processing import VLMProcessor
    from vlm.templates import chat_template_for

    vision, _, _ = resolve_vision("clip-vit-l-14-336")
    tokenizer = prepare_tokenizer("llama", 0)
    return VLMProcessor(
        image_processor=image_processor_for("clip-vit-l-14-336", vision),
        tokenizer=tokenizer,
        num_image_tokens=IMAGE_TOKENS,
        chat_template=chat_template_for("plain", tokenizer),
    )


def photo_jpeg(seed: int, size=(640, 480)) -> bytes:
    """A photo stand-in: bench/request_path.py's gradient-and-shapes JPEG plus sensor noise, which is what
    makes a real photo's entropy decode cost more than a flat-colour picture's."""
    import io

    import numpy as np
    from PIL import Image
    from request_path import photo

    rng = np.random.default_rng(seed)
    pixels = np.asarray(Image.open(io.BytesIO(photo(seed, size))), dtype=np.int16)
    noisy = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def photo_records(synth: Path) -> Path:
    """The caption records of `synth` with each image replaced by a 640x480 JPEG photo stand-in."""
    lines = (synth / "caption_train.jsonl").read_text().splitlines()
    (synth / "photos").mkdir(exist_ok=True)
    out = []
    for i, line in enumerate(lines):
        record = json.loads(line)
        record["image"] = f"photos/{i:06d}.jpg"
        (synth / record["image"]).write_bytes(photo_jpeg(i))
        out.append(json.dumps(record))
    path = synth / "caption_photos.jsonl"
    path.write_text("\n".join(out) + "\n")
    return path


def delivered(workers: int, n_batches: int, micro: int, size: int, work: Path, images: str) -> float:
    """Images per second the loader yields with `workers` processes, after each worker's first batch."""
    from vlm.data.loader import micro_batch_loader
    from vlm.data.records import load_llava_dataset
    from vlm.data.samples import SupervisedDataset
    from vlm.data.synth import generate

    synth = work / f"synth{size}"
    if not synth.exists():
        generate(synth, n=micro * 8, seed=0, n_eval=4, image_sizes=(size,), progress=False)
    manifest = synth / "caption_train.jsonl"
    if images == "photos":
        manifest = synth / "caption_photos.jsonl"
        if not manifest.exists():
            manifest = photo_records(synth)
    processor = processor_336()
    records = load_llava_dataset(str(manifest))
    dataset = SupervisedDataset(records, processor, "plain")
    plan = [[(b * micro + i) % len(dataset) for i in range(micro)] for b in range(n_batches)]
    from vlm.data.collate import Collator

    batches = micro_batch_loader(dataset, Collator(0), plan, len(plan), workers, seed=0)
    warm = max(1, workers)
    for _ in range(warm):  # every worker's start-up and first batch
        first = next(batches)
    assert first["pixel_values"].shape[1:] == (3, 336, 336), first["pixel_values"].shape
    started, images = time.perf_counter(), 0
    for batch in batches:
        images += batch["pixel_values"].shape[0]
    return images / (time.perf_counter() - started)


def consumed(llm, llm_trains: bool, text_tokens: int) -> tuple[float, float]:
    """(model FLOPs per sample, samples/s one H100 takes at 45% MFU)."""
    from transformers import AutoModelForCausalLM

    from vlm.build import connector_dict, resolve_llm, resolve_vision
    from vlm.config import VLMConfig
    from vlm.train.flops import FlopModel, connector_flops_per_image, linear_weights, tower_flops_per_image

    vision, _, _ = resolve_vision("clip-vit-l-14-336")
    text = resolve_llm(llm)[0]
    config = VLMConfig(vision_config=vision, text_config=text, connector=connector_dict("mlp", False, {}))
    assert config.num_image_tokens == IMAGE_TOKENS
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(text)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    model = FlopModel(
        llm_linear=linear_weights(lm),
        llm_attention=4 * text.num_hidden_layers * text.num_attention_heads * head_dim,
        tower_per_image=tower_flops_per_image(config),
        connector_per_image=connector_flops_per_image(config),
        llm_trains=llm_trains,
    )
    flops = model.step_flops([IMAGE_TOKENS + text_tokens], n_images=1, tower_ran=True)
    return flops, MFU * PEAK_H100_BF16 / flops


def per_worker_rate(rates: dict[int, float], cores: int) -> tuple[float, str]:
    """The rate the extrapolation multiplies: it assumes a core per worker, so only runs where every worker and
    the training process had a core of their own count (the lowest of them); without one, the lowest of all."""
    fair = {w: r / w for w, r in rates.items() if w + 1 <= cores}
    if fair:
        return min(fair.values()), f"runs with a core per worker and the trainer: {sorted(fair)} workers"
    return min(r / w for w, r in rates.items()), f"every run shares cores ({cores} here): a lower bound"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--micro", type=int, default=16)
    parser.add_argument("--size", type=int, default=336)
    parser.add_argument("--node-workers", type=int, default=8)
    parser.add_argument("--images", choices=("scenes", "photos"), default="scenes")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vlm-input-"))
    rates = {}
    for w in (int(x) for x in args.workers.split(",")):
        rates[w] = delivered(w, args.batches, args.micro, args.size, work, args.images)
        print(f"{w} worker(s): {rates[w]:.1f} images/s delivered, {rates[w] / w:.1f} per worker", flush=True)
    per_worker, basis = per_worker_rate(rates, os.cpu_count() or 1)
    print(
        f"\nper-worker rate used: {per_worker:.1f} images/s x {args.node_workers} workers per GPU ({basis})"
    )
    print(f"{'stage':28s} {'seq':>5s} {'GFLOP/sample':>13s} {'H100 samples/s':>15s} {'headroom':>9s}")
    out = {"rates": rates, "per_worker": per_worker, "basis": basis, "stages": []}
    for name, llm, trains, text_tokens in STAGES:
        flops, rate = consumed(llm, trains, text_tokens)
        headroom = per_worker * args.node_workers / rate
        seq = IMAGE_TOKENS + text_tokens
        print(f"{name:28s} {seq:5d} {flops / 1e9:13.0f} {rate:15.1f} {headroom:8.1f}x")
        out["stages"].append(
            {"stage": name, "seq": seq, "flops": flops, "samples_s": rate, "headroom": headroom}
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
