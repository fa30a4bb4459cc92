"""Start-up to the first training step on a generated manifest of N records (issue 18 part 4).

    .venv/bin/python bench/startup.py [--records 100000] [--pool 64] [--procs 1] [--work /tmp/vlm-startup]

Data: `vlm data synth` makes a small pool of real synthetic images; the manifest repeats the pool's vqa records
N times with new ids, and each record points at its own symlink to a pool image, so the feature cache sees N
distinct image paths to hash (the page cache holds the pool's bytes: hashing reads RAM, not disk). Model: the
tiny clip + llama + mlp base, CPU, stage 1 (feature cache on, so both start-up costs are exercised).

Three runs of `vlm train ... max_steps=1`, each timed from launch to the first step's metrics row:
1. `data_cache=null`, cold feature cache: the old path, every rank encodes every record and (before this
   change) hashed every image;
2. cold `data_cache` (the encoding index is built), digests already indexed by run 1;
3. warm: both indexes exist, the steady state of every later run, resume and rank.
Plus the old eager hashing alone (`file_digest` over every path, in one process, nothing memoised).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepare(work: Path, n: int, pool: int) -> tuple[Path, Path]:
    """(manifest, base checkpoint), made once per work directory."""
    from vlm.build import build_base_model, save_checkpoint
    from vlm.data.synth import generate

    synth, manifest, base = work / "synth", work / f"manifest-{n}.jsonl", work / "base"
    if not synth.exists():
        generate(synth, n=pool, seed=0, n_eval=4, progress=False)
    if not manifest.exists():
        links = work / f"links-{n}"
        links.mkdir(exist_ok=True)
        pool_records = [json.loads(line) for line in (synth / "vqa_train.jsonl").read_text().splitlines()]
        with open(manifest.with_suffix(".tmp"), "w") as f:
            for i in range(n):
                r = dict(pool_records[i % len(pool_records)], id=f"r{i:06d}")
                link = links / f"{i:06d}.png"
                if not link.exists():
                    link.symlink_to((synth / r["image"]).resolve())
                r["image"] = str(link)
                f.write(json.dumps(r) + "\n")
        os.replace(manifest.with_suffix(".tmp"), manifest)
    if not (base / "config.json").exists():
        model, processor = build_base_model("clip", "llama", "mlp", seed=0)
        save_checkpoint(model, processor, base)
    return manifest, base


def to_first_step(
    work: Path, manifest: Path, base: Path, name: str, procs: int, *overrides: str
) -> tuple[float, float, float]:
    """(launch -> first step's metrics row, rank 0's data set-up, its feature cache set-up), in seconds."""
    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "vlm.cli", "train", "stages/stage1.yaml", f"output_dir={out}"]
    cmd += [
        f"model={base}",
        f"data=[{manifest}]",
        "micro_batch_size=8",
        "global_batch_size=16",
        "max_steps=1",
    ]
    cmd += ["max_length=256", *overrides, "--num-gpus", str(procs)]
    log = open(work / f"{name}.log", "w")
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):
        if proc.poll() is not None:
            raise SystemExit(f"{name}: training exited {proc.returncode} before a step; see {log.name}")
        time.sleep(0.1)
    elapsed = time.time() - started
    proc.wait()
    log.close()
    text = (work / f"{name}.log").read_text()
    data = re.search(r"training data: \d+ samples ready in ([\d.]+) s", text)
    cache = re.search(r"feature cache .*unreadable\), ([\d.]+) s", text)
    return elapsed, *(float(m.group(1)) if m else float("nan") for m in (data, cache))


def eager_hashing(manifest: Path) -> tuple[int, float]:
    """The old path's per-rank hashing: every distinct image path of the manifest, nothing memoised."""
    from vlm.train import feature_cache

    paths = sorted({json.loads(line)["image"] for line in manifest.read_text().splitlines()})
    feature_cache._DIGESTS.clear()
    started = time.time()
    for p in paths:
        feature_cache.file_digest(p)
    return len(paths), time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--pool", type=int, default=64)
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--work", default="/tmp/vlm-startup")
    parser.add_argument(
        "--repeat-warm", type=int, default=0, help="more warm runs, for the spread under load"
    )
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    manifest, base = prepare(work, args.records, args.pool)
    n_paths, hash_s = eager_hashing(manifest)
    caches = work / "caches"
    shutil.rmtree(caches, ignore_errors=True)
    features, encoded = f"feature_cache={caches / 'features'}", f"data_cache={caches / 'encoded'}"
    rows = [
        (
            "old: encode in every rank, hash every image",
            to_first_step(work, manifest, base, "old", args.procs, features, "data_cache=null"),
        ),
        (
            "new, first run: build the encoding index",
            to_first_step(work, manifest, base, "cold", args.procs, features, encoded),
        ),
        (
            "new, every later run: both indexes warm",
            to_first_step(work, manifest, base, "warm", args.procs, features, encoded),
        ),
    ]
    print(
        f"records {args.records}, image pool {args.pool} files behind {n_paths} paths, {args.procs} rank(s)"
    )
    print(f"old eager hashing alone (file_digest x {n_paths}, one process): {hash_s:.1f} s")
    print(f"{'run':48s} {'launch->step 1':>14s} {'data set-up':>11s} {'feature cache':>13s}  (s)")
    for label, (seconds, data_s, cache_s) in rows:
        print(f"{label:48s} {seconds:14.1f} {data_s:11.1f} {cache_s:13.1f}")


if __name__ == "__main__":
    main()
