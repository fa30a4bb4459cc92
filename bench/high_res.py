"""Image policy x connector -> fine-detail accuracy, ordinary VQA, and what the tokens cost (issue 19).

    .venv/bin/python bench/high_res.py [--arms single-mlp,anyres-mlp,anyres-pool2-mlp] [--work runs/high_res]
        [--data data/hires] [--engine vllm|hf] [--seeds 0,1,2] [--out FILE]

Every arm is the same recipe on the same data, only the image policy (and connector) differs:
  init     `vlm init --tower runs/stage0/final --llm runs/lm/final` (make stage0 lm: the demo's pretrained parts)
  stage1   stages/stage1.yaml on the captions (max_length 256: a 64 px scene under anyres is 82 tokens)
  stage2   bench/high_res_stage2.yaml: short-answer VQA, yes/no, multi-image and fine-detail digit questions
  eval     `vlm eval --task vqa` on detail_eval.jsonl (one noisy 5x7 px digit on a 128 px canvas), vqa_eval.jsonl and
           multi_eval.jsonl (2 and 4 images)
With several --seeds every arm is trained once per seed (the init and the recipe's `seed`: connector init and data
order), seed 0 in `WORK/ARM`, seed k in `WORK/ARM-seedk`, and the table adds each arm's mean and range.
Each step is skipped when its output exists, so a rerun resumes. The data is `vlm data synth --n 6000
--fine-detail 8000` (made when --data has none). The table goes to stdout and, with --out, to a markdown file,
followed by ordinary VQA per question type in seen against held-out phrasings (the pixels against the language).
The token and KV columns come from `vlm.budget` for the arm's checkpoint; encoder and prefill ms from
`vlm.budget.measure` on this machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VLM = [sys.executable, "-m", "vlm.cli"]
TOWER, LLM = "runs/stage0/final", "runs/lm/final"
GRIDS = "1x1,2x2,3x3,4x4"  # 32 px scene: 1x1; 48-64 px: 2x2; the 128 px digit canvas: 4x4 (native)
ARMS = {  # name -> vlm init options after --connector
    "single-mlp": ["--connector", "mlp"],
    "anyres-mlp": ["--connector", "mlp", "--image-policy", "anyres", "--grids", GRIDS],
    "anyres-pool2-mlp": ["--connector", "mlp", "--image-policy", "anyres", "--grids", GRIDS, "--pool", "2"],
    "single-qformer": ["--connector", "qformer"],
    "anyres-qformer": ["--connector", "qformer", "--image-policy", "anyres", "--grids", GRIDS],
}
DEFAULT_ARMS = "single-mlp,anyres-mlp,anyres-pool2-mlp"
STAGE2 = "bench/high_res_stage2.yaml"
EVALS = {
    "detail": "detail_eval",
    "vqa": "vqa_eval",
    "multi": "multi_eval",
}  # each scored by vlm eval --task vqa
VQA_SLICES = ("colour", "shape", "count", "position")


def run(cmd: list[str], log: Path) -> float:
    """Run a vlm command with its output in `log`; returns the wall seconds. A failure names the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd[2:5])} ... failed (exit {proc.returncode}); see {log}")
    return time.monotonic() - t0


def ensure_data(data: Path) -> None:
    if (data / "detail_train.jsonl").is_file():
        return
    print(f"making {data} (vlm data synth --n 6000 --fine-detail 8000)", flush=True)
    run([*VLM, "data", "synth", "--out", str(data), "--n", "6000", "--fine-detail", "8000", "--quiet"],
        data / "synth.log")  # fmt: skip


def arm_dir(work: Path, arm: str, seed: int) -> Path:
    return work / (arm if seed == 0 else f"{arm}-seed{seed}")


