"""`vlm caption --engine ray`: the same captioning on a Ray cluster, through Ray Data.

The pipeline, streamed block by block:
1. `range(units).flat_map(read)`, CPU tasks: each task reads one unit of the input (a batch of listed paths, a
   Parquet row group, a tar shard), skips what is done, and decodes each image with the guard's checks (media.py), so a
   corrupt file or a decompression bomb fails there, with its cause, and never reaches an engine.
2. `map_batches(Captioner)`, an actor pool: one vLLM engine (with our plugin) per actor, one actor per GPU, or per
   `--cpus-per-actor` cores on CPU nodes (default: all but one core of a node, which is left to step 1).
3. The driver iterates the results as they come and appends each batch through `CaptionStore`, fsync'd: outputs
   are written as the job goes (a unit's captions when its unit is done: a listed batch, a Parquet row group, a
   tar shard), and in one place, so workers need no shared output storage.

Exactly once under failures: a task or actor that dies is retried by Ray (Ray Data restarts actors and retries
their tasks by default), and a retried batch can only reach the driver again with the same ids, which the store
skips. A killed driver leaves a file a rerun resumes from, as in the single-process job, keyed the same way.

Why `map_batches` with a callable class and not `ray.data.llm`: its vLLM stage reserves a GPU bundle per replica
unless given a placement group by hand, renders prompts with the tokenizer's chat template instead of our
processor's, and its multimodal stage fetches image URLs itself, outside our guard. A callable class runs the
exact prompt, sampling settings and image checks of `vlm caption`, so both engines give the same captions.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image

from .caption import Plan, Progress, caption_records, load, media_policy, start_engine
from .caption_inputs import Unit, expand
from .caption_store import CaptionStore
from .media import MediaPolicy

log = logging.getLogger(__name__)

RESULT_FIELDS = ("id", "source", "sha256", "error", "cause")


def read_unit(row: dict, units, skip, column: str | None, policy: MediaPolicy) -> list[dict]:
    """One unit's images, decoded: rows with the pixels, or with "error" and "cause" set."""
    import ray

    units, skip = (ray.get(x) if isinstance(x, ray.ObjectRef) else x for x in (units, skip))
    unit: Unit = units[row["id"]]
    rows = []
    for entry in expand(unit, column):
        if entry.id in skip:
            continue
        record, image = load(entry, policy)
        fields = {k: record.get(k, "") for k in RESULT_FIELDS}
        if image is None:
            rows.append({**fields, "pixels": b"", "width": 0, "height": 0})
        else:
            rows.append({**fields, "pixels": image.tobytes(), "width": image.width, "height": image.height})
    return rows


class Captioner:
    """A Ray actor holding one vLLM engine: decoded rows in, captions out (failed rows pass through)."""

    def __init__(self, args):
        self.generate = start_engine(args, args.checkpoint)

    def __call__(self, batch: dict) -> dict:
        ok = [i for i, error in enumerate(batch["error"]) if not error]
        images = [
            Image.frombytes("RGB", (int(batch["width"][i]), int(batch["height"][i])), batch["pixels"][i])
            for i in ok
        ]
        captions = [""] * len(batch["id"])
        for i, caption in zip(ok, self.generate(images), strict=True):
            captions[i] = caption
        out = {k: batch[k] for k in RESULT_FIELDS}
        out["caption"] = np.array(captions, dtype=object)
        return out


def connect(address: str | None, verbose: bool = False) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS); with neither, start a local Ray instance."""
    import ray

    # "local": a new instance, even where `ray start` left a cluster running that ray.init() would join.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    # Workers' logs (vLLM's warnings from every actor) reach the terminal only with -v; their errors always do.
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=verbose)
    resources = ray.cluster_resources()
    log.info(
        "Ray %s: %d node(s), %g CPUs, %g GPUs",
        "started locally" if address == "local" else f"cluster at {address}",
        len([n for n in ray.nodes() if n["Alive"]]), resources.get("CPU", 0), resources.get("GPU", 0),
    )  # fmt: skip


def actor_pool(cpus_per_actor: int | None) -> tuple[int, dict]:
    """(actors, each one's resource request): one per GPU, else one per `cpus_per_actor` cores of a node.

    A core of each CPU node is left to the read tasks: engines holding every core would starve the tasks that
    feed them, and the job would wait forever.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    gpus = sum(int(r.get("GPU", 0)) for r in nodes)
    if gpus:
        return gpus, {"num_gpus": 1}
    usable = [max(int(r.get("CPU", 0)) - 1, 0) for r in nodes]
    per = cpus_per_actor or max(1, max(usable))
    actors = sum(cpus // per for cpus in usable)
    if actors == 0:  # one-core nodes: one engine on half a core, so reads still get the other half
        return 1, {"num_cpus": 0.5}
    return actors, {"num_cpus": per}


def caption_ray(args, plan: Plan, store: CaptionStore) -> Progress:
    import ray

    connect(args.ray_address, getattr(args, "verbose", False))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours (below) counts images, not blocks
    ctx.print_on_execution_start = False
    actors, resources = actor_pool(args.cpus_per_actor)
    log.info("%d engine actor(s), each with %s; %d input parts", actors, resources, len(plan.units))
    ds = ray.data.range(len(plan.units), override_num_blocks=max(1, len(plan.units)))
    ds = ds.flat_map(
        read_unit,
        num_cpus=0.5 if resources.get("num_cpus") == 0.5 else 1,
        fn_kwargs={
            "units": ray.put(plan.units),
            "skip": ray.put(plan.skip),
            "column": args.image_column,
            "policy": media_policy(args),
        },
    )
    ds = ds.map_batches(
        Captioner,
        fn_constructor_kwargs={"args": args},
        batch_size=args.batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        **resources,
    )
    progress = Progress(plan.total)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            write_results(batch, args, store, progress)
    finally:
        ray.shutdown()
    return progress


def write_results(batch: dict, args, store: CaptionStore, progress: Progress) -> None:
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    failures = [
        {"id": r["id"], "source": r["source"], "error": r["error"], "cause": r["cause"]}
        | ({"sha256": r["sha256"]} if r["sha256"] else {})
        for r in rows
        if r["error"]
    ]
    ok = [r for r in rows if not r["error"]]
    records = [{"id": r["id"], "source": r["source"], "sha256": r["sha256"]} for r in ok]
    written, _ = store.write(caption_records(records, [r["caption"] for r in ok], args), failures)
    progress.update(written, failures)
