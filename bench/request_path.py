"""Where one image request spends its time, part by part, and what the request guard costs under load.

    OMP_NUM_THREADS=1 python bench/request_path.py profile [--checkpoint DIR] [--max-tokens 16]
    python bench/request_path.py load [--checkpoint DIR] [--concurrency 32] [--requests 96] [--rounds 2]

`profile` runs, in this one process and under cProfile, what the API server and the engine do for one chat
request with a 640x480 JPEG: the guard on the raw body (JSON parse, image decode, any base64 re-encode and
re-serialization), then vLLM's `LLM.chat` on the body the guard forwards, with the engine core in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so the encoder, prefill, decode steps and detokenization are profiled too.
The model's forward calls are timed one by one (the first is the prefill). With `PYTHONPATH` pointing at another
checkout it profiles that checkout's guard, which is how the "before" column was measured. One OpenMP thread keeps
the engine rows steady on a shared machine.

`load` starts `vlm serve CKPT` (its default caches) and sends rounds of streaming image requests at the given
concurrency; it prints the client's TTFT and end-to-end latency and, from the server's /metrics, the guard's
mean time per request (`vlm:guard_seconds`, absent before it existed) as a share of the TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import io
import json
import os
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from serve_throughput import free_port, launch  # noqa: F401  (free_port: serve_caches.py imports it from here)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CKPT = ROOT / "checkpoints" / "base-mlp"
QUESTION = "What colour is the shape, and where is it?"


def photo(seed: int, size=(640, 480)) -> bytes:
    """A JPEG with smooth regions and edges, the size of a phone snapshot scaled for the web."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        r = int(rng.integers(10, 80))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def chat_body(model: str, jpeg: bytes, max_tokens: int) -> bytes:
    url = f"data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}"
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    messages = [{"role": "user", "content": content}]
    return json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens}).encode()


def guard_config(model: str):
    import dataclasses

    from vlm.serve.guard import GuardConfig

    names = {f.name for f in dataclasses.fields(GuardConfig)}
    extra = {"hand_off_images": True} if "hand_off_images" in names else {}
    return GuardConfig(served_model_names=[model], **extra)


def run_guard(raw: bytes, model: str) -> bytes:
    """What the guard does to one body: this checkout's own entry point, or the older parse/check/dump steps."""
    from vlm.serve import guard

    config = guard_config(model)
    if hasattr(guard.MediaGuard, "_check_raw"):
        return guard.MediaGuard(None, config)._check_raw("/v1/chat/completions", raw)
    body = guard.parse_body(raw)
    guard.check_request("/v1/chat/completions", body, config)
    return json.dumps(body).encode()


# (row, file fragment, function): cumulative time of that function in the profile.
PARTS = [
    ("guard: JSON parse", "serve/guard.py", "parse_body"),
    ("guard: base64 decode of the data: URL", "serve/media.py", "parse_data_url"),
    ("guard: image decode (PIL, full)", "serve/media.py", "decode_image"),
    ("guard: base64 re-encode", "serve/media.py", "to_data_url"),
    ("guard: JSON re-serialize", "json/__init__.py", "dumps"),
    ("vLLM: chat parse + image load (its decode, or the guard's image)", "media/connector.py", "fetch_image"),
    ("vLLM: its PIL decode", "media/image.py", "load_bytes"),
    (
        "vLLM: multimodal processor (HF image processor, placeholders)",
        "engine/processing.py",
        "_call_hf_processor",
    ),
    ("vLLM: encoder (tower + connector)", "engine/model.py", "embed_multimodal"),
    ("vLLM: sampling", "v1/sample/sampler.py", "forward"),
    ("vLLM: detokenize", "detokenizer.py", "update"),
]


def cumulative(stats: pstats.Stats, fragment: str, name: str) -> tuple[float, int]:
    total, calls = 0.0, 0
    for (path, _, func), (_, ncalls, _, cum, _) in stats.stats.items():
        if func == name and path.endswith(fragment):
            total, calls = total + cum, calls + ncalls
    return total, calls


