"""Long reliability runs: training and captioning under SIGKILL, a real full disk, and a server under load.

    .venv/bin/python bench/reliability.py train    # 3 random SIGKILLs + a truncated checkpoint + a full tmpfs
    .venv/bin/python bench/reliability.py caption  # 3 random SIGKILLs over a few hundred images, some unreadable
    .venv/bin/python bench/reliability.py load --checkpoint DIR [--concurrency 64] [--duration 60]

Each prints its figures and writes them as JSON to runs/reliability/NAME.json (RELIABILITY.md quotes them).
Every process it starts gets its own session, and is killed by process group, never by name. Run with
OMP_NUM_THREADS=1 on a shared machine.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "reliability"


def vlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "vlm.cli", *args]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    handle = open(log, "a")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_for(predicate, proc: subprocess.Popen, timeout: float, poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


def report(name: str, figures: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    width = max(len(k) for k in figures)
    print(f"\n== {name} ==")
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")


def noise_png(seed: int, size: int = 32) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def tiny_checkpoint(work: Path) -> Path:
    from vlm.build import build_base_model, save_checkpoint

    model, processor = build_base_model("clip", "llama", "mlp", seed=0)
    return save_checkpoint(model, processor, work / "base")


# -- training ------------------------------------------------------------------------------------------------


def metrics_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def train_cmd(work: Path, out: Path) -> list[str]:
    return vlm(
        "train", "stages/stage1.yaml", f"model={work / 'base'}", f"output_dir={out}",
        f"data=[{work / 'data' / 'caption_train.jsonl'}]", "micro_batch_size=4", "global_batch_size=8",
        "epochs=24", "save_every=5", "keep_checkpoints=3", "log_every=1", "--resume",
    )  # fmt: skip


def run_to_end(cmd: list[str], log: Path) -> subprocess.CompletedProcess:
    with open(log, "a") as handle:
        return subprocess.run(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, timeout=1800)


def truncate_newest_checkpoint(out: Path) -> str:
    newest = (out / "checkpoints" / "latest").read_text().strip()
    victim = max((out / "checkpoints" / newest).rglob("*model_states.pt"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return f"{newest}/{victim.name}"


def killed_run(work: Path, total: int, rng: random.Random) -> dict:
    """Three SIGKILLs at random points (during steps and during saves), a truncated newest checkpoint before
    the last resume, then a resume to the end."""
    out, log = work / "killed", work / "killed.log"
    kills, mid_save = [], 0
    for k in range(3):
        low = max(metrics_steps(out), 1) + 1
        target = rng.randint(low, max(low, total * (k + 2) // 5))
        proc = start(train_cmd(work, out), log)
        wait_for(lambda t=target: metrics_steps(out) >= t, proc, 900)
        if k == 2:  # the last kill aims at a save in progress (its staging directory has files)
            wait_for(lambda: any((out / "checkpoints" / ".staging").glob("step-*/*")), proc, 60, poll=0.002)
        else:
            time.sleep(rng.uniform(0, 0.4))  # lands in a step, a save, or between (a step takes ~0.1 s)
        kill_group(proc)
        kills.append(metrics_steps(out))
        mid_save += any((out / "checkpoints" / ".staging").glob("step-*/*"))  # killed while writing one
        if proc.returncode != -signal.SIGKILL or kills[-1] >= total:
            raise RuntimeError(f"kill {k + 1} did not land mid-run (rc {proc.returncode}); see {log}")
    truncated = truncate_newest_checkpoint(out)
    start_of_log = log.stat().st_size
    result = run_to_end(train_cmd(work, out), log)
    text = log.read_text()[start_of_log:]
    return {
        "kills_after_steps": kills,
        "kills_during_a_save": mid_save,
        "truncated": truncated,
        "fell_back": "falling back to the previous checkpoint" in text,
        "final_rc": result.returncode,
        "out": out,
    }


def compare(reference: dict[int, float], got: dict[int, float]) -> dict:
    common = sorted(set(reference) & set(got))
    diffs = [abs(reference[s] - got[s]) for s in common]
    return {
        "steps_reference": len(reference),
        "steps_faulted": len(got),
        "steps_missing": len(set(reference) - set(got)),
        "steps_bit_identical": sum(d == 0 for d in diffs),
        "max_abs_loss_diff": max(diffs) if diffs else None,
    }


def full_disk_run(work: Path, reference: dict[int, float]) -> dict:
    """A real ENOSPC: the run's output on a small tmpfs, filled up after the first checkpoint."""
    mount = work / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)]).returncode != 0:
        return {"full_disk": "skipped (mount -t tmpfs needs root)"}
    try:
        out, log = mount / "run", work / "enospc.log"
        proc = start(train_cmd(work, out), log)
        try:
            wait_for(lambda: (out / "checkpoints" / "latest").exists(), proc, 900)
            fill(mount / "filler", keep_free=256 * 1024)
            proc.wait(timeout=900)
        finally:
            kill_group(proc)
        text = log.read_text()
        from vlm.train.checkpoints import verify_manifest

        good = (out / "checkpoints" / "latest").read_text().strip()
        verify_manifest(out / "checkpoints" / good)  # raises if the last good checkpoint was touched
        if f"{good} is intact" not in text:
            raise RuntimeError(f"the full-disk error does not name {good} as intact; see {log}")
        (mount / "filler").unlink()
        resumed = run_to_end(train_cmd(work, out), log)
        figures = compare(reference, losses(out))
        return {
            "full_disk_exit_code": proc.returncode,
            "full_disk_message": next((ln for ln in text.splitlines() if "saving checkpoint" in ln), "")[
                -300:
            ],
            "full_disk_previous_intact": good,
            "full_disk_resume_rc": resumed.returncode,
            "full_disk_max_abs_loss_diff": figures["max_abs_loss_diff"],
            "full_disk_steps_missing": figures["steps_missing"],
        }
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def fill(path: Path, keep_free: int) -> None:
    """Write zeros until only keep_free bytes are left on path's filesystem."""
    chunk = b"\0" * (1 << 20)
    with open(path, "wb") as f:
        while shutil.disk_usage(path.parent).free > keep_free + len(chunk):
            f.write(chunk)
            f.flush()
        f.write(b"\0" * max(shutil.disk_usage(path.parent).free - keep_free, 0))