def train_arm(arm: str, seed: int, work: Path, data: Path) -> dict[str, float]:
    """init, stage 1, stage 2 for one arm; returns the minutes of each training stage (kept in times.json)."""
    out = arm_dir(work, arm, seed)
    times_file = out / "times.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    base = out / "base"
    if not (base / "config.json").is_file():
        run([*VLM, "init", "--tower", TOWER, "--llm", LLM, *ARMS[arm], "--seed", str(seed), "--out", str(base)],
            out / "init.log")  # fmt: skip
    stages = [
        ("stage1", "stages/stage1.yaml", base, [f"data=[{data}/caption_train.jsonl]", "max_length=256"]),
        ("stage2", STAGE2, out / "stage1/final", [_stage2_data(data)]),
    ]
    for name, recipe, model, extra in stages:
        if (out / name / "final/config.json").is_file():
            continue
        print(f"{out.name}: {name}", flush=True)
        cmd = [*VLM, "train", recipe, f"model={model}", f"output_dir={out / name}", f"seed={seed}", *extra]
        times[name] = run(cmd, out / f"{name}.log") / 60
        times_file.write_text(json.dumps(times, indent=2) + "\n")
    return times


def _stage2_data(data: Path) -> str:
    """The recipe's sources and weights, with their files taken from `data`."""
    sources = yaml.safe_load((ROOT / STAGE2).read_text())["data"]
    parts = ",".join(f"{{path: {data / Path(s['path']).name}, weight: {s['weight']}}}" for s in sources)
    return f"data=[{parts}]"


def evaluate(out: Path, data: Path, engine: str) -> dict[str, dict]:
    """`vlm eval` of the arm directory `out`'s stage 2 model on each eval file; resumes from the saved reports."""
    ckpt, out = out / "stage2/final", out / "eval"
    files = {name: data / f"{file}.jsonl" for name, file in EVALS.items()}
    reports = {}
    for name, file in files.items():
        report = out / f"{name}.json"
        if not report.is_file():
            cmd = [*VLM, "eval", str(ckpt), "--engine", engine, "--quiet"]
            cmd += ["--task", "vqa", "--data", str(file), "--out", str(report)]
            run(cmd, out / f"{name}.log")
        full = json.loads(report.read_text())
        reports[name] = full["slices"]
        if name == "vqa":
            reports["vqa_by_phrasing"] = by_phrasing(full["predictions"])
    return reports


def by_phrasing(predictions: list[dict]) -> dict[str, float]:
    """Mean VQA score per "question type/phrasing" (colour/seen, colour/heldout, ...) from a report's predictions:
    a seen-phrasing slice asks what the pixels cost, a held-out one what the language learned."""
    groups: dict[str, list[float]] = {}
    for p in predictions:
        s = p["slices"]
        groups.setdefault(f"{s.get('question_type')}/{s.get('phrasing')}", []).append(p["score"])
    return {k: sum(v) / len(v) for k, v in groups.items()}


def canvas(data: Path) -> int:
    """The fine-detail canvas side the data was made with."""
    return json.loads((data / "manifest.json").read_text())["fine_detail"]["canvas"]


def cost(out: Path, side: int) -> dict[str, float]:
    """Visual tokens, KV MiB and measured encoder / prefill ms for a digit canvas and a 64 px scene."""
    from vlm.budget import measure

    ckpt = out / "stage2/final"
    row = {}
    for key, px in (("detail", side), ("scene", 64)):
        m = measure(str(ckpt), px, px, threads=1)  # 2 threads on a shared 2-core box measure contention
        row[f"{key}_tokens"] = m.visual_tokens
        row[f"{key}_kv_mib"] = m.kv_mib
        row[f"{key}_encoder_ms"] = m.encoder_ms
        row[f"{key}_prefill_ms"] = m.prefill_ms
        row[f"{key}_requests"] = m.requests_in_budget
    return row


def accuracies(r: dict) -> list[float]:
    """The accuracy columns of one trained arm, in table order."""
    d, v = r["detail"], r["vqa"]
    return [
        d["overall"]["accuracy"],
        d.get("phrasing=heldout", {}).get("accuracy", float("nan")),
        v["overall"]["accuracy"],
        *(v[f"question_type={q}"]["accuracy"] for q in VQA_SLICES),
        *(r["multi"][f"num_images={k}"]["accuracy"] for k in (2, 4)),
    ]


