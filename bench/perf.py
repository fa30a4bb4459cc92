"""`make bench`: the performance suite on the CPU, one table of side-by-side ratios against named baselines.

    .venv/bin/python bench/perf.py [--only train_step,feature_cache,serving,token_budget] [--no-write]

Each measured phase runs in its own subprocess (`--phase NAME`), so its peak memory is its own: the peak of the
summed RSS of the phase's process tree (launcher ranks and vLLM's engine processes included), sampled every
0.2 s; on a GPU, torch.cuda.max_memory_allocated. Phases of one comparison alternate (A, B, A, B) so drift in
the machine's load hits both alike, and the median is kept.

1. training step: ours (VLMForConditionalGeneration) vs transformers' LlavaForConditionalGeneration with the
   same tiny config and weights (`vlm export --to llava-hf`'s conversion), on the same batch (goal <= 1.0);
2. stage 1 through `vlm train` (DeepSpeed launcher): epoch time with the feature cache vs without (goal >= 2x
   from the 2nd epoch);
3. serving: `vlm serve` (vLLM + plugin) vs transformers `generate()` at concurrency 1, 8, 32
   (bench/serve_throughput.py's code, fewer requests);
4. visual-token budget: the same LLM served with mlp (all 576 patches), qformer (32) and perceiver (64);
plus the padding fraction with and without packing (bench/padding_report.py). Results go into BENCHMARKS.md
("## Performance (make bench)").
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

TRAIN_SAMPLES = 1536  # synthetic caption scenes for the stage 1 epochs (24 steps of 64 per epoch)
SERVE_REQUESTS, SERVE_TOKENS = 32, 16  # bench/serve_throughput.py: 32 x 64 tokens, 2-3 rounds
BUDGET_LLM = (256, 4)  # width, layers of the LLM behind the 576-patch tower (a 576-token prefill per image)
PHASES = ("train_step", "feature_cache", "serving", "token_budget")


# -- peak memory ---------------------------------------------------------------------------------------------
class PeakRSS:
    """Peak of the summed RSS of this process and all its descendants, sampled in a background thread."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def peak_memory_mib(rss: PeakRSS) -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return rss.peak / 2**20


def cpu_clock() -> float:
    """This process's CPU seconds (one thread): on a machine shared with other jobs, wall time measures the
    queue for the cores rather than the work, CPU time the work. (GPU phases would use wall time.)"""
    return time.process_time()


# -- shared inputs (built once by the driver) ----------------------------------------------------------------
def prepare(work: Path) -> dict[str, str]:
    from serve_throughput import build_checkpoint

    from vlm.build import build_base_model, save_checkpoint
    from vlm.data.synth import generate

    generate(work / "data", n=TRAIN_SAMPLES, seed=0, n_eval=8, progress=False)
    model, processor = build_base_model("clip", "llama", "mlp", seed=0)
    paths = {"data": str(work / "data"), "base": str(save_checkpoint(model, processor, work / "base-mlp"))}
    paths["serve"] = build_checkpoint(work, 512, 8)
    build_checkpoint(work, *BUDGET_LLM)  # writes the LLM the token-budget checkpoints share
    for connector in ("mlp", "qformer", "perceiver"):
        paths[f"budget-{connector}"] = budget_checkpoint(work, connector)
    return paths


def budget_checkpoint(work: Path, connector: str) -> str:
    """One LLM (BUDGET_LLM) behind a 576-patch tower (336 px, patch 14: LLaVA-1.5's grid, tiny width)."""
    from vlm.build import build_base_model, save_checkpoint
    from vlm.connectors import get_connector_class
    from vlm.presets import _TINY_VISION, TOWER_PRESETS, Preset

    TOWER_PRESETS.setdefault(
        "clip-576", Preset("clip_vision_model", {**_TINY_VISION, "image_size": 336, "patch_size": 14}, True)
    )
    options = dict(get_connector_class(connector).tiny_overrides)
    llm = work / f"llama-{BUDGET_LLM[0]}x{BUDGET_LLM[1]}"
    model, processor = build_base_model("clip-576", str(llm), connector, 0, options)
    return str(save_checkpoint(model, processor, work / f"budget-{connector}"))


# -- phase 1: training step ----------------------------------------------------------------------------------
def step_batch(paths: dict, n: int = 32):
    from vlm.data.collate import Collator
    from vlm.data.records import load_llava_dataset
    from vlm.data.samples import SupervisedDataset
    from vlm.processing import VLMProcessor

    processor = VLMProcessor.from_pretrained(paths["base"])
    records = load_llava_dataset(str(Path(paths["data"]) / "caption_train.jsonl"))
    ds = SupervisedDataset(records.select(range(n)), processor, "plain", max_length=128)
    return Collator(processor.tokenizer.pad_token_id)([ds[i] for i in range(n)])