def cmd_train(args) -> int:
    from vlm.data.synth import generate

    work = Path(tempfile.mkdtemp(prefix="vlm-reliability-train-"))
    generate(work / "data", n=96, seed=0, n_eval=8, progress=False)
    tiny_checkpoint(work)
    rng = random.Random(args.seed)
    t0 = time.time()
    ref = run_to_end(train_cmd(work, work / "reference"), work / "reference.log")
    if ref.returncode:
        raise RuntimeError(f"the reference run failed; see {work / 'reference.log'}")
    reference = losses(work / "reference")
    faulted = killed_run(work, len(reference), rng)
    figures = {
        "seed": args.seed,
        **{k: v for k, v in faulted.items() if k != "out"},
        **compare(reference, losses(faulted["out"])),
        **full_disk_run(work, reference),
        "wall_s": round(time.time() - t0, 1),
        "workdir": str(work),
    }
    report("train", figures)
    ok = (
        faulted["final_rc"] == 0
        and figures["steps_missing"] == 0
        and figures["max_abs_loss_diff"] is not None
        and figures["max_abs_loss_diff"] <= 1e-6
    )
    return 0 if ok else 1


# -- captioning ------------------------------------------------------------------------------------------


def caption_inputs(images: Path, n_good: int) -> tuple[set[str], set[str]]:
    images.mkdir(parents=True)
    good = set()
    for i in range(n_good):
        path = images / f"img-{i:04d}.png"
        path.write_bytes(noise_png(i))
        good.add(str(path))
    bad = {
        "corrupt.png": b"not an image at all",
        "empty.png": b"",
        "truncated.png": noise_png(999, 64)[:300],
        "text.jpg": b"hello\n",
        "bomb.png": _png_header(100_000, 100_000),
    }
    for name, data in bad.items():
        (images / name).write_bytes(data)
    (images / "dir.png").mkdir()
    (images / "dangling.png").symlink_to(images / "nowhere.png")
    return good, {str(images / n) for n in [*bad, "dir.png", "dangling.png"]}


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def jsonl_paths(path: Path, strict: bool = False) -> list[str]:
    """The "source" (the path listed) of every line; strict: every line must parse (no torn or garbled line)."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line)["source"] for line in lines if strict or line.endswith("}")]


def cmd_caption(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="vlm-reliability-caption-"))
    good, bad = caption_inputs(work / "images", args.images)
    ckpt = tiny_checkpoint(work)
    out, errors, log = work / "captions.jsonl", work / "captions.jsonl.errors.jsonl", work / "caption.log"
    cmd = vlm("caption", str(ckpt), "--images", str(work / "images"), "--out", str(out))
    cmd += ["--batch-size", "8", "--max-tokens", "8", "--enforce-eager", "--dtype", "float32"]
    rng, kills, t0 = random.Random(args.seed), [], time.time()
    for k in range(3):
        done = len(jsonl_paths(out))
        target = rng.randint(done + 8, done + (len(good) - done) // 3)
        proc = start(cmd, log)
        wait_for(lambda t=target: len(jsonl_paths(out)) >= t, proc, 900)
        time.sleep(rng.uniform(0, 0.5))
        kill_group(proc)
        kills.append(len(jsonl_paths(out)))
        if proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"kill {k + 1} did not land mid-run (rc {proc.returncode}); see {log}")
    final = run_to_end(cmd, log)
    captions, failed = jsonl_paths(out, strict=True), jsonl_paths(errors, strict=True)
    figures = {
        "seed": args.seed,
        "images_readable": len(good),
        "images_unreadable": len(bad),
        "kills_after_lines": kills,
        "final_rc": final.returncode,
        "caption_lines": len(captions),
        "captions_missing": len(good - set(captions)),
        "captions_duplicated": len(captions) - len(set(captions)),
        "captions_for_unreadable": len(set(captions) & bad),
        "errors_lines": len(failed),
        "errors_missing": len(bad - set(failed)),
        "errors_duplicated": len(failed) - len(set(failed)),
        "wall_s": round(time.time() - t0, 1),
        "workdir": str(work),
    }
    report("caption", figures)
    lost = sum(
        figures[k]
        for k in figures
        if k.endswith(("_missing", "_duplicated")) or k == "captions_for_unreadable"
    )
    return 0 if final.returncode == 0 and lost == 0 else 1


# -- load ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_by_process(pid: int) -> dict[str, int]:
    """RSS of the server and each process it started, keyed by pid and name."""
    import psutil

    root, sizes = psutil.Process(pid), {}
    for process in [root, *root.children(recursive=True)]:
        try:
            sizes[f"{process.pid}:{process.name()}"] = process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return sizes


def tree_rss(pid: int) -> int:
    return sum(rss_by_process(pid).values())


class Load:
    """`concurrency` threads posting chat requests with images (1 in 8 a corrupt image) until told to stop."""

    def __init__(self, base: str, model: str, concurrency: int, max_tokens: int):
        self.base, self.model, self.concurrency, self.max_tokens = base, model, concurrency, max_tokens
        self.urls = [f"data:image/png;base64,{base64.b64encode(noise_png(i)).decode()}" for i in range(512)]
        self.bad = "data:image/png;base64," + base64.b64encode(noise_png(0)[:200]).decode()
        self.lock = threading.Lock()
        self.results: list[tuple[int, float, bool]] = []  # (status, seconds, hostile)

    def body(self, n: int, hostile: bool) -> bytes:
        url = self.bad if hostile else self.urls[n % len(self.urls)]
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "colour?"}]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}]}
        body |= {"max_tokens": self.max_tokens, "temperature": 0.0}
        return json.dumps(body).encode()

    def worker(self, w: int, stop: threading.Event) -> None:
        n, sent = w, 0
        while not stop.is_set():
            hostile = sent % 8 == 7  # every worker sends every 8th request with a corrupt image
            body = self.body(n, hostile)
            n, sent = n + self.concurrency, sent + 1
            request = urllib.request.Request(
                f"{self.base}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
            )
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=300) as r:
                    r.read()
                    status = r.status
            except urllib.error.HTTPError as err:
                status = err.code
            except OSError:
                status = 599  # connection refused/reset: counted with the 5xx
            with self.lock:
                self.results.append((status, time.perf_counter() - t0, hostile))

    def _done(self, deadline: float, requests: int | None) -> bool:
        return len(self.results) >= requests if requests else time.monotonic() >= deadline

    def run(self, seconds: float, requests: int | None = None) -> list[tuple[int, float, bool]]:
        """Load for `seconds`, or until `requests` have been answered when that is given."""
        self.results, stop = [], threading.Event()
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            for w in range(self.concurrency):
                pool.submit(self.worker, w, stop)
            deadline = time.monotonic() + seconds
            while not self._done(deadline, requests):
                time.sleep(0.2)
            stop.set()
        return self.results


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def cmd_load(args) -> int:
    port, log = free_port(), Path(tempfile.mkdtemp(prefix="vlm-reliability-load-")) / "server.log"
    ckpt = Path(args.checkpoint)
    cmd = vlm("serve", str(ckpt), "--port", str(port), "--dtype", "float32", "--max-model-len", "512")
    cmd += ["--vllm-arg=--max-num-seqs=64", *args.serve_arg]
    server = start(cmd, log)
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_for(lambda: _healthy(base), server, 900):
            raise RuntimeError(f"server did not start; see {log}")
        load = Load(base, ckpt.resolve().name, args.concurrency, args.max_tokens)
        load.run(args.warmup)
        by_process_warm = rss_by_process(server.pid)
        rss_warm = sum(by_process_warm.values())
        samples, by_requests, stop = [], [], threading.Event()
        sampler = threading.Thread(
            target=_sample_rss, args=(server.pid, samples, stop, load, by_requests), daemon=True
        )
        sampler.start()
        t0 = time.perf_counter()
        results = load.run(args.duration, args.requests)
        elapsed = time.perf_counter() - t0
        stop.set()
        sampler.join()
        by_process_end = rss_by_process(server.pid)
        api = next(k for k in by_process_end if k.startswith(f"{server.pid}:"))
        rss_end = sum(by_process_end.values())
        by_requests.append((len(results), rss_end))
        healthy_after = _healthy(base)
    finally:
        kill_group(server)
    good = [s for s, _, hostile in results if not hostile]
    latencies = sorted(t for s, t, hostile in results if not hostile and s == 200)
    figures = {
        "concurrency": args.concurrency,
        "duration_s": round(elapsed, 1),
        "max_tokens": args.max_tokens,
        "requests": len(results),
        "requests_per_s": round(len(results) / elapsed, 2),
        "status_200": good.count(200),
        "hostile_4xx": sum(1 for s, _, h in results if h and 400 <= s < 500),
        "hostile_not_4xx": sum(1 for s, _, h in results if h and not 400 <= s < 500),
        "valid_not_200": len(good) - good.count(200),
        "status_5xx": sum(1 for s, _, _ in results if s >= 500),
        "p50_latency_s": round(percentile(latencies, 50), 3) if latencies else None,
        "p99_latency_s": round(percentile(latencies, 99), 3) if latencies else None,
        "rss_after_warmup_mb": round(rss_warm / 2**20, 1),
        "rss_peak_mb": round(max(samples + [rss_end]) / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_growth_mb": round((rss_end - rss_warm) / 2**20, 1),
        "rss_growth_second_half_mb": round((rss_end - _at_half(by_requests)) / 2**20, 1),
        "rss_growth_by_process_mb": {
            k: round((v - by_process_warm.get(k, 0)) / 2**20, 1) for k, v in by_process_end.items()
        },
        "rss_timeline_mb": [round(x / 2**20) for x in samples[:: max(len(samples) // 12, 1)]],
        "rss_mb_by_requests": [[n, round(x / 2**20)] for n, x in _thin(by_requests, 20)],
        "api_server_growth_mb": round((by_process_end[api] - by_process_warm[api]) / 2**20, 1),
        "bounds_mb": {"total": args.rss_bound_mb, "second_half": args.steady_bound_mb, "api_server": 16},
        "healthy_after": healthy_after,
    }
    report(args.name, figures)
    print(rss_chart(figures["rss_mb_by_requests"]))
    ok = figures["status_5xx"] == 0 and figures["valid_not_200"] == 0 and figures["hostile_not_4xx"] == 0
    within = (
        figures["rss_growth_mb"] < args.rss_bound_mb
        and (figures["rss_growth_second_half_mb"] or 0) < args.steady_bound_mb
        and figures["api_server_growth_mb"] < 16  # the process our guard runs in
    )
    return 0 if ok and healthy_after and within else 1


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _sample_rss(pid: int, samples: list[int], stop: threading.Event, load: Load, by_requests: list) -> None:
    """Every 2 s: the server tree's RSS, also keyed by how many requests had been answered."""
    while not stop.wait(2.0):
        samples.append(tree_rss(pid))
        by_requests.append((len(load.results), samples[-1]))


