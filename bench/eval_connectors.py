"""Untrained base vs stage 1 vs stage 2, per connector: `vlm eval` (vqa + caption + pope) on the held-out
synthetic split, then markdown tables for BENCHMARKS.md (VQA per slice; captions and POPE).

    .venv/bin/python bench/eval_connectors.py [--connectors linear,mlp,qformer,perceiver] [--engine vllm|hf]
        [--out-dir runs/eval/connectors] [--reuse] [--eager]

Needs `make demo`'s data and base checkpoints and `make stage1 stage2 CONNECTOR=c` for each connector.
--reuse keeps reports already in --out-dir (a rerun only evaluates what is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data/synth"
TASKS = {"vqa": "vqa_eval.jsonl", "caption": "caption_eval.jsonl", "pope": "pope_eval.jsonl"}
VQA_COLS = [
    ("question_type=colour", "colour"), ("question_type=shape", "shape"), ("question_type=count", "count"),
    ("question_type=position", "position"), ("num_objects=1", "1 obj"), ("num_objects=2", "2 obj"),
    ("num_objects=3", "3 obj"), ("image_size=32", "32 px"), ("image_size=48", "48 px"), ("image_size=64", "64 px"),
]  # fmt: skip


def checkpoints(connector: str) -> dict[str, Path]:
    runs = ROOT / "runs" / connector
    return {
        "base": ROOT / f"checkpoints/base-{connector}",
        "stage 1": runs / "stage1/final",
        "stage 2": runs / "stage2/final",
    }


def evaluate(ckpt: Path, out: Path, engine: str, reuse: bool, eager: bool) -> dict[str, dict]:
    if not (reuse and all((out / f"{t}.json").is_file() for t in TASKS)):
        cmd = [sys.executable, "-m", "vlm.cli", "eval", str(ckpt), "--engine", engine, "--quiet"]
        cmd += ["--enforce-eager"] if eager and engine == "vllm" else []
        for task, file in TASKS.items():
            cmd += ["--task", task, "--data", str(DATA / file)]
        cmd += ["--out", str(out / "{task}.json"), "--html", str(out / "{task}.html")]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return {t: json.loads((out / f"{t}.json").read_text()) for t in TASKS}


def vqa_row(connector: str, name: str, reports: dict) -> str:
    s = reports["vqa"]["slices"]
    cells = [f"{s['overall']['accuracy']:.3f}"] + [
        f"{s[k]['accuracy']:.3f}" if k in s else "–" for k, _ in VQA_COLS
    ]
    return f"| {connector} | {name} | " + " | ".join(cells) + " |"


def caption_pope_row(connector: str, name: str, reports: dict) -> str:
    cap, pope = reports["caption"]["metrics"], reports["pope"]["slices"]
    f1 = [f"{pope[f'pope_split={k}']['f1']:.3f}" for k in ("random", "popular", "adversarial")]
    o = pope["overall"]
    cells = [
        f"{cap['cider_d']:.3f}",
        f"{cap['bleu4']:.3f}",
        *f1,
        f"{o['accuracy']:.3f}",
        f"{o['yes_ratio']:.3f}",
    ]
    return f"| {connector} | {name} | " + " | ".join(cells + [f"{o['unparsed']:.3f}"]) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connectors", default="linear,mlp,qformer,perceiver")
    parser.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    parser.add_argument("--out-dir", default="runs/eval/connectors")
    parser.add_argument("--reuse", action="store_true", help="keep reports already written")
    parser.add_argument("--eager", action="store_true", help="vllm: --enforce-eager (starts faster)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = []
    for c in args.connectors.split(","):
        for name, ckpt in checkpoints(c).items():
            out = ROOT / args.out_dir / f"{c}-{name.replace(' ', '')}"
            reports = evaluate(ckpt, out, args.engine, args.reuse, args.eager)
            secs = sum(r["elapsed_s"] for r in reports.values())
            print(f"{c} {name}: vqa {reports['vqa']['metrics']['accuracy']:.3f} ({secs:.0f} s)", flush=True)
            results.append((c, name, reports))
    print("\n| connector | checkpoint | VQA acc | " + " | ".join(h for _, h in VQA_COLS) + " |")
    print("|" + " --- |" * (3 + len(VQA_COLS)))
    print("\n".join(vqa_row(c, n, r) for c, n, r in results))
    print("\n| connector | checkpoint | CIDEr-D | BLEU-4 | POPE F1 random | popular | adversarial | POPE acc "
          "| yes-ratio | unparsed |")  # fmt: skip
    print("|" + " --- |" * 10)
    print("\n".join(caption_pope_row(c, n, r) for c, n, r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