def profile(args) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, so cProfile sees it
    os.environ.setdefault("VLLM_MEDIA_CONNECTOR", "vlm-vetted")  # what `vlm serve` sets, where it exists
    from vlm.vllm_env import set_engine_env

    set_engine_env()
    from vllm import LLM, SamplingParams

    from vlm.serve.engine import register

    register()
    from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY

    if os.environ["VLLM_MEDIA_CONNECTOR"] not in MEDIA_CONNECTOR_REGISTRY.name2class:
        os.environ["VLLM_MEDIA_CONNECTOR"] = "http"  # an older checkout: vLLM's own loader

    llm = LLM(model=str(args.checkpoint), dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
    model_cls = type(llm.llm_engine.model_executor.driver_worker.worker.model_runner.model)
    forward_s: list[float] = []
    plain_forward = model_cls.forward

    def timed_forward(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return plain_forward(self, *a, **k)
        finally:
            forward_s.append(time.perf_counter() - t0)

    model_cls.forward = timed_forward
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    model = "m"

    def one(seed: int, prof: cProfile.Profile | None) -> float:
        raw = chat_body(model, photo(seed), args.max_tokens)
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        forwarded = run_guard(raw, model)
        messages = json.loads(forwarded)["messages"]
        llm.chat(messages, params, use_tqdm=False)
        if prof:
            prof.disable()
        return time.perf_counter() - t0

    for seed in range(3):
        one(100 + seed, None)  # warm-up: lazy imports, first-call allocations
    plain = [one(200 + seed, None) for seed in range(args.repeats)]
    totals, rows = [], {}
    for seed in range(args.repeats):
        forward_s.clear()
        prof = cProfile.Profile()
        totals.append(one(seed, prof))
        stats = pstats.Stats(prof)
        for label, fragment, name in PARTS:
            rows.setdefault(label, []).append(cumulative(stats, fragment, name)[0])
        rows.setdefault("vLLM: prefill (first forward)", []).append(forward_s[0])
        decode = forward_s[1:]
        rows.setdefault(f"vLLM: decode ({len(decode)} forwards)", []).append(sum(decode))
        nested = {"vLLM: its PIL decode"}  # inside "chat parse + image load"
        counted = sum(v[-1] for k, v in rows.items() if k not in nested and not k.startswith("other"))
        rows.setdefault("other: scheduler, input preparation, rendering, engine loop", []).append(
            totals[-1] - counted
        )
    print(f"checkpoint {args.checkpoint}; one 640x480 JPEG ({len(photo(0))} bytes), {args.max_tokens} tokens")
    print(f"median of {args.repeats} requests, cProfile on (it inflates Python-heavy parts)\n")
    print("| part | ms |\n| --- | ---: |")
    for label, values in rows.items():
        print(f"| {label} | {statistics.median(values) * 1000:.2f} |")
    print(f"| **total, guard + LLM.chat, under cProfile** | **{statistics.median(totals) * 1000:.2f}** |")
    print(f"| total without the profiler | {statistics.median(plain) * 1000:.2f} |")
    if args.dump:
        stats.sort_stats("cumulative").print_stats(40)


# -- load: guard share of TTFT on a live server --------------------------------------------------------------
def start_server(ckpt: Path, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vlm.cli", "serve", str(ckpt), "--port", str(port), "--dtype", "float32"]
    cmd += ["--max-images", "1", "--served-model-name", "m", "--vllm-arg=--max-num-seqs=32", *extra]
    return launch(cmd, port, log)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def scrape(base: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(("vlm:guard_seconds_", "vllm:time_to_first_token_seconds_")) and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
        elif line.startswith("vllm:time_to_first_token_seconds_") and "{" in line:
            name, value = line.split("{", 1)[0], line.rsplit(" ", 1)[1]
            values[name] = values.get(name, 0.0) + float(value)
    return values


async def load_round(
    base: str, bodies: list[dict], concurrency: int
) -> tuple[list[float], list[float], float]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
    gate = asyncio.Semaphore(concurrency)
    ttfts, e2es = [], []

    async def one(body):
        async with gate:
            t0 = time.perf_counter()
            stream = await client.chat.completions.create(**body, stream=True, temperature=0.0)
            first = None
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - t0
            ttfts.append(first if first is not None else time.perf_counter() - t0)
            e2es.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(one(b) for b in bodies))
    elapsed = time.perf_counter() - start
    await client.close()
    return ttfts, e2es, elapsed


def load(args) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="vlm-bench-")) / "server.log"
    proc = start_server(args.checkpoint, port, log, args.vllm_arg)
    try:

        def bodies(offset: int) -> list[dict]:
            return [
                json.loads(chat_body("m", photo(offset + i), args.max_tokens))
                | {"extra_body": {"ignore_eos": True}}
                for i in range(args.requests)
            ]

        asyncio.run(load_round(base, bodies(10_000), args.concurrency))  # warm-up
        before = scrape(base)
        ttfts, e2es, elapsed = [], [], 0.0
        for r in range(args.rounds):
            t, e, s = asyncio.run(load_round(base, bodies(r * args.requests), args.concurrency))
            ttfts, e2es, elapsed = ttfts + t, e2es + e, elapsed + s
        after = scrape(base)
    finally:
        stop(proc)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    ttft = statistics.mean(ttfts)
    n = len(ttfts)
    print(f"concurrency {args.concurrency}, {n} requests, {args.max_tokens} tokens each, 640x480 JPEGs")
    print(f"requests/s {n / elapsed:.1f}; client TTFT mean {ttft * 1000:.0f} ms, p50 "
          f"{statistics.median(ttfts) * 1000:.0f} ms; end-to-end mean {statistics.mean(e2es) * 1000:.0f} ms")  # fmt: skip
    if delta.get("vlm:guard_seconds_count"):
        guard = delta["vlm:guard_seconds_sum"] / delta["vlm:guard_seconds_count"]
        print(f"guard mean {guard * 1000:.2f} ms per request = {100 * guard / ttft:.1f}% of the client TTFT")
    else:
        print("guard time: no vlm:guard_seconds on /metrics (a checkout before it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("profile")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dump", action="store_true", help="also print the top of the last profile")
    p.set_defaults(func=profile)
    q = sub.add_parser("load")
    q.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT)
    q.add_argument("--concurrency", type=int, default=32)
    q.add_argument("--requests", type=int, default=96)
    q.add_argument("--rounds", type=int, default=2)
    q.add_argument("--max-tokens", type=int, default=16)
    q.add_argument("--vllm-arg", action="append", default=[], help="passed to vlm serve as --vllm-arg=...")
    q.set_defaults(func=load)
    args = parser.parse_args()
    if getattr(args, "vllm_arg", None):
        args.vllm_arg = [f"--vllm-arg={a}" for a in args.vllm_arg]
    args.func(args)


if __name__ == "__main__":
    main()
