"""Rendering of bench/perf.py's results: one table of ratios vs named baselines, peak memory, padding."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mib(r: dict) -> str:
    return f"{r['peak_mib']:.0f}"


def _verdict(value: float, goal: float, higher: bool) -> str:
    met = value >= goal if higher else value <= goal
    return f"**{value:.2f}x** ({'>=' if higher else '<='} {goal:g}: {'met' if met else 'not met'})"


def train_rows(res: dict) -> list[str]:
    ours, llava = res["ours"], res["llava"]
    rows = []
    for key, what in (("stage1", "stage 1 (connector trains)"), ("full", "stage 2 full (connector + LLM)")):
        rows.append(
            f"| 1 | training step, {what}: ours vs `LlavaForConditionalGeneration` | "
            f"{1000 * ours[f'{key}_s']:.1f} ms | {1000 * llava[f'{key}_s']:.1f} ms | "
            f"{_verdict(ours[f'{key}_s'] / llava[f'{key}_s'], 1.0, False)} | {_mib(ours)} / {_mib(llava)} |"
        )
    if abs(ours["stage1_loss"] - llava["stage1_loss"]) > 1e-5:  # same weights and batch: same loss
        raise ValueError(
            f"first-step losses differ: ours {ours['stage1_loss']}, Llava {llava['stage1_loss']}"
        )
    rows.append(
        f"| 1 | training step, stage 1 from cached features vs Llava stage 1 | "
        f"{1000 * ours['stage1_cached_s']:.1f} ms | {1000 * llava['stage1_s']:.1f} ms | "
        f"{ours['stage1_cached_s'] / llava['stage1_s']:.2f}x | (same process as ours) |"
    )
    return rows


def cache_rows(res: dict) -> list[str]:
    r = res["stage1"]
    images, cache, build = r["epoch_images_s"], r["epoch_cache_s"], r["cache_build_s"]
    return [
        f"| 2 | stage 1 epoch ({r['steps_per_epoch']} steps): from the feature cache vs from images (2nd+ epochs) "
        f"| {cache:.2f} s | {images:.2f} s | {_verdict(images / cache, 2.0, True)} speed-up | {_mib(r)} (one process) |",
        f"| 2 | stage 1 first epoch incl. building the cache ({build:.2f} s) vs from images | {build + cache:.2f} s "
        f"| {images:.2f} s | {images / (build + cache):.2f}x speed-up | |",
    ]


def serve_rows(res: dict) -> list[str]:
    hf, vl = res["serve_hf"], res["serve_vllm"]
    rows = []
    for c in ("1", "8", "32"):
        ratio = vl[c]["tokens_per_s"] / hf[c]["tokens_per_s"]
        mem = f"{_mib(vl)} / {_mib(hf)}" if c == "1" else ""
        rows.append(
            f"| 3 | serving output tok/s (higher is better) at concurrency {c}: `vlm serve` vs transformers `generate` | "
            f"{vl[c]['tokens_per_s']:.0f} | {hf[c]['tokens_per_s']:.0f} | {ratio:.2f}x | {mem} |"
        )
    return rows


def budget_rows(res: dict) -> list[str]:
    base = res["budget_mlp"]
    rows = []
    for c in ("mlp", "qformer", "perceiver"):
        r = res[f"budget_{c}"]
        rows.append(
            f"| 4 | `vlm serve`, {c} ({r['image_tokens']} visual tokens) vs mlp (576), concurrency 32 | "
            f"{r['tokens_per_s']:.0f} tok/s, {r['images_per_s']:.2f} img/s | "
            f"{base['tokens_per_s']:.0f} tok/s, {base['images_per_s']:.2f} img/s | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {_mib(r)} |"
        )
    return rows


def padding_table(paths: dict) -> list[str]:
    from padding_report import llava_like_lengths, report, synthetic_lengths

    vqa = str(Path(paths["data"]) / "vqa_train.jsonl")
    inputs = (
        ("LLaVA-665K-like (simulated, 576 image tokens, max 2048)", llava_like_lengths(), 16, 2048),
        (
            "synthetic VQA (`vlm data synth`, 16 image tokens, max 512)",
            synthetic_lengths(vqa, paths["base"]),
            32,
            512,
        ),
    )
    rows = ["| lengths | batch | random order | length-grouped | packed (random order) |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, lengths, batch, max_len in inputs:
        r = report(lengths, batch, max_len)
        rows.append(
            f"| {name} | {batch} | {r['random']:.1%} | {r['length_grouped']:.1%} | {r['packed']:.1%} |"
        )
    return rows


SETUP = (
    "Setups: (1) the tiny base checkpoint (CLIP 32 px / 16 patches, Llama 128 x 2, mlp), one batch of 32 "
    "synthetic captions, fp32, AdamW, median of 12 steps after 3 warm-up, 2 alternating rounds per side; the "
    "first-step losses of both sides are checked equal; (1) and (2) time the process's CPU seconds (one thread; "
    "wall time on this shared box measured the queue for the cores), (3) and (4) wall time. (2) stages/stage1.yaml's data path (TrainData, collator, "
    "model, AdamW on the connector; in-process, no DeepSpeed) on 1,536 synthetic captions, micro-batch 32: 3 "
    "epochs from images alternating with 3 from the cache (medians), the cache built first and timed apart. (3) tiny CLIP + mlp + Llama 512 x 8, 32 requests with "
    "one 48 px image and 16 output tokens each (ignore_eos), after a warm-up pass; transformers runs batches of "
    "size = concurrency. (4) one Llama 256 x 4 behind a 576-patch tower (336 px, patch 14, width 64) with each "
    "connector, 32 requests at concurrency 32. Peak RSS: the phase's whole process tree (vLLM: API server, "
    "engine core and worker together)."
)


def render(results: dict, meta: dict, paths: dict) -> str:
    rows = ["| # | measurement (ours vs named baseline) | ours | baseline | ratio (goal) | peak RSS MiB ours / baseline |",
            "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for keys, fn in (
        (("ours", "llava"), train_rows),
        (("stage1",), cache_rows),
        (("serve_hf", "serve_vllm"), serve_rows),
        (("budget_mlp", "budget_qformer", "budget_perceiver"), budget_rows),
    ):
        if all(k in results for k in keys):
            rows += fn(results)
    return "\n".join(
        [
            f"Machine: {machine()}. Command: `{meta['command']}` ({meta['wall_s'] / 60:.1f} min), {meta['date']}; "
            f"1-min load average {meta['load_before']:.1f} before, {meta['load_after']:.1f} after. Each ratio "
            "compares two phases measured side by side in this one run on a shared 2-core machine (other jobs "
            "ran beside it: see the load average), so absolute figures are noisy and the ratios are the result.",
            "",
            SETUP,
            "",
            *rows,
            "",
            "Padding-token fraction (`bench/padding_report.py`; packing rows of <= max length within each batch):",
            "",
            *padding_table(paths),
        ]
    )


def machine() -> str:
    import platform

    import torch

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        "?",
    )
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{__import__('os').cpu_count()}-core CPU ({cpu}), {gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def write_section(
    markdown: str, path: Path = ROOT / "BENCHMARKS.md", title: str = "Performance (make bench)"
) -> None:
    """Replace (or append) the `## {title}` section, leaving the rest of the file as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n" + markdown.strip() + "\n"
    pattern = rf"^## {re.escape(title)}\n.*?(?=^## |\Z)"
    if re.search(pattern, text, flags=re.M | re.S):
        text = re.sub(pattern, lambda _: section + "\n", text, count=1, flags=re.M | re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")
