"""`vlm caption CKPT --images DIR | --manifest FILE | --parquet PATH | --webdataset PATH --out captions.jsonl`.

Offline batch captioning on vLLM, in this process (`--engine local`, the default) or on a Ray cluster
(`--engine ray`, vlm/serve/caption_ray.py). Both read through caption_inputs.py, write through caption_store.py
and caption each image with the same prompt and greedy settings, so they give the same captions.

Exactly once per image, however it is spelled. An image listed by path is keyed by its resolved path:
`images/a.png`, `./images/a.png`, an absolute path and a symlink to the file are one image, captioned once, and a
manifest line repeated is reported once, not captioned twice. The key is the path, not the content hash, so that
resuming and sharding never read an image they will not caption. The sha256 of the bytes (read anyway to decode)
is written beside it, so copies under other names, or a file changed since, can be found from the output. An
embedded image (Parquet bytes, a WebDataset member) is keyed by the hash of its bytes.

Shards: `--shard I/N` takes the images whose key hashes to I modulo N (sha256 of the path relative to the
--images directory or the manifest's directory, so nodes mounting the data at different places agree). Adding a
file never moves another image to another shard. `--engine ray` spreads the work itself and needs no shards.

Crash-safe by construction: each batch's lines are appended and fsync'd before the next batch starts, and a rerun
first reads the output back (dropping a torn last line), then skips every image already captioned. So a kill at
any point loses at most the batch in flight, which the rerun redoes, and never duplicates a line. Images that
cannot be read go to an errors file (one line per image, with its cause) and are skipped by reruns;
`--retry-errors` first rewrites that file atomically without the run's entries, so an image that fails again is
listed once.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

from PIL import Image

from .caption_inputs import (
    INPUT_KINDS,
    Entry,
    Unit,
    expand,
    image_key,
    list_directory,
    list_manifest,
    load_entry,
    parent,
    path_units,
)
from .caption_store import CaptionStore, forget, read_done, record_key
from .media import MediaError, MediaPolicy, decode_image

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Describe the image."
MAX_LISTED = 10  # duplicates named in the log; the count covers all

Generate = Callable[[list[Image.Image]], list[str]]

__all__ = ["image_key", "list_images", "read_done", "record_key", "shard_of", "run", "add_caption_parser"]


# -- what to caption -------------------------------------------------------------------------------------------
def list_images(images_dir: Path | None, manifest: Path | None) -> list[str]:
    """Image paths in a stable order: a directory's files sorted, or a manifest's lines as given."""
    return [path for path, _ in listing(images_dir, manifest)]


def listing(images_dir: Path | str | None, manifest: Path | str | None) -> list[tuple[str, str]]:
    """(path, where it was listed: the manifest's FILE:LINE, or the path itself) per entry, in order."""
    return list_directory(str(images_dir)) if images_dir is not None else list_manifest(str(manifest))


def shard_of(key: str, root: str, count: int) -> int:
    """A stable shard for a key: a hash of its path below `root` (the key itself when outside it)."""
    name = os.path.relpath(key, root) if key.startswith(root.rstrip(os.sep) + os.sep) else key
    return int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) % count