def _at_half(by_requests: list[tuple[int, int]]) -> int:
    """RSS at the first sample past half of the requests (the soak's second half starts there)."""
    half = by_requests[-1][0] / 2
    return next(rss for n, rss in by_requests if n >= half)


def _thin(points: list, keep: int) -> list:
    """About `keep` evenly spaced points, always with the last."""
    step = max(len(points) // keep, 1)
    return points[::step] + ([points[-1]] if (len(points) - 1) % step else [])


def rss_chart(points: list[list[int]], width: int = 50) -> str:
    """A text chart of server RSS against requests answered (it goes into BENCHMARKS.md as is)."""
    low, high = min(mb for _, mb in points), max(mb for _, mb in points)
    span = max(high - low, 1)
    lines = [f"{'requests':>9}  {'RSS MiB':>7}  ({low} MiB at the left edge, {high} at the right)"]
    for n, mb in points:
        lines.append(f"{n:>9}  {mb:>7}  {'#' * (1 + round((mb - low) / span * (width - 1)))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="SIGKILL x3 + truncated checkpoint + full disk, losses vs uninterrupted")
    p.add_argument("--seed", type=int, default=int(time.time()) % 10_000)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("caption", help="SIGKILL x3 during captioning, exactly one line per image")
    p.add_argument("--seed", type=int, default=int(time.time()) % 10_000)
    p.add_argument("--images", type=int, default=300)
    p.set_defaults(func=cmd_caption)
    p = sub.add_parser("load", help="concurrent chat requests with images against vlm serve")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument(
        "--requests", type=int, help="soak: run until this many requests are answered (not --duration)"
    )
    p.add_argument("--name", default="load", help="figures go to runs/reliability/NAME.json")
    p.add_argument("--warmup", type=float, default=30.0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rss-bound-mb", type=float, default=300.0, help="server tree RSS growth after warm-up")
    p.add_argument("--steady-bound-mb", type=float, default=96.0, help="RSS growth over the second half")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `vlm serve` argument, repeatable")
    p.set_defaults(func=cmd_load)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
