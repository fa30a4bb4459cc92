"""Does the two-stage recipe learn? For each connector: stage 1 + stage 2 with the shipped tiny recipes, then
VQA accuracy (official normalisation; one reference each, so exact match) on the held-out synthetic split,
against the untrained base checkpoint (the baseline).

    .venv/bin/python bench/train_learning.py [--connectors linear,mlp,qformer,perceiver] [--out runs/learning.json]

Needs `make demo`'s data and base checkpoints. Each connector takes ~5-10 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL = "data/synth/vqa_eval.jsonl"


def run(cmd: list[str]) -> float:
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - start


def accuracy(checkpoint: str) -> dict:
    from vlm.eval.engines import HFEngine
    from vlm.eval.report import evaluate

    report = evaluate(HFEngine(ROOT / checkpoint), "vqa", ROOT / EVAL)
    by_type = {
        k.split("=", 1)[1]: v["accuracy"]
        for k, v in report["slices"].items()
        if k.startswith("question_type=")
    }
    return {"accuracy": report["metrics"]["accuracy"], "by_type": by_type}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connectors", default="linear,mlp,qformer,perceiver")
    parser.add_argument("--out", default="runs/learning.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one run at a time uses both cores through torch anyway
    results = []
    for c in args.connectors.split(","):
        stage1 = run(["make", "stage1", f"CONNECTOR={c}"])
        stage2 = run(["make", "stage2", f"CONNECTOR={c}"])
        base, trained = accuracy(f"checkpoints/base-{c}"), accuracy(f"runs/{c}/stage2/final")
        results.append(
            {"connector": c, "stage1_s": stage1, "stage2_s": stage2, "base": base, "stage2": trained}
        )
        print(json.dumps(results[-1]), flush=True)
    Path(ROOT / args.out).write_text(json.dumps(results, indent=2))
    print(
        f"\n{'connector':<10} {'base':>6} {'stage 2':>8} {'colour':>7} {'shape':>6} {'count':>6} {'position':>9}"
    )
    for r in results:
        t = r["stage2"]["by_type"]
        print(
            f"{r['connector']:<10} {r['base']['accuracy']:>6.3f} {r['stage2']['accuracy']:>8.3f} "
            f"{t['colour']:>7.3f} {t['shape']:>6.3f} {t['count']:>6.3f} {t['position']:>9.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