def unique_images(entries: list[tuple[str, str]]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """({key: first path} in listing order, {key: where each entry is} for the keys listed more than once)."""
    first: dict[str, str] = {}
    origins: dict[str, list[str]] = {}
    for path, where in entries:
        key = image_key(path)
        first.setdefault(key, path)
        origins.setdefault(key, []).append(where)
    return first, {key: places for key, places in origins.items() if len(places) > 1}


def describe_duplicates(repeated: dict[str, list[str]]) -> str:
    extra = sum(len(places) - 1 for places in repeated.values())
    shown = [f"{key} ({', '.join(places)})" for key, places in list(repeated.items())[:MAX_LISTED]]
    more = f"; and {len(repeated) - MAX_LISTED} more" if len(repeated) > MAX_LISTED else ""
    return (
        f"images listed more than once: {len(repeated)} ({extra} extra entries, each image captioned once): "
        + "; ".join(shown)
        + more
    )


@dataclasses.dataclass
class Plan:
    """What a run will caption. Path inputs are listed and filtered here (`todo`); embedded inputs are read
    unit by unit as the run goes, and `keep` filters their entries then."""

    units: list[Unit]
    todo: list[Entry] | None  # path inputs: the entries left to caption, in listing order
    keep: Callable[[Entry], bool]
    total: int | None  # entries to caption, when known before reading
    skip: set[str] = dataclasses.field(default_factory=set)  # embedded inputs: ids done or failed before


def input_kind(args) -> tuple[str, str]:
    for kind in INPUT_KINDS:
        if getattr(args, kind, None) is not None:
            return kind, str(getattr(args, kind))
    raise ValueError("one of --images, --manifest, --parquet, --webdataset is required")


def make_plan(args, done: set[str], failed_before: set[str]) -> Plan:
    kind, location = input_kind(args)
    index, count = args.shard
    if INPUT_KINDS[kind].embedded:
        return _embedded_plan(kind, location, args, done | failed_before)
    root = listing_root(kind, location)
    unique, repeated = unique_images(
        list_directory(location) if kind == "images" else list_manifest(location)
    )
    mine = {key: path for key, path in unique.items() if shard_of(key, root, count) == index}
    repeated = {key: names for key, names in repeated.items() if key in mine}
    skip = done | failed_before
    todo = [Entry(key, path, path=path) for key, path in mine.items() if key not in skip]
    log.info(
        "%d images in shard %d/%d (%d in all): %d already captioned, %d failed before, %d to do",
        len(mine), index, count, len(unique), len(done & mine.keys()), len(failed_before & mine.keys()), len(todo),
    )  # fmt: skip
    if repeated:
        log.warning("%s", describe_duplicates(repeated))
    # A unit per batch: a Ray task's results reach the output file as soon as its batch is captioned.
    units = path_units(kind, location, [(e.path, e.source) for e in todo], size=args.batch_size)
    return Plan(units, todo, lambda entry: True, len(todo))


def _embedded_plan(kind: str, location: str, args, skip: set[str]) -> Plan:
    units, root, shard = (
        INPUT_KINDS[kind].units(location, args.image_column),
        listing_root(kind, location),
        args.shard,
    )
    log.info(
        "%s %s: %d parts to read; %d images captioned or failed before", kind, location, len(units), len(skip)
    )
    return Plan(
        units, None, lambda e: e.id not in skip and shard_of(e.id, root, shard[1]) == shard[0], None, skip
    )


def listing_root(kind: str, location: str) -> str:
    """What shards hash paths below: the --images directory, else the listing file's directory."""
    if kind == "images" or (INPUT_KINDS[kind].embedded and not location.endswith((".parquet", ".tar"))):
        return image_key(location)
    return image_key(parent(location))


def entries(plan: Plan, column: str | None) -> Iterator[Entry]:
    """The plan's entries in order, each id once (an embedded image stored twice is captioned once)."""
    if plan.todo is not None:
        yield from plan.todo
        return
    seen: set[str] = set()
    for unit in plan.units:
        for entry in expand(unit, column):
            if entry.id not in seen and plan.keep(entry):
                seen.add(entry.id)
                yield entry


# -- loading and captioning ------------------------------------------------------------------------------------
def failure_cause(err: Exception, fetching: bool) -> str:
    if isinstance(err, FileNotFoundError):
        return "missing"
    if isinstance(err, MediaError):
        if err.status == 413:
            return "too large"
        if fetching:
            return "refused URL" if err.status == 403 else "fetch failed"
        return "not a readable image"
    return "unreadable"


def load(entry: Entry, policy: MediaPolicy) -> tuple[dict, Image.Image | None]:
    """(the line's identity: id, source, sha256 when readable; the decoded image, or None with "error" set)."""
    record = {"id": entry.id, "source": entry.source}
    try:
        data = load_entry(entry, policy)
    except (MediaError, OSError) as err:
        return {**record, "error": str(err), "cause": failure_cause(err, fetching=True)}, None
    # An embedded image's id already is its hash: not hashed twice.
    known = entry.id.removeprefix("sha256:") if entry.data is not None else None
    record["sha256"] = known or hashlib.sha256(data).hexdigest()
    try:
        return record, decode_image(data, policy, what=entry.source).convert("RGB")
    except (MediaError, OSError) as err:
        return {**record, "error": str(err), "cause": failure_cause(err, fetching=False)}, None


def media_policy(args) -> MediaPolicy:
    return MediaPolicy(max_image_pixels=args.max_image_pixels, allow_private_urls=args.allow_private_urls)


def generation_settings(args) -> dict:
    return {"temperature": 0.0, "max_tokens": args.max_tokens, "seed": 0}


def caption_records(records: list[dict], captions: list[str], args) -> list[dict]:
    model = Path(args.checkpoint).resolve().name
    extra = {"model": model, "prompt": args.prompt, "generation": generation_settings(args)}
    return [{**record, "caption": c, **extra} for record, c in zip(records, captions, strict=True)]


def caption_prompt(checkpoint: Path, prompt: str) -> str:
    from ..processing import VLMProcessor

    processor = VLMProcessor.from_pretrained(str(checkpoint))
    content = [{"type": "image"}, {"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def start_engine(args: argparse.Namespace, checkpoint: Path) -> Generate:
    """An offline vLLM engine as a function: images -> greedy captions."""
    from ..vllm_env import engine_dtype, set_engine_env

    set_engine_env(verbose=getattr(args, "verbose", False))
    from vllm import LLM, SamplingParams

    prompt = caption_prompt(checkpoint, args.prompt)
    llm = LLM(
        model=str(checkpoint),
        dtype=engine_dtype(args.dtype),
        max_model_len=args.max_model_len,
        limit_mm_per_prompt={"image": 1},
        enforce_eager=args.enforce_eager,
        seed=0,
    )
    sampling = SamplingParams(**generation_settings(args))

    def generate(images: list[Image.Image]) -> list[str]:
        if not images:
            return []
        requests = [{"prompt": prompt, "multi_modal_data": {"image": image}} for image in images]
        return [o.outputs[0].text.strip() for o in llm.generate(requests, sampling, use_tqdm=False)]

    return generate


def batched(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


class Progress:
    """A progress bar with images/s and failures by cause, and the closing summary line.

    The rate counts from the first result, so an engine's start-up (tens of seconds) does not hide its speed.
    """

    def __init__(self, total: int | None, desc: str = "captioning"):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True)
        self.start, self.first, self.ok, self.causes = time.perf_counter(), None, 0, Counter()

    def update(self, ok: int, failures: list[dict]) -> None:
        now = time.perf_counter()
        self.first = self.first or now
        self.ok += ok
        self.causes.update(f["cause"] for f in failures)
        self.bar.update(ok + len(failures))
        self.bar.set_postfix(images_per_s=f"{self.rate(now):.1f}", errors=sum(self.causes.values()))

    def rate(self, now: float) -> float:
        return self.ok / (now - self.first) if self.first and now > self.first else 0.0

    def summary(self, store: CaptionStore) -> str:
        self.bar.close()
        now = time.perf_counter()
        causes = ", ".join(f"{n} {cause}" for cause, n in self.causes.most_common()) or "none"
        return (
            f"captioned {self.ok} images in {now - self.start:.1f} s ({self.rate(now):.1f} images/s after the "
            f"first results at {(self.first or now) - self.start:.1f} s) -> {store.out}; failed: {causes} -> "
            f"{store.errors}"
        )


def caption_local(args, plan: Plan, store: CaptionStore) -> Progress:
    """Caption in this process, batch by batch, writing each batch before the next starts."""
    policy = media_policy(args)
    progress, generate = Progress(plan.total), None
    for batch in batched(entries(plan, args.image_column), args.batch_size):
        loaded = [load(entry, policy) for entry in batch]
        ok = [(record, image) for record, image in loaded if image is not None]
        failed = [record for record, image in loaded if image is None]
        if ok and generate is None:
            generate = start_engine(args, Path(args.checkpoint))
        captions = generate([image for _, image in ok]) if ok else []
        written, _ = store.write(caption_records([r for r, _ in ok], captions, args), failed)
        progress.update(written, failed)
    return progress


def run(args: argparse.Namespace) -> int:
    if args.engine == "ray" and args.shard != (0, 1):
        raise ValueError(
            "--shard is for --engine local: --engine ray spreads the work over the cluster itself"
        )
    out = Path(args.out)
    store = CaptionStore(out, Path(args.errors) if args.errors else out.with_name(out.name + ".errors.jsonl"))
    if args.retry_errors:
        failed_before = set()
        log.info("--retry-errors: %d entries taken out of %s", forget(store.errors, _retry_ids(args, store)), store.errors)  # fmt: skip
    else:
        failed_before = store.failed_before()
    plan = make_plan(args, store.done, failed_before)
    if plan.total == 0:
        return 0
    if args.engine == "ray":
        from .caption_ray import caption_ray

        progress = caption_ray(args, plan, store)
    else:
        progress = caption_local(args, plan, store)
    store.commit()
    log.info("%s", progress.summary(store))
    return 0


def _retry_ids(args, store: CaptionStore) -> set[str]:
    """The errors this run may retry: its shard's (path inputs), or every one (embedded inputs)."""
    kind, location = input_kind(args)
    failed = store.failed_before()
    if INPUT_KINDS[kind].embedded or args.shard[1] == 1:
        return failed
    root = listing_root(kind, location)
    return {key for key in failed if shard_of(key, root, args.shard[1]) == args.shard[0]}


# -- command line ----------------------------------------------------------------------------------------------
def shard_arg(value: str) -> tuple[int, int]:
    index, sep, count = value.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {value!r}")
    return i, n


def add_caption_parser(sub) -> None:
    p = sub.add_parser(
        "caption", help="caption images: a directory, manifest, Parquet or WebDataset (resumable)"
    )
    p.add_argument("checkpoint", help="checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="directory of images (searched recursively); a path or fsspec URL")
    src.add_argument("--manifest", help="file with one image path (or JSON object) per line; a path or URL")
    src.add_argument("--parquet", help="Parquet file, directory or glob: image bytes or paths in a column")
    src.add_argument("--webdataset", help="WebDataset .tar shard, directory or glob (as img2dataset writes)")
    p.add_argument("--image-column", default=None, help="Parquet column with the images (default: detected)")
    p.add_argument("--out", required=True, help="captions .jsonl or .parquet (a rerun resumes)")
    p.add_argument("--errors", default=None, help="errors JSONL (default: OUT.errors.jsonl)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--batch-size", type=int, default=32, help="images per engine call (and per fsync)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--engine", choices=("local", "ray"), default="local", help="this process, or Ray Data")
    p.add_argument("--ray-address", default=None, help="--engine ray: cluster to join (default: RAY_ADDRESS, else a local Ray)")  # fmt: skip
    p.add_argument("--cpus-per-actor", type=int, default=None, help="--engine ray without GPUs: cores per engine actor (default: all of one node's)")  # fmt: skip
    p.add_argument(
        "--shard", type=shard_arg, default=(0, 1), metavar="I/N", help="caption only the I-th of N shards"
    )
    p.add_argument("--retry-errors", action="store_true", help="retry images listed in the errors file")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (faster start)")
    p.add_argument("--max-image-pixels", type=int, default=MediaPolicy.max_image_pixels)
    p.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="fetch http(s) images from loopback/private addresses too (refused by default, as in vlm serve)",
    )
    # As `vlm -v caption`; SUPPRESS keeps the subcommand's default from resetting a global -v.
    p.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="vLLM's INFO logs too"
    )
    p.set_defaults(func=run)