def time_steps(model, inputs: dict, trainable, steps: int = 12, warmup: int = 3) -> tuple[float, float]:
    """(median step seconds, first loss) of forward + backward + AdamW over `trainable` parameters."""
    import torch

    model.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    times, first = [], None
    for i in range(warmup + steps):
        t0 = cpu_clock()
        loss = model(**inputs, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        first = float(loss.detach()) if first is None else first
        if i >= warmup:
            times.append(cpu_clock() - t0)
    return statistics.median(times), first


def phase_train_step(paths: dict, impl: str) -> dict:
    import torch

    from vlm.data.collate import model_inputs
    from vlm.export import to_llava_hf
    from vlm.model import VLMForConditionalGeneration

    batch = model_inputs(step_batch(paths))
    out = {}
    for mode in ("stage1", "full"):
        torch.manual_seed(0)
        ours = VLMForConditionalGeneration.from_pretrained(paths["base"], dtype=torch.float32)
        model, (proj, llm) = (
            (ours, (ours.connector, ours.language_model)) if impl == "ours" else _llava(to_llava_hf(ours))
        )
        trainable = list(proj.parameters()) + (list(llm.parameters()) if mode == "full" else [])
        out[f"{mode}_s"], out[f"{mode}_loss"] = time_steps(model.train(), batch, trainable)
        if impl == "ours" and mode == "stage1":
            features = ours.get_tower_features(batch["pixel_values"]).detach()
            cached = {**{k: v for k, v in batch.items() if k != "pixel_values"}, "image_features": features}
            fresh = VLMForConditionalGeneration.from_pretrained(paths["base"], dtype=torch.float32)
            out["stage1_cached_s"], _ = time_steps(fresh.train(), cached, list(fresh.connector.parameters()))
    return out


def _llava(llava):
    # Llava keeps lm_head outside its language model; ours has it inside language_model: train the same set.
    return llava, (llava.model.multi_modal_projector, _Both(llava.model.language_model, llava.lm_head))


class _Both:
    def __init__(self, *modules):
        self.modules = modules

    def parameters(self):
        return [p for m in self.modules for p in m.parameters()]


# -- phase 2: stage 1 epochs with / without the feature cache ------------------------------------------------
def phase_stage1(paths: dict, cache_root: str, rounds: str = "3") -> dict:
    """Stage 1 epochs on the trainer's data path (the stage1.yaml recipe's TrainData, collator, model, AdamW),
    alternating an epoch from images with an epoch from the feature cache, so load drift hits both alike."""
    import torch

    from vlm.data.collate import model_inputs
    from vlm.model import VLMForConditionalGeneration
    from vlm.processing import VLMProcessor
    from vlm.train.feature_cache import build_feature_cache
    from vlm.train.freeze import apply_freeze_policy
    from vlm.train.recipe import load_recipe
    from vlm.train.run_data import build_train_data

    data_file = Path(paths["data"]) / "caption_train.jsonl"
    # num_workers=0: this phase times the process's own CPU seconds, which would miss work done in workers
    overrides = [
        f"model={paths['base']}",
        f"data=[{data_file}]",
        "output_dir=unused",
        "epochs=1",
        "num_workers=0",
    ]
    recipe = load_recipe(
        ROOT / "stages" / "stage1.yaml", [*overrides, "micro_batch_size=32", "global_batch_size=32"]
    )
    torch.manual_seed(recipe.seed)
    model = apply_freeze_policy(VLMForConditionalGeneration.from_pretrained(recipe.model), recipe)
    processor = VLMProcessor.from_pretrained(recipe.model)
    data = build_train_data(recipe, processor, 0, 1)
    started = cpu_clock()
    cached = build_feature_cache(model, processor, data.dataset, Path(cache_root), 32, "cpu", 0, 1, "raise")
    build_s, plain = cpu_clock() - started, data.dataset
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr)
    times: dict[str, list[float]] = {"images": [], "cache": []}
    for _ in range(int(rounds)):
        for name, dataset in (("images", plain), ("cache", cached)):
            data.dataset = dataset
            t0 = cpu_clock()
            for batch in data.iterate(0):
                model(**model_inputs(batch), use_cache=False).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            times[name].append(cpu_clock() - t0)
    return {
        "epoch_images_s": statistics.median(times["images"]),
        "epoch_cache_s": statistics.median(times["cache"]),
        "cache_build_s": build_s,
        "steps_per_epoch": data.batches_per_epoch,
        "epochs_each": int(rounds),
    }


# -- phases 3 and 4: serving ---------------------------------------------------------------------------------
def phase_serve_hf(paths: dict) -> dict:
    from serve_throughput import bench_transformers, make_images

    images = make_images(SERVE_REQUESTS)
    return {str(c): bench_transformers(paths["serve"], images, SERVE_TOKENS, c) for c in (1, 8, 32)}


