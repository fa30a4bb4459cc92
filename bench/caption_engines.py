"""`vlm caption --engine ray` against the single-process engine, side by side on the same images and checkpoint.

    .venv/bin/python bench/caption_engines.py CKPT IMAGES_DIR [--n 600] [--batch-size 32] [--max-tokens 32]

Runs `vlm caption` on the first N images of IMAGES_DIR with `--engine local`, then `--engine ray` (a local Ray
instance the job starts), each from a fresh output file, and prints a markdown table: wall time, time to the first
results (engine start-up; Ray's own start and its actors' for the second), images/s after the first results, and
the ratio ray / local; then whether the captions are identical. Baseline: the single-process engine.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUMMARY = re.compile(
    r"captioned (\d+) images in ([\d.]+) s \(([\d.]+) images/s after the first results at ([\d.]+) s\)"
)


def run(engine: str, ckpt: str, manifest: Path, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "vlm.cli", "caption", ckpt, "--manifest", str(manifest), "--out", str(out)]
    cmd += ["--engine", engine, "--batch-size", str(args.batch_size), "--max-tokens", str(args.max_tokens)]
    cmd += ["--enforce-eager"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{engine}: exit {done.returncode}\n{done.stderr[-3000:]}")
    match = SUMMARY.search(done.stderr)
    n, _, rate, first = match.groups()
    captions = {json.loads(line)["id"]: json.loads(line)["caption"] for line in out.read_text().splitlines()}
    return {"n": int(n), "wall": wall, "first": float(first), "rate": float(rate), "captions": captions}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("images", type=Path)
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vlm-bench-caption-"))
    images = sorted(p for p in args.images.rglob("*.png"))[: args.n]
    manifest = work / "images.txt"
    manifest.write_text("".join(f"{p.resolve()}\n" for p in images))
    results = {e: run(e, args.checkpoint, manifest, work / f"{e}.jsonl", args) for e in ("local", "ray")}
    local, ray = results["local"], results["ray"]
    print(f"{len(images)} images, batch {args.batch_size}, max_tokens {args.max_tokens}, {args.checkpoint}\n")
    print("| engine | wall s | first results at s | images/s after | vs local |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        ratio = r["rate"] / local["rate"] if local["rate"] else float("nan")
        print(f"| {name} | {r['wall']:.1f} | {r['first']:.1f} | {r['rate']:.1f} | {ratio:.2f}x |")
    same = sum(ray["captions"].get(k) == v for k, v in local["captions"].items())
    print(f"\nidentical captions: {same} of {len(local['captions'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
