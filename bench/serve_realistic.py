"""Realistic serving (issue 20): `vlm serve` against what users run today, on a mixed workload, over HTTP.

    python bench/serve_realistic.py --scale tiny [--checkpoint DIR] [--requests 96] [--concurrency 1,8,32]
                                    [--rates 10,40] [--systems a,b,c] [--no-roofline] [--write]
    python bench/serve_realistic.py --scale real [--connectors mlp,qformer] [--requests 32] [--median-tokens 64]

Systems, on the same checkpoint and dtype (bf16 on a GPU or a CPU with avx512_bf16/AMX, else fp32), one server at
a time, all driven by the same streaming `openai` client:
- (a) `bench/hf_serve.py --max-batch 1`: FastAPI + transformers `generate()`, one request at a time;
- (b) `bench/hf_serve.py --max-batch C --wait-ms 20`: static batches up to the concurrency C, padded;
- (c) `vlm serve` with its preset (serve/cpu.yaml or serve/gpu.yaml: prefix and processor caches on).

Workload: each request is a chat with one JPEG of a mixed size (64x64 to 1280x720) as a data: URL and a question
of 5-60 tokens (the synthetic world's questions, lengthened with its captions to a uniform target length).
Closed loop at each `--concurrency` (each client sends its next request when the last one ends), then open loop:
Poisson arrivals at each `--rates` (requests/s, latencies from the scheduled arrival).
- tiny: the trained demo checkpoint (runs/mlp/stage2/final, else checkpoints/base-mlp); answers stop at EOS,
  max_tokens 16.
- real: CLIP-L/14-336 + the qwen2-0.5b preset (random init, as `vlm init` builds it) per connector;
  each request's max_tokens is drawn from a log-normal (median `--median-tokens`, sigma 0.6, clipped to 4-256),
  with ignore_eos, since random weights do not stop.

Reported per system and load: output tokens/s, requests/s, TTFT and end-to-end p50/p99, goodput (requests/s that
meet TTFT <= --slo-ttft-ms and time per output token <= --slo-tpot-ms), the ratios (c)/(a) and (c)/(b), and
where each sits against this machine's roofline (bench/roofline.py).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import roofline
from request_path import chat_body, photo, stop
from serve_throughput import free_port, launch, machine

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(64, 64), (320, 240), (640, 480), (1280, 720)]
SYSTEM_NAMES = {
    "a": "(a) transformers, one at a time",
    "b": "(b) transformers, static batches",
    "c": "(c) vlm serve",
}
SCALES = {  # defaults per scale; every one is a flag
    "tiny": dict(
        requests=96, concurrency="1,8,32", rates="10,40", slo_ttft_ms=1000, slo_tpot_ms=100, warmup=32
    ),
    "real": dict(
        requests=32, concurrency="1,8,32", rates="0.1,0.3", slo_ttft_ms=10000, slo_tpot_ms=1000, warmup=2
    ),
}


# -- checkpoints -------------------------------------------------------------------------------------------------
def tiny_checkpoint() -> Path:
    trained = ROOT / "runs" / "mlp" / "stage2" / "final"
    return trained if (trained / "config.json").is_file() else ROOT / "checkpoints" / "base-mlp"


def real_checkpoint(work: Path, connector: str) -> Path:
    """CLIP-L/14-336 + the qwen2-0.5b preset (Qwen2-0.5B's shape, its full 151,936-token vocabulary kept: the LM
    head is 18% of the LLM's weights; the tiny tokenizer) as `vlm init` builds it; bf16 on disk. Built once under
    `work` and reused."""
    out = work / f"clip-l336+qwen2-0.5b-{connector}"
    if (out / "config.json").is_file():
        return out
    import torch

    from vlm.build import build_base_model, save_checkpoint

    model, processor = build_base_model("clip-vit-l-14-336", "qwen2-0.5b", connector, seed=0)
    return save_checkpoint(model.to(torch.bfloat16), processor, out)


def default_dtype() -> str:
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags.split()) else "float32"


# -- workload ----------------------------------------------------------------------------------------------------
@dataclass
class Request:
    body: dict
    prompt_tokens: int  # image placeholders included
    size: tuple[int, int]


def questions(tokenizer, n: int, rng: random.Random) -> list[str]:
    """Questions of a uniform 5-60 tokens: a synthetic question, after as many synthetic captions as it takes."""
    from vlm.build import tokenizer_corpus

    corpus = tokenizer_corpus(seed=0)
    asks = [s for s in corpus if s.endswith("?") and "\n" not in s]
    sentences = [s for s in corpus if s.endswith(".") and "\n" not in s and len(s) < 200]
    out = []
    for _ in range(n):
        target, text = rng.randint(5, 60), rng.choice(asks)
        while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < target:
            text = f"{rng.choice(sentences)} {text}"
        out.append(text)
    return out


def output_lengths(n: int, median: int, rng: random.Random) -> list[int]:
    import math

    return [min(256, max(4, round(median * math.exp(rng.gauss(0, 0.6))))) for _ in range(n)]


def workload(ckpt: Path, n: int, seed: int, scale: str, median_tokens: int) -> list[Request]:
    from transformers import AutoProcessor

    import vlm  # noqa: F401

    processor = AutoProcessor.from_pretrained(ckpt)
    rng = random.Random(seed)
    texts = questions(processor.tokenizer, n, rng)
    lengths = output_lengths(n, median_tokens, rng) if scale == "real" else [16] * n
    requests = []
    for i, (text, max_tokens) in enumerate(zip(texts, lengths, strict=True)):
        size = SIZES[rng.randrange(len(SIZES))]
        body = json.loads(chat_body("m", photo(seed * 100_000 + i, size), max_tokens))
        body["messages"][0]["content"][1]["text"] = text
        if scale == "real":
            body["ignore_eos"] = True
        content = [{"type": "image"}, {"type": "text", "text": text}]
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        tokens = len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        requests.append(Request(body, tokens - 1 + processor.num_image_tokens, size))
    return requests


# -- client ------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    ttft: float
    e2e: float
    tokens: int
    ok: bool


async def send(client, body: dict, t0: float) -> Result:
    """One streaming chat request; times from t0 (when it was due), TTFT at the first chunk with a choice."""
    extra = {"ignore_eos": True} if body.get("ignore_eos") else None
    args = {k: v for k, v in body.items() if k != "ignore_eos"}
    ttft, tokens = None, 0
    try:
        stream = await client.chat.completions.create(
            **args, stream=True, temperature=0.0, stream_options={"include_usage": True}, extra_body=extra
        )
        async for chunk in stream:
            if ttft is None and chunk.choices:
                ttft = time.perf_counter() - t0
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except Exception as err:  # counted as failed, not fatal: an overloaded server is a result too
        print(f"  request failed: {type(err).__name__}: {err}", file=sys.stderr)
        return Result(0.0, time.perf_counter() - t0, 0, False)
    e2e = time.perf_counter() - t0
    return Result(ttft if ttft is not None else e2e, e2e, tokens, True)


def client_for(base: str):
    import openai

    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=1800)


async def closed_loop(base: str, requests: list[Request], concurrency: int) -> tuple[list[Result], float]:
    client, work = client_for(base), iter(requests)
    results: list[Result] = []

    async def user():
        for r in work:  # a shared iterator: each user takes the next request when its last one ends
            results.append(await send(client, r.body, time.perf_counter()))

    start = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    return results, elapsed


async def open_loop(base: str, requests: list[Request], rate: float, seed: int) -> tuple[list[Result], float]:
    client, rng = client_for(base), random.Random(seed)
    start = time.perf_counter()
    due, tasks = start, []
    for r in requests:
        due += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(send(client, r.body, due)))
    results = list(await asyncio.gather(*tasks))
    elapsed = time.perf_counter() - start
    await client.close()
    return results, elapsed


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def summarize(results: list[Result], elapsed: float, slo_ttft: float, slo_tpot: float) -> dict:
    ok = [r for r in results if r.ok]
    tpot = lambda r: (r.e2e - r.ttft) / max(1, r.tokens - 1)  # noqa: E731
    good = [r for r in ok if r.ttft <= slo_ttft and tpot(r) <= slo_tpot]
    return {
        "tok_s": sum(r.tokens for r in ok) / elapsed,
        "req_s": len(ok) / elapsed,
        "ttft_p50": percentile([r.ttft for r in ok], 50),
        "ttft_p99": percentile([r.ttft for r in ok], 99),
        "e2e_p50": percentile([r.e2e for r in ok], 50),
        "e2e_p99": percentile([r.e2e for r in ok], 99),
        # token-weighted: tokens arriving several to a chunk give single requests a TPOT near 0
        "tpot": sum(r.e2e - r.ttft for r in ok) / max(1, sum(r.tokens - 1 for r in ok if r.tokens > 1)),
        "goodput": len(good) / elapsed,
        "failed": len(results) - len(ok),
        "tokens": sum(r.tokens for r in ok),
    }


# -- systems -----------------------------------------------------------------------------------------------------
def start_system(system: str, ckpt: Path, args, port: int, log: Path, max_batch: int) -> subprocess.Popen:
    if system == "c":
        import torch

        preset = ROOT / "serve" / ("gpu.yaml" if torch.cuda.is_available() else "cpu.yaml")
        cmd = [sys.executable, "-m", "vlm.cli", "serve", str(ckpt), "--config", str(preset)]
        cmd += ["--port", str(port), "--dtype", args.dtype, "--served-model-name", "m"]
        if args.scale == "real":  # Qwen2's 32k context would size the KV cache for nothing
            cmd += ["--max-model-len", "2048"]
    else:
        cmd = [sys.executable, str(ROOT / "bench" / "hf_serve.py"), str(ckpt), "--port", str(port)]
        cmd += [
            "--dtype",
            args.dtype,
            "--max-batch",
            str(max_batch if system == "b" else 1),
            "--wait-ms",
            "20",
        ]
    return launch(cmd, port, log)


def set_max_batch(base: str, size: int) -> None:
    request = urllib.request.Request(f"{base}/admin/max_batch?size={size}", method="POST")
    urllib.request.urlopen(request, timeout=10).close()


def loads_of(args) -> list[tuple[str, float]]:
    closed = [("closed", float(c)) for c in args.concurrency.split(",") if c]
    return closed + [("poisson", float(r)) for r in args.rates.split(",") if r]


def split_workload(requests: list[Request], args) -> tuple[list[Request], dict]:
    """(warm-up requests, {load: its own requests}): no two loads share a request, so no load finds another's
    images or prompts in vLLM's caches (the workload has no repeats; serve_caches.py measures those)."""
    warm, rest = requests[: args.warmup], requests[args.warmup :]
    sets = {}
    for load in loads_of(args):
        n = args.requests_c1 if load == ("closed", 1.0) else args.requests
        sets[load], rest = rest[:n], rest[n:]
    return warm, sets


def workload_size(args) -> int:
    return args.warmup + sum(
        args.requests_c1 if x == ("closed", 1.0) else args.requests for x in loads_of(args)
    )


def run_system(system: str, ckpt: Path, warm: list[Request], sets: dict, args, log_dir: Path) -> dict:
    """Every load for one system on one server: a warm-up, the closed-loop levels, then the open-loop rates."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    levels = [int(level) for kind, level in sets if kind == "closed"] or [1]
    print(f"{SYSTEM_NAMES[system]}: starting", flush=True)
    proc = start_system(system, ckpt, args, port, log_dir / f"{system}.log", max(levels))
    slo = (args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000)
    out = {}
    try:
        if warm:
            asyncio.run(closed_loop(base, warm, len(warm)))
        for (kind, level), work in sets.items():
            if system == "b":  # static batches up to the concurrency; open loop: the largest level
                set_max_batch(base, int(level) if kind == "closed" else max(levels))
            n = len(work)
            t0 = time.perf_counter()
            if kind == "closed":
                results, elapsed = asyncio.run(closed_loop(base, work, int(level)))
            else:
                results, elapsed = asyncio.run(open_loop(base, work, level, args.seed))
            out[(kind, level)] = summarize(results, elapsed, *slo) | {"n": n}
            s = out[(kind, level)]
            print(f"  {kind} {level:g}: {n} requests, {time.perf_counter() - t0:.1f} s, {s['tok_s']:.1f} tok/s, "
                  f"{s['req_s']:.2f} req/s, TTFT p50 {s['ttft_p50'] * 1000:.0f} ms, failed {s['failed']}",
                  flush=True)  # fmt: skip
    finally:
        stop(proc)
    return out


def host() -> str:
    import torch

    text = machine()
    return text.replace("no GPU", torch.cuda.get_device_name()) if torch.cuda.is_available() else text


# -- report ------------------------------------------------------------------------------------------------------
def num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def load_name(kind: str, level: float) -> str:
    return f"closed, concurrency {level:g}" if kind == "closed" else f"Poisson {level:g} req/s"


def results_table(results: dict[str, dict]) -> list[str]:
    rows = [
        "| load | system | requests | output tok/s | req/s | TTFT p50 / p99 ms | end-to-end p50 / p99 ms "
        "| goodput req/s | failed |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in next(iter(results.values())):
        for system, by_load in results.items():
            s = by_load[key]
            rows.append(
                f"| {load_name(*key)} | {SYSTEM_NAMES[system]} | {s['n']} | {s['tok_s']:.1f} | {s['req_s']:.2f} | "
                f"{ms(s['ttft_p50'])} / {ms(s['ttft_p99'])} | {ms(s['e2e_p50'])} / {ms(s['e2e_p99'])} | "
                f"{s['goodput']:.2f} | {s['failed']} |"
            )
    return rows


def ratio_table(results: dict[str, dict]) -> list[str]:
    if "c" not in results or len(results) < 2:
        return []
    others = [s for s in ("a", "b") if s in results]
    head = " | ".join(f"(c)/({s}) tok/s | (c)/({s}) req/s | p99 TTFT (c) vs ({s})" for s in others)
    rows = [f"| load | {head} |", "| --- |" + " ---: | ---: | --- |" * len(others)]
    for key, c in results["c"].items():
        cells = []
        for s in others:
            o = results[s][key]
            cells.append(
                f"{c['tok_s'] / o['tok_s']:.2f}x | {c['req_s'] / o['req_s']:.2f}x | "
                f"{ms(c['ttft_p99'])} vs {ms(o['ttft_p99'])} ms"
            )
        rows.append(f"| {load_name(*key)} | " + " | ".join(cells) + " |")
    return rows


def roofline_table(results: dict[str, dict], sets: dict, cost, machine_: dict, dtype: str) -> list[str]:
    gflops = machine_["bf16_gflops" if dtype == "bfloat16" else "fp32_gflops"]
    rows = [
        "| load | system | output tok/s | workload bound tok/s | share | decode batch | decode tok/s "
        "(batch / mean TPOT) | decode bound tok/s | share |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for system, by_load in results.items():
        for (kind, level), s in by_load.items():
            if kind != "closed":
                continue
            prompts = [r.prompt_tokens for r in sets[(kind, level)]]
            outputs = [max(1, round(s["tokens"] / s["n"]))] * s["n"]  # what was generated, on average
            bound = roofline.workload_bound(cost, machine_, gflops, prompts, outputs, int(level))
            batch = 1 if system == "a" else int(level)
            decode = batch / s["tpot"] if s["tpot"] > 0 else 0.0
            context = sum(prompts) / len(prompts) + outputs[0] / 2
            dbound = roofline.decode_bound(cost, machine_, gflops, batch, context)
            rows.append(
                f"| {load_name(kind, level)} | {SYSTEM_NAMES[system]} | {s['tok_s']:.1f} | {num(bound)} | "
                f"{100 * s['tok_s'] / bound:.0f}% | {batch} | {num(decode)} | {num(dbound)} | "
                f"{100 * decode / dbound:.0f}% |"
            )
    return rows


def goals(results: dict[str, dict], scale: str, top: int) -> list[str]:
    key = ("closed", top)
    if "c" not in results or key not in results["c"]:
        return []
    c, lines = results["c"][key], []
    if "a" in results:
        a = results["a"][key]
        want = 3.0 if scale == "tiny" else 10.0
        ratio = c["tok_s"] / a["tok_s"]
        lines.append(f"- (c)/(a) output tokens/s at concurrency {top}: **{ratio:.2f}x** (goal >= {want:g}x: "
                     f"{'met' if ratio >= want else 'not met'}); p99 TTFT {ms(c['ttft_p99'])} vs "
                     f"{ms(a['ttft_p99'])} ms.")  # fmt: skip
    if "b" in results:
        ratio = c["tok_s"] / results["b"][key]["tok_s"]
        lines.append(f"- (c)/(b) output tokens/s at concurrency {top}: **{ratio:.2f}x**"
                     + (f" (goal >= 1.5x: {'met' if ratio >= 1.5 else 'not met'})." if scale == "real" else "."))  # fmt: skip
    return lines


def describe_workload(requests: list[Request], scale: str, median: int) -> str:
    prompts = sorted(r.prompt_tokens for r in requests)
    sizes = ", ".join(f"{w}x{h}" for w, h in SIZES)
    outputs = sorted(r.body["max_tokens"] for r in requests)
    tail = (
        f"max_tokens log-normal (median {median}, sigma 0.6, 4-256; drawn: median {outputs[len(outputs) // 2]}, "
        f"max {outputs[-1]}), ignore_eos"
        if scale == "real"
        else "answers stop at EOS, max_tokens 16"
    )
    return (f"{len(requests)} requests: one JPEG each ({sizes}, uniform), questions of 5-60 tokens; prompts "
            f"{prompts[0]}-{prompts[-1]} tokens with the image's placeholders (median {prompts[len(prompts) // 2]}); "
            f"{tail}.")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: per scale (see above)")
    parser.add_argument("--connectors", default="mlp,qformer", help="real scale: checkpoints to build")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vlm-realistic",
                        help="where real-shape checkpoints are built and kept")  # fmt: skip
    parser.add_argument("--systems", default="a,b,c")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--requests-c1", type=int, default=None, help="fewer requests at concurrency 1")
    parser.add_argument("--concurrency", default=None, help="closed-loop levels, comma-separated")
    parser.add_argument(
        "--rates", default=None, help="open-loop Poisson rates (req/s), comma-separated; '' none"
    )
    parser.add_argument("--median-tokens", type=int, default=64, help="real scale: median of max_tokens")
    parser.add_argument("--slo-ttft-ms", type=float, default=None)
    parser.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 where supported, else float32")
    parser.add_argument(
        "--warmup", type=int, default=None, help="requests sent (all at once) before measuring"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-roofline", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args()
    for key, value in SCALES[args.scale].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.requests_c1 = args.requests_c1 or args.requests
    args.dtype = args.dtype or default_dtype()
    systems = [s for s in args.systems.split(",") if s]
    if unknown := set(systems) - set(SYSTEM_NAMES):
        parser.error(f"--systems: unknown {sorted(unknown)}; choose from a, b, c")

    started = datetime.datetime.now(datetime.timezone.utc)
    machine_ = None if args.no_roofline else roofline.measure_machine()
    if args.checkpoint:
        ckpts = [args.checkpoint]
    elif args.scale == "tiny":
        ckpts = [tiny_checkpoint()]
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        ckpts = [real_checkpoint(args.work, c) for c in args.connectors.split(",")]
    log_dir = Path(tempfile.mkdtemp(prefix="vlm-realistic-"))
    top = max(int(c) for c in args.concurrency.split(","))
    md = [
        f"Machine: {host()}; 1-min load average {os.getloadavg()[0]:.1f} at the start.  ",
        f"Command: `python bench/serve_realistic.py {' '.join(sys.argv[1:])}`, {started:%Y-%m-%d %H:%M} UTC; "
        f"dtype {args.dtype}; goodput: TTFT <= {args.slo_ttft_ms:g} ms and time per output token <= "
        f"{args.slo_tpot_ms:g} ms.",
    ]
    if machine_:
        md.append(f"Machine limits (bench/roofline.py): matmul {machine_['fp32_gflops']:.3g} GFLOP/s fp32, "
                  f"{machine_['bf16_gflops']:.3g} bf16; copy {machine_['copy_gbps']:.1f} GB/s (all threads), "
                  f"{machine_['copy_gbps_1thread']:.1f} GB/s (one thread).")  # fmt: skip
    for ckpt in ckpts:
        requests = workload(ckpt, workload_size(args), args.seed, args.scale, args.median_tokens)
        warm, sets = split_workload(requests, args)
        results = {s: run_system(s, ckpt, warm, sets, args, log_dir) for s in systems}
        cost = roofline.model_cost(str(ckpt), args.dtype)
        md += ["", f"**{ckpt.name}** ({cost.llm_params / 1e6:.1f}M LLM + {cost.tower_params / 1e6:.1f}M tower "
               f"parameters, {cost.image_tokens} image tokens). {describe_workload(requests, args.scale, args.median_tokens)}",
               "", *results_table(results), "", *ratio_table(results), "", *goals(results, args.scale, top)]  # fmt: skip
        if machine_:
            md += ["", f"Roofline ({cost.weight_bytes / 1e6:.3g} MB of weights read per decode step, "
                   f"{cost.flops_per_token / 1e9:.3g} GFLOP per token, {cost.flops_per_image / 1e9:.3g} GFLOP per "
                   f"image, {cost.kv_bytes_per_token / 1e3:.1f} KB of KV per token):",
                   "", *roofline_table(results, sets, cost, machine_, args.dtype)]  # fmt: skip
    text = "\n".join(md)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")
    print(f"\nserver logs in {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