def serve_vllm(ckpt: str, concurrency: tuple[int, ...], n: int, work: Path, eager: bool = False) -> dict:
    from serve_throughput import QUESTION, data_url, free_port, make_images, run_load, start_server

    from vlm.vllm_env import set_engine_env

    set_engine_env()
    port = free_port()
    extra = ("--enforce-eager",) if eager else ()  # eager: no torch.compile, a much faster start
    server = start_server(ckpt, port, work / f"server-{Path(ckpt).name}.log", extra)
    try:
        base, name = f"http://127.0.0.1:{port}", Path(ckpt).resolve().name
        contents = [
            [{"type": "image_url", "image_url": {"url": data_url(im)}}, {"type": "text", "text": QUESTION}]
            for im in make_images(n)
        ]
        asyncio.run(run_load(base, name, contents, max(concurrency), SERVE_TOKENS))  # warm-up
        return {str(c): asyncio.run(run_load(base, name, contents, c, SERVE_TOKENS)) for c in concurrency}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def phase_serve_vllm(paths: dict, work: Path) -> dict:
    return serve_vllm(paths["serve"], (1, 8, 32), SERVE_REQUESTS, work)


def phase_budget(paths: dict, connector: str, work: Path) -> dict:
    from transformers import AutoConfig

    import vlm  # noqa: F401

    # Eager (no torch.compile) for all three: the same execution mode, and three fewer slow compiles.
    result = serve_vllm(paths[f"budget-{connector}"], (32,), SERVE_REQUESTS, work, eager=True)["32"]
    return {
        **result,
        "image_tokens": AutoConfig.from_pretrained(paths[f"budget-{connector}"]).num_image_tokens,
    }


# -- running phases ------------------------------------------------------------------------------------------
def run_phase(name: str, paths: dict, work: Path, *args: str) -> dict:
    """Run one phase in a fresh interpreter; returns its result with peak_mib and wall_s."""
    out = work / f"result-{name}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, __file__, "--phase", name, "--paths", json.dumps(paths), "--work", str(work)]
    cmd += ["--result", str(out), *[f"--arg={a}" for a in args]]
    print(f"  {name} {' '.join(args)} ...", flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.read_text())


def child(args) -> int:
    paths, work = json.loads(args.paths), Path(args.work)
    phases = {
        "train_step": lambda: phase_train_step(paths, *args.arg),
        "stage1": lambda: phase_stage1(paths, *args.arg),
        "serve_hf": lambda: phase_serve_hf(paths),
        "serve_vllm": lambda: phase_serve_vllm(paths, work),
        "budget": lambda: phase_budget(paths, *args.arg, work),
    }
    started = time.perf_counter()
    with PeakRSS() as rss:
        result = phases[args.phase]()
    result.update(peak_mib=peak_memory_mib(rss), wall_s=time.perf_counter() - started)
    Path(args.result).write_text(json.dumps(result))
    return 0


def alternate(name: str, variants: list[tuple[str, ...]], paths: dict, work: Path, rounds: int) -> list:
    """Each variant `rounds` times, interleaved; per variant the median of every number and the max peak."""
    runs = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            runs[v].append(run_phase(name, paths, work, *v))
    return [median_of(runs[v]) for v in variants]


def median_of(results: list[dict]) -> dict:
    out = {}
    for key, value in results[0].items():
        values = [r[key] for r in results]
        if isinstance(value, dict):
            out[key] = median_of(values)
        elif key == "peak_mib":
            out[key] = max(values)
        else:
            out[key] = statistics.median(values) if isinstance(value, (int, float)) else value
    return out


def measure(only: set[str], paths: dict, work: Path, rounds: int) -> dict:
    results = {}
    if "train_step" in only:
        print("training step: ours vs LlavaForConditionalGeneration", flush=True)
        results["ours"], results["llava"] = alternate(
            "train_step", [("ours",), ("llava",)], paths, work, rounds
        )
    if "feature_cache" in only:
        print("stage 1 epochs: feature cache vs none", flush=True)
        results["stage1"] = run_phase("stage1", paths, work, str(work / "fc"))
    if "serving" in only:
        print("serving: vLLM vs transformers generate", flush=True)
        results["serve_hf"] = run_phase("serve_hf", paths, work)
        results["serve_vllm"] = run_phase("serve_vllm", paths, work)
    if "token_budget" in only:
        print("visual-token budget", flush=True)
        for c in ("mlp", "qformer", "perceiver"):
            results[f"budget_{c}"] = run_phase("budget", paths, work, c)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PHASES), help=f"comma-separated subset of {PHASES}")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the training-step pair")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    for hidden in ("--phase", "--paths", "--work", "--result"):
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--arg", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return child(args)

    from perf_report import render, write_section

    only = set(args.only.split(","))
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="vlm-perf-"))
    print(f"preparing data and checkpoints in {work} ...", flush=True)
    paths = prepare(work)
    results = measure(only, paths, work, args.rounds)
    meta = {
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "wall_s": time.perf_counter() - started,
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "command": "make bench"
        if os.environ.get("MAKELEVEL")
        else "python bench/perf.py " + " ".join(sys.argv[1:]),
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    markdown = render(results, meta, paths)
    print("\n" + markdown)
    if not args.no_write:
        write_section(markdown)
        print(f"\nwrote the Performance section of {ROOT / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
