"""LM head + loss, full logits vs supervised positions only: peak memory and step time, side by side in one run.

The head and loss alone (nn.Linear hidden -> vocab, no bias: Qwen2-0.5B's vocabulary and width by default; fp32),
forward and backward, batch 1. Full: the head over every position, then transformers' ForCausalLMLoss (what the LLM's own
forward does). Supervised: vlm/supervised_head.py (hidden states gathered at supervised positions, then the head).
Supervised fractions: the answer tokens of an instruction-tuning sample (~25%, the last quarter of the sequence)
and every token (100%, language pretraining).

Memory: each variant runs in its own process. After the head's weight, its gradient buffer, the hidden states
and the labels exist, the process's peak RSS is reset (`5` into /proc/self/clear_refs) and one forward+backward
runs; the figure is the peak RSS (VmHWM) above the RSS at the reset. Large tensors are mmapped and returned to
the OS on free (glibc, torch's CPU allocator caches nothing), so the peak RSS sees each step's transient tensors.
Time: the median of --steps forward+backward steps after that one.

    python bench/lm_head_memory.py [--vocab 151936 --hidden 896 --tokens 2048 --fractions 0.25,1 --steps 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("full", "supervised")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(variant: str, fraction: float, args) -> dict:
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from vlm.constants import IGNORE_INDEX
    from vlm.supervised_head import supervised_head_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    head.weight.grad = torch.zeros_like(head.weight)
    hidden = torch.randn(1, args.tokens, args.hidden, requires_grad=True)
    labels = torch.randint(0, args.vocab, (1, args.tokens))
    labels[:, : args.tokens - round(fraction * args.tokens)] = (
        IGNORE_INDEX  # the prompt; the answer supervised
    )
    n = torch.tensor(float((labels[:, 1:] != IGNORE_INDEX).sum()))

    def step(tokens: int = args.tokens):
        h, y = hidden[:, :tokens], labels[:, :tokens]
        if variant == "full":
            loss = ForCausalLMLoss(head(h), y, args.vocab, num_items_in_batch=n)
        else:
            loss, _ = supervised_head_loss(h, y, head, n)
        loss.backward()
        hidden.grad = None  # the weight's gradient buffer is kept (accumulated in place), as in training
        return float(loss)

    step(8)  # warm-up at 8 tokens: autograd's and the BLAS library's one-time buffers are not the head's
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := RSS now
    base = _status_kib("VmRSS")
    loss = step()
    peak = _status_kib("VmHWM") - base
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "variant": variant,
        "fraction": fraction,
        "peak_mib": peak / 1024,
        "step_s": statistics.median(times),
        "loss": loss,
    }


def run_variant(variant: str, fraction: float, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--fraction", str(fraction)]
    cmd += ["--vocab", str(args.vocab), "--hidden", str(args.hidden), "--tokens", str(args.tokens)]
    cmd += ["--steps", str(args.steps)]
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(rows: list[dict], args) -> str:
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    lines = [
        f"LM head + loss, forward+backward: vocab {args.vocab:,}, hidden {args.hidden}, {args.tokens:,} tokens, "
        f"batch 1, fp32 (one fp32 logits tensor over every position: {logits_mib:,.0f} MiB)",
        "",
        "| supervised | variant | peak MiB above baseline | step s | loss |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['fraction']:.0%} | {r['variant']} | {r['peak_mib']:,.0f} | {r['step_s']:.3f} | {r['loss']:.4f} |"
        )
    lines.append("")
    for fraction in sorted({r["fraction"] for r in rows}):
        full, ours = (
            next(r for r in rows if r["fraction"] == fraction and r["variant"] == v) for v in VARIANTS
        )
        lines.append(
            f"{fraction:.0%} supervised: memory {full['peak_mib'] / ours['peak_mib']:.2f}x less, "
            f"step {full['step_s'] / ours['step_s']:.2f}x faster (full / supervised)"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--fractions", default="0.25,1", help="supervised fractions, comma-separated")
    p.add_argument("--steps", type=int, default=1, help="timed steps per variant (median)")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.fraction, args)))
        return 0
    rows = [run_variant(v, float(f), args) for f in args.fractions.split(",") for v in VARIANTS]
    print(report(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
