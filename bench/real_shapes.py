"""`make real-shapes` (issue 18): the whole path at real shapes, random weights from real config classes.

    python bench/real_shapes.py [--scale real|tiny] [--work DIR] [--write] [--out FILE]

real: the clip-vit-l-14-336 tower (576 image tokens) + the qwen2-0.5b LLM preset (24 x 896, GQA 14/2, tied
151,936-token embedding; the locally trained tokenizer fills its first ids) + the mlp connector. tiny: the tiny
clip + qwen2 presets, the same phases at a few seconds each (tests/test_real_shapes.py checks the wiring so).

Phases, each its own `vlm` command in a subprocess, in this order:
  data     `vlm data synth` at 336 px (real) / 32 px (tiny): 8 training scenes, one eval image per caption
  init     `vlm init --tower ... --llm ... --connector mlp`
  stage1   stages/stage1.yaml (ZeRO-2, 1 rank): only the connector learns, a few steps of one 336-px caption
  stage2   stages/stage2_lora.yaml under ZeRO-3 (bench/zero3_cpu_lowmem.json: stages/zero3.json with 5e7 live
           parameters, for the RAM), gradient checkpointing, 2 CPU ranks, one sample each per step: one record
           with an image, one text-only, so every step one rank's micro-batch is text-only (checked in its log)
  merge    `vlm export ADAPTER --merge-lora` (the adapter stage 2 saved; its final/ is merged already too)
  serve    `vlm serve` (vLLM, serve/cpu.yaml) and N concurrent image chats over HTTP (the openai client)
  caption  `vlm caption` on the eval images (offline vLLM)

Per phase: wall time and the peak memory of its process tree, sampled every 0.5 s with psutil: the largest sum
of PSS over the tree (each shared page split among the processes that map it: the tree's real footprint), the
largest sum of RSS (shared pages counted once per process: an upper bound) and the largest single process's RSS.
Training phases also get the time per optimizer step, from their metrics.jsonl. real: the budget is <= 30 min
and <= 20 GiB (the tree PSS), and the script exits 1 when a phase fails or the budget is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from request_path import photo, stop
from serve_throughput import free_port, machine

ROOT = Path(__file__).resolve().parents[1]
VLM = [sys.executable, "-m", "vlm.cli"]
GIB = 1024**3
SECTION = "## Real shapes (make real-shapes)"
BUDGET_S, BUDGET_BYTES = 30 * 60, 20 * GIB


@dataclass(frozen=True)
class Scale:
    tower: str
    llm: str
    image_size: int
    max_length: int  # 576 image tokens + the prompt and answer need ~700
    steps: int  # optimizer steps in each training stage
    lora_r: int
    chats: int
    captions: int
    max_model_len: int  # vLLM: the KV cache is sized for it (Qwen2's 32k would reserve it for nothing here)
    max_tokens: int


SCALES = {
    "real": Scale("clip-vit-l-14-336", "qwen2-0.5b", 336, 768, 3, 128, 4, 8, 2048, 16),
    "tiny": Scale("clip", "qwen2", 32, 256, 2, 8, 2, 2, 512, 8),
}


# -- measuring ---------------------------------------------------------------------------------------------------
@dataclass
class Phase:
    name: str
    command: str
    wall_s: float = 0.0
    tree_pss: int = 0  # the largest sum of PSS over the process tree: shared pages split among their users
    tree_rss: int = 0  # the largest sum of RSS over the process tree (shared pages counted once per process)
    max_rss: int = 0  # the largest single process
    ok: bool = False
    steps: list[float] = field(default_factory=list)  # training: seconds per optimizer step
    note: str = ""


class TreeSampler:
    """Peak memory of a process and all its descendants, sampled on a thread until stopped."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.root, self.interval = psutil.Process(pid), interval
        self.tree_pss = self.tree_rss = self.max_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss, pss = [], []
            for p in procs:
                try:
                    full = p.memory_full_info()  # Linux: from /proc/PID/smaps_rollup
                    rss.append(full.rss)
                    pss.append(full.pss)
                except psutil.NoSuchProcess:
                    pass
            if rss:
                self.tree_rss, self.max_rss = max(self.tree_rss, sum(rss)), max(self.max_rss, max(rss))
                self.tree_pss = max(self.tree_pss, sum(pss))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_phase(phase: Phase, cmd: list[str], log: Path, env: dict | None = None) -> Phase:
    """Run one command to completion, its output in `log`, measured."""
    print(f"[{phase.name}] {phase.command}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = TreeSampler(proc.pid)
        rc = proc.wait()
        sampler.stop()
    phase.wall_s, phase.ok = time.perf_counter() - t0, rc == 0
    phase.tree_pss, phase.tree_rss, phase.max_rss = sampler.tree_pss, sampler.tree_rss, sampler.max_rss
    status = "ok" if phase.ok else f"FAILED (exit {rc}), log: {log}"
    print(
        f"[{phase.name}] {phase.wall_s:.1f} s, peak tree PSS {phase.tree_pss / GIB:.2f} GiB: {status}",
        flush=True,
    )
    if not phase.ok:
        print(log.read_text()[-3000:], file=sys.stderr)
    return phase


def step_times(run_dir: Path) -> list[float]:
    """Seconds per optimizer step from metrics.jsonl's cumulative elapsed_s."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    elapsed = [0.0] + [r["elapsed_s"] for r in rows]
    return [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]


# -- the phases --------------------------------------------------------------------------------------------------
def leaked_shm_buffers(logs: list[Path]) -> list[str]:
    """DeepSpeed's CPU allreduce buffers left in /dev/shm by the runs in these launcher logs (by master port)."""
    ports = {m for log in logs for m in re.findall(r"--master_port[= ](\d+)", log.read_text())}
    return sorted(
        p.name for port in ports for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")
    )


def two_record_mix(data: Path) -> Path:
    """One VQA record with its image and one text-only record: with 2 ranks and one sample each per step, one
    rank gets the image and the other a text-only micro-batch, every step."""
    first = lambda name: json.loads((data / name).read_text().splitlines()[0])  # noqa: E731
    mix = data / "mix_text_only.jsonl"
    mix.write_text(json.dumps(first("vqa_train.jsonl")) + "\n" + json.dumps(first("text_train.jsonl")) + "\n")
    return mix


def train_cmd(
    recipe: str, model: Path, out: Path, data: Path, s: Scale, procs: int, *extra: str
) -> list[str]:
    return [*VLM, "train", f"stages/{recipe}.yaml", f"model={model}", f"output_dir={out}", f"data=[{data}]",
            f"max_steps={s.steps}", "micro_batch_size=1", f"global_batch_size={procs}", f"max_length={s.max_length}",
            "save_every=0", "log_every=1", *extra, "--num-gpus", str(procs)]  # fmt: skip


async def chats(base: str, n: int, max_tokens: int) -> list[tuple[float, int]]:
    """n concurrent chats, one 640x480 JPEG each; (seconds, completion tokens) per chat."""
    import base64

    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=1800)

    async def one(i: int) -> tuple[float, int]:
        url = "data:image/jpeg;base64," + base64.b64encode(photo(i)).decode()
        content = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "What is shown?"},
        ]
        t0 = time.perf_counter()
        reply = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
            temperature=0.0, extra_body={"ignore_eos": True},  # random weights never stop on their own
        )  # fmt: skip
        return time.perf_counter() - t0, reply.usage.completion_tokens

    try:
        return list(await asyncio.gather(*(one(i) for i in range(n))))
    finally:
        await client.close()


def wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 1200) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"server not ready after {timeout:.0f} s; log: {log}")


def serve_phase(ckpt: Path, s: Scale, logs: Path) -> Phase:
    """`vlm serve` until /health answers, then the concurrent chats; measured from launch to the last reply."""
    port, log = free_port(), logs / "serve.log"
    cmd = [*VLM, "serve", str(ckpt), "--config", "serve/cpu.yaml", "--port", str(port),
           "--max-model-len", str(s.max_model_len), "--served-model-name", "m"]  # fmt: skip
    phase = Phase("serve", f"vlm serve CKPT --config serve/cpu.yaml --max-model-len {s.max_model_len}, then "
                  f"{s.chats} concurrent image chats (640x480 JPEG, max_tokens {s.max_tokens}, ignore_eos)")  # fmt: skip
    print(f"[serve] {phase.command}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    sampler = TreeSampler(proc.pid)
    try:
        wait_ready(proc, port, log)
        ready = time.perf_counter() - t0
        replies = asyncio.run(chats(f"http://127.0.0.1:{port}", s.chats, s.max_tokens))
        phase.ok = len(replies) == s.chats and all(tokens == s.max_tokens for _, tokens in replies)
        phase.note = (f"ready after {ready:.0f} s; the {s.chats} chats took "
                      f"{', '.join(f'{t:.1f}' for t, _ in replies)} s, {s.max_tokens} tokens each")  # fmt: skip
    except Exception as err:  # noqa: BLE001  reported as the phase's failure; the table is still written
        phase.note = f"{type(err).__name__}: {str(err)[-500:]} (log: {log})"
        print(phase.note, file=sys.stderr)
    finally:
        sampler.stop()
        stop(proc)
    phase.wall_s = time.perf_counter() - t0
    phase.tree_pss, phase.tree_rss, phase.max_rss = sampler.tree_pss, sampler.tree_rss, sampler.max_rss
    print(
        f"[serve] {phase.wall_s:.1f} s, peak tree PSS {phase.tree_pss / GIB:.2f} GiB: {phase.note}",
        flush=True,
    )
    return phase


def run_all(s: Scale, work: Path) -> list[Phase]:
    data, logs = work / "data", work / "logs"
    logs.mkdir(parents=True)
    phases: list[Phase] = []

    def go(name: str, shown: str, cmd: list[str]) -> bool:
        phases.append(run_phase(Phase(name, shown), cmd, logs / f"{name}.log"))
        return phases[-1].ok

    size = s.image_size
    if not go("data", f"vlm data synth --n 8 --n-eval {s.captions} --sizes {size}",
              [*VLM, "data", "synth", "--out", str(data), "--n", "8", "--n-eval", str(s.captions),
               "--sizes", str(size), "--quiet"]):  # fmt: skip
        return phases
    base = work / "base-mlp"
    if not go("init", f"vlm init --tower {s.tower} --llm {s.llm} --connector mlp",
              [*VLM, "init", "--tower", s.tower, "--llm", s.llm, "--connector", "mlp", "--out", str(base)]):  # fmt: skip
        return phases
    stage1 = work / "stage1"
    if not go("stage1", f"vlm train stages/stage1.yaml max_steps={s.steps} micro_batch_size=1 global_batch_size=1 "
              f"max_length={s.max_length} feature_cache=null --num-gpus 1",
              train_cmd("stage1", base, stage1, data / "caption_train.jsonl", s, 1, "feature_cache=null")):  # fmt: skip
        return phases
    phases[-1].steps = step_times(stage1)
    stage2 = work / "stage2_lora"
    lora = [
        f"lora.r={s.lora_r}",
        f"lora.alpha={2 * s.lora_r}",
        "deepspeed=bench/zero3_cpu_lowmem.json",
        f"epochs={s.steps}",
        # stages/zero3.json keeps up to 1e9 gathered parameters live (the whole 0.8B model on every rank): each
        # rank reached ~9.5 GB and the 24 GiB box, shared with other work, OOM-killed rank 0 (twice, the second
        # time with checkpointing too). bench/zero3_cpu_lowmem.json is it with 5e7 live / reuse / buckets.
        "gradient_checkpointing=true",
    ]
    if not go("stage2", f"vlm train stages/stage2_lora.yaml deepspeed=bench/zero3_cpu_lowmem.json lora.r={s.lora_r} "
              f"lora.alpha={2 * s.lora_r} max_steps={s.steps} micro_batch_size=1 global_batch_size=2 "
              f"max_length={s.max_length} gradient_checkpointing=true --num-gpus 2 (one image record, one text-only)",
              train_cmd("stage2_lora", stage1 / "final", stage2, two_record_mix(data), s, 2, *lora)):  # fmt: skip
        return phases
    phase = phases[-1]
    phase.steps = step_times(stage2)
    text_only = (logs / "stage2.log").read_text().count("text-only micro-batches by rank")
    phase.note = f"steps with a text-only rank in the log: {text_only} of {s.steps}"
    leaked = leaked_shm_buffers([logs / "stage1.log", logs / "stage2.log"])
    if leaked:
        phase.note += f"; DeepSpeed shm buffers left in /dev/shm: {leaked}"
    phase.ok = text_only == s.steps and not leaked
    if not phase.ok:
        return phases
    merged = work / "merged"
    if not go("merge", "vlm export stage2_lora/adapter --merge-lora",
              [*VLM, "export", str(stage2 / "adapter"), "--merge-lora", "--out", str(merged)]):  # fmt: skip
        return phases
    phases.append(serve_phase(merged, s, logs))
    captions = work / "captions.jsonl"
    if go("caption", f"vlm caption --images EVAL_DIR ({s.captions} images) --max-model-len {s.max_model_len} "
          f"--max-tokens {s.max_tokens}",
          [*VLM, "caption", str(merged), "--images", str(data / "images" / "eval"), "--out", str(captions),
           "--max-model-len", str(s.max_model_len), "--max-tokens", str(s.max_tokens)]):  # fmt: skip
        lines = captions.read_text().splitlines()
        phases[-1].ok = len(lines) == s.captions
        phases[-1].note = f"{len(lines)} captions written"
    return phases


# -- report ------------------------------------------------------------------------------------------------------
def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def table(phases: list[Phase]) -> list[str]:
    rows = ["| phase | command | wall s | peak PSS, tree GiB | peak RSS sum, tree GiB | largest process RSS GiB "
            "| s / step | ok | notes |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]  # fmt: skip
    for p in phases:
        per_step = ""
        if p.steps:
            rest = p.steps[1:] or p.steps
            per_step = (
                f"{', '.join(f'{t:.1f}' for t in p.steps)} (after the first: {sum(rest) / len(rest):.1f})"
            )
        rows.append(f"| {p.name} | `{p.command}` | {p.wall_s:.0f} | {gib(p.tree_pss)} | {gib(p.tree_rss)} | "
                    f"{gib(p.max_rss)} | "
                    f"{per_step} | {'yes' if p.ok else '**no**'} | {p.note} |")  # fmt: skip
    total = sum(p.wall_s for p in phases)
    peak = max((p.tree_pss for p in phases), default=0)
    rows.append(f"| total | | {total:.0f} | {gib(peak)} (max) | | | | | |")
    return rows


def budget_lines(phases: list[Phase], scale: str, expected: int) -> tuple[list[str], bool]:
    total, peak = sum(p.wall_s for p in phases), max((p.tree_pss for p in phases), default=0)
    done = len(phases) == expected and all(p.ok for p in phases)
    lines = [
        f"- Every phase ran and passed its check: **{'yes' if done else 'no'}** ({len(phases)} of {expected})."
    ]
    if scale != "real":
        return lines, done
    in_time, in_memory = total <= BUDGET_S, peak <= BUDGET_BYTES
    lines += [f"- Wall time {total / 60:.1f} min (budget 30 min): **{'met' if in_time else 'missed'}**.",
              f"- Peak tree PSS {gib(peak)} GiB (budget 20 GiB): **{'met' if in_memory else 'missed'}**."]  # fmt: skip
    return lines, done and in_time and in_memory


def write_section(path: Path, text: str) -> None:
    """Replace (or append) the section in BENCHMARKS.md."""
    doc = path.read_text()
    if SECTION in doc:
        head, rest = doc.split(SECTION, 1)
        tail = rest[rest.find("\n## ") :] if "\n## " in rest else "\n"
        doc = head + text + tail
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(doc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="real")
    parser.add_argument("--work", type=Path, default=None, help="default: a fresh directory under $TMPDIR")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (checkpoints, logs)")
    parser.add_argument("--write", action="store_true", help=f"put the table in BENCHMARKS.md ({SECTION!r})")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args()
    s = SCALES[args.scale]
    work = args.work or Path(tempfile.mkdtemp(prefix=f"vlm-real-shapes-{args.scale}-"))
    if args.work and work.exists():
        shutil.rmtree(work)
    started = datetime.datetime.now(datetime.timezone.utc)
    load0 = os.getloadavg()[0]
    try:
        phases = run_all(s, work)
    finally:
        if not args.keep:
            shutil.rmtree(work / "base-mlp", ignore_errors=True)  # the checkpoints: GBs at real scale
            for name in ("stage1", "stage2_lora", "merged"):
                shutil.rmtree(work / name, ignore_errors=True)
    verdict, ok = budget_lines(phases, args.scale, expected=7)
    md = [SECTION, "",
          f"`python bench/real_shapes.py --scale {args.scale}` ({'`make real-shapes`' if args.scale == 'real' else 'tiny'}), "
          f"{started:%Y-%m-%d %H:%M} UTC. Machine: {machine()}, {psutil.virtual_memory().total / GIB:.0f} GiB RAM; "
          f"1-min load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other work shares the "
          f"cores: wall times are upper bounds).",
          f"Model: tower `{s.tower}`, LLM `{s.llm}`, connector mlp, random init; images {s.image_size} px; "
          f"max_length {s.max_length}; {s.steps} steps per stage. Peak memory: psutil every 0.5 s over the phase's "
          f"process tree: the sum of PSS (the budget), the sum of RSS (shared pages counted once per process, an "
          f"upper bound) and the largest process's RSS.",
          "", *table(phases), "", *verdict]  # fmt: skip
    text = "\n".join(md)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", text)
    print(f"\nlogs in {work / 'logs'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
