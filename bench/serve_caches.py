"""What each of vLLM's caches buys `vlm serve` on a workload with a shared system prompt and repeated images.

    python bench/serve_caches.py [--checkpoint DIR] [--images 8] [--repeats 8] [--concurrency 16] [--rounds 2]

Every request: the same system prompt, then one of `--images` 640x480 JPEGs, then one of as many questions;
each image comes `--repeats` times, with a different question each time, in a shuffled order. One server per
setting (prefix caching and the multimodal processor cache each off and on, and chunked prefill off), the same
requests, streaming; after a warm-up on other images, `--rounds` rounds. Prints requests/s, TTFT and the cache
hit rates from the server's /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
from pathlib import Path

from request_path import DEFAULT_CKPT, chat_body, free_port, load_round, photo, start_server, stop

SYSTEM = (
    "You are a careful visual assistant. Look at the picture, then answer the question about the shapes in it: "
    "their colours, sizes, positions and how many there are. Answer in a few words, and say so when unsure."
)
QUESTIONS = [
    "What colour is the largest shape?",
    "How many shapes are there?",
    "Where is the brightest shape?",
    "Is there a red shape?",
    "Describe the picture.",
    "Which shape is on the left?",
    "Are any shapes overlapping?",
    "What is in the top corner?",
]
SETTINGS = {  # name -> vlm serve --vllm-arg values
    "no caches": ["--no-enable-prefix-caching", "--mm-processor-cache-gb=0"],
    "prefix caching only": ["--enable-prefix-caching", "--mm-processor-cache-gb=0"],
    "mm processor cache only": ["--no-enable-prefix-caching", "--mm-processor-cache-gb=4"],
    "both (serve/cpu.yaml)": ["--enable-prefix-caching", "--mm-processor-cache-gb=4"],
    "both, chunked prefill off": [
        "--enable-prefix-caching",
        "--mm-processor-cache-gb=4",
        "--no-enable-chunked-prefill",
    ],
}


def bodies(images: list[bytes], repeats: int, max_tokens: int, seed: int) -> list[dict]:
    out = []
    for i, jpeg in enumerate(images):
        for r in range(repeats):
            body = json.loads(chat_body("m", jpeg, max_tokens))
            body["messages"].insert(0, {"role": "system", "content": SYSTEM})
            body["messages"][-1]["content"][1]["text"] = QUESTIONS[(i + r) % len(QUESTIONS)]
            out.append(body | {"extra_body": {"ignore_eos": True}})
    random.Random(seed).shuffle(out)
    return out


def scrape_counters(base: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name.startswith(("vllm:prefix_cache_", "vllm:mm_cache_")) and name.endswith("_total"):
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def run_setting(args, name: str, extra: list[str]) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="vlm-bench-")) / "server.log"
    proc = start_server(args.checkpoint, port, log, [f"--vllm-arg={a}" for a in extra])
    try:
        warm = [photo(50_000 + i) for i in range(args.images)]
        asyncio.run(load_round(base, bodies(warm, 2, args.max_tokens, 0), args.concurrency))
        before = scrape_counters(base)
        ttfts, elapsed, n = [], 0.0, 0
        for r in range(args.rounds):
            images = [photo(r * 1000 + i) for i in range(args.images)]  # new images each round
            work = bodies(images, args.repeats, args.max_tokens, r)
            t, _, s = asyncio.run(load_round(base, work, args.concurrency))
            ttfts, elapsed, n = ttfts + t, elapsed + s, n + len(work)
        after = scrape_counters(base)
    finally:
        stop(proc)
    d = {k: after[k] - before.get(k, 0.0) for k in after}

    def rate(kind: str) -> float | None:
        queries = d.get(f"vllm:{kind}_cache_queries_total", 0.0)
        return d.get(f"vllm:{kind}_cache_hits_total", 0.0) / queries if queries else None

    return {
        "name": name,
        "rps": n / elapsed,
        "ttft_p50": statistics.median(ttfts),
        "ttft_mean": statistics.mean(ttfts),
        "prefix": rate("prefix"),
        "mm": rate("mm"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--only", action="append", default=None, help="run only these settings (by name)")
    args = parser.parse_args()
    rows = [
        run_setting(args, name, extra)
        for name, extra in SETTINGS.items()
        if not args.only or name in args.only
    ]
    base = rows[0]
    print(f"{args.images} images x {args.repeats} questions, shared system prompt, concurrency {args.concurrency}, "
          f"{args.rounds} rounds, {args.max_tokens} tokens")  # fmt: skip
    print(
        "| setting | requests/s | vs first | TTFT p50 ms | TTFT mean ms | prefix hit rate | mm cache hit rate |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
        print(f"| {r['name']} | {r['rps']:.1f} | {r['rps'] / base['rps']:.2f}x | {r['ttft_p50'] * 1000:.0f} | "
              f"{r['ttft_mean'] * 1000:.0f} | {fmt(r['prefix'])} | {fmt(r['mm'])} |")  # fmt: skip


if __name__ == "__main__":
    main()