def _spread(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def table(rows: list[dict], side: int) -> str:
    """One line per arm and seed; with several seeds of an arm, a line of its means (and ranges) after them."""
    px = f"{side} px"
    head = (
        "| arm | seed | digit acc | digit, held-out phrasing | VQA overall | "
        + " | ".join(VQA_SLICES)
        + f" | multi-image 2 / 4 images | tokens {px} / 64 px | KV MiB {px} | encoder ms {px} | prefill ms {px} "
        "| requests / KV budget | stage 1 + 2 min |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        group = [r for r in rows if r["arm"] == arm]
        group_acc = [accuracies(r) for r in group]
        for r, acc in zip(group, group_acc, strict=True):
            minutes = r["times"].get("stage1", 0) + r["times"].get("stage2", 0)
            cells = [arm, str(r["seed"]), *(f"{a:.3f}" for a in acc[:-2]), f"{acc[-2]:.3f} / {acc[-1]:.3f}"]
            cells += [
                f"{r['detail_tokens']} / {r['scene_tokens']}",
                f"{r['detail_kv_mib']:.2f}",
                f"{r['detail_encoder_ms']:.1f}",
                f"{r['detail_prefill_ms']:.1f}",
                f"{r['detail_requests']}",
                f"{minutes:.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if len(group) > 1:
            columns = list(zip(*group_acc, strict=True))
            cells = [f"**{arm}**", f"mean of {len(group)}", *(_spread(list(c)) for c in columns[:-2])]
            cells += [f"{_spread(list(columns[-2]))} / {_spread(list(columns[-1]))}", *[""] * 6]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def phrasing_table(rows: list[dict]) -> str:
    """Ordinary VQA per question type, seen against held-out phrasings; one line per arm and seed, then means."""
    from vlm.data.synth_text import PHRASINGS  # the phrasing names vqa_eval's records carry

    cols = [f"{q}/{ph}" for q in VQA_SLICES for ph in PHRASINGS]
    head = "| arm | seed | " + " | ".join(c.replace("/", ", ") for c in cols) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        members = [r for r in rows if r["arm"] == arm]
        group = [[r["vqa_by_phrasing"].get(c, float("nan")) for c in cols] for r in members]
        lines += [
            f"| {arm} | {r['seed']} | " + " | ".join(f"{a:.3f}" for a in acc) + " |"
            for r, acc in zip(members, group, strict=True)
        ]
        if len(group) > 1:
            means = [_spread(list(c)) for c in zip(*group, strict=True)]
            lines.append(f"| **{arm}** | mean of {len(group)} | " + " | ".join(means) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--work", type=Path, default=ROOT / "runs/high_res")
    ap.add_argument("--data", type=Path, default=ROOT / "data/hires")
    ap.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds, e.g. 0,1,2 (default 0)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = ap.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    for part in (TOWER, LLM):
        if not (ROOT / part / "config.json").is_file():
            ap.error(f"{part} is missing: run `make stage0 lm` first (the demo's pretrained tower and LLM)")
    try:
        seeds = list(dict.fromkeys(int(x) for x in args.seeds.split(",") if x.strip()))
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        ap.error(f"--seeds {args.seeds!r}: expected comma-separated integers >= 0 such as 0,1,2")
    ensure_data(args.data)
    side = canvas(args.data)
    rows = []
    for arm in arms:
        for seed in seeds:
            times = train_arm(arm, seed, args.work, args.data)
            out = arm_dir(args.work, arm, seed)
            reports = evaluate(out, args.data, args.engine)
            rows.append({"arm": arm, "seed": seed, "times": times, **reports, **cost(out, side)})
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"`python bench/high_res.py --arms {','.join(arms)} --seeds {args.seeds} --engine {args.engine}`, {stamp}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores\n\n{table(rows, side)}\n\n"
        f"Ordinary VQA (vqa_eval) by question type and phrasing:\n\n{phrasing_table(rows)}\n"
    )
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
