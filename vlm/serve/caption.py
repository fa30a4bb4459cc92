"""`vlm caption CKPT --images DIR | --manifest FILE --out captions.jsonl`: offline batch captioning on vLLM.

Exactly once per image, however it is spelled. Each image is keyed by its resolved path (`os.path.realpath`):
`images/a.png`, `./images/a.png`, an absolute path and a symlink to the file are one image, captioned once,
and a manifest line repeated is reported once, not captioned twice. The key is the path, not the content hash,
so that resuming and sharding never read an image they will not caption: a rerun skips by key without opening
done files, and each shard reads only its own images. The sha256 of the bytes (read anyway to decode) is
written beside the key, so copies under other names, or a file changed since, can be found from the output.

Shards: `--shard I/N` takes the images whose key hashes to I modulo N (sha256 of the path relative to the
--images directory or the manifest's directory, so nodes mounting the data at different places agree). Adding
a file never moves another image to another shard.

Crash-safe by construction: each batch's lines are appended and fsync'd before the next batch starts, and a
rerun first reads the output back (dropping a torn last line, the only kind of damage an append can leave),
then skips every image already captioned. So a kill at any point loses at most the batch in flight, which the
rerun redoes, and never duplicates a line. Images that cannot be read go to an errors file (one line per image)
and are skipped by reruns; `--retry-errors` first rewrites that file atomically without the shard's entries, so
an image that fails again is listed once. Output files from older versions, whose lines carry only "path", are
keyed on read by resolving that path (relative paths against the current directory, as they were written).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image

from ..constants import IMAGE_SUFFIXES
from .media import MediaError, MediaPolicy, decode_image

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Describe the image."
MAX_LISTED = 10  # duplicates named in the log; the count covers all

Generate = Callable[[list[Image.Image]], list[str]]


# -- what to caption -------------------------------------------------------------------------------------------
def list_images(images_dir: Path | None, manifest: Path | None) -> list[str]:
    """Image paths in a stable order: a directory's files sorted, or a manifest's lines as given.

    A manifest line is a path or a JSON object with an "image" (or "path") key; relative paths resolve
    against the manifest's directory.
    """
    return [path for path, _ in listing(images_dir, manifest)]


def listing(images_dir: Path | None, manifest: Path | None) -> list[tuple[str, str]]:
    """(path, where it was listed: the manifest's FILE:LINE, or the path itself) per entry, in order."""
    if images_dir is not None:
        if not images_dir.is_dir():
            raise FileNotFoundError(f"--images {images_dir} is not a directory")
        paths = sorted(str(p) for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return [(path, path) for path in paths]
    entries = []
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        line = line.strip()
        if line:
            path = Path(_manifest_entry(line, f"{manifest}:{n}"))
            entries.append(
                (str(path if path.is_absolute() else manifest.parent / path), f"{manifest.name}:{n}")
            )
    return entries


def _manifest_entry(line: str, where: str) -> str:
    if not line.startswith("{"):
        return line
    try:
        record = json.loads(line)
    except ValueError as err:
        raise ValueError(f"{where}: not valid JSON ({err})") from None
    path = record.get("image") or record.get("path") if isinstance(record, dict) else None
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: JSON line has no 'image' or 'path' string")
    return path


def image_key(path: str) -> str:
    """One key per file whatever the spelling: the absolute path with symlinks, `.` and `..` resolved."""
    return os.path.realpath(path)


def listing_root(images_dir: Path | None, manifest: Path | None) -> str:
    return image_key(str(images_dir if images_dir is not None else manifest.parent))


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


# -- the JSONL files -------------------------------------------------------------------------------------------
def read_records(path: Path) -> list[dict]:
    """The lines of a JSONL file we append to; a torn last line (killed mid-write) is cut off the file."""
    if not path.exists():
        return []
    records, good_end = [], 0
    with open(path, "rb+") as f:
        for n, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                break  # torn tail: its image is redone
            try:
                record = json.loads(raw)
                record_key(record)
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{path}:{n}: corrupt line ({type(err).__name__}: {err})") from None
            records.append(record)
            good_end += len(raw)
        if f.seek(0, os.SEEK_END) != good_end:
            log.warning("%s: dropping a torn last line (%d bytes)", path, f.tell() - good_end)
            f.truncate(good_end)
    return records


def record_key(record: dict) -> str:
    """A line's key; lines written before keys existed are keyed by resolving their "path"."""
    return record.get("key") or image_key(record["path"])


def read_done(path: Path) -> set[str]:
    """Keys already written to a JSONL file (see `read_records`)."""
    return {record_key(r) for r in read_records(path)}


def append_lines(path: Path, records: list[dict]) -> None:
    if not records:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def forget(path: Path, keys: set[str]) -> int:
    """Rewrite a JSONL file without the lines of `keys`, atomically (temp file + rename); lines removed."""
    records = read_records(path)
    kept = [r for r in records if record_key(r) not in keys]
    if len(kept) == len(records):
        return 0
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    append_lines(tmp, kept)
    tmp.touch()  # nothing kept: still an (empty) file to rename
    os.replace(tmp, path)
    return len(records) - len(kept)


# -- captioning ------------------------------------------------------------------------------------------------
def batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def caption_prompt(checkpoint: Path, prompt: str) -> str:
    from ..processing import VLMProcessor

    processor = VLMProcessor.from_pretrained(str(checkpoint))
    content = [{"type": "image"}, {"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def start_engine(args: argparse.Namespace, checkpoint: Path) -> Generate:
    """An offline vLLM engine as a function: images -> greedy captions."""
    from ..vllm_env import set_engine_env

    set_engine_env(verbose=getattr(args, "verbose", False))
    from vllm import LLM, SamplingParams

    prompt = caption_prompt(checkpoint, args.prompt)
    llm = LLM(
        model=str(checkpoint),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        limit_mm_per_prompt={"image": 1},
        enforce_eager=args.enforce_eager,
        seed=0,
    )
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

    def generate(images: list[Image.Image]) -> list[str]:
        if not images:
            return []
        requests = [{"prompt": prompt, "multi_modal_data": {"image": image}} for image in images]
        return [o.outputs[0].text.strip() for o in llm.generate(requests, sampling, use_tqdm=False)]

    return generate


def load(key: str, path: str, policy: MediaPolicy) -> tuple[dict, Image.Image | None]:
    """(the line's identity: path, key, sha256 when readable; the decoded image or None, with "error" set)."""
    record = {"path": path, "key": key}
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return {**record, "error": str(err)}, None
    record["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        return record, decode_image(data, policy, what=path).convert("RGB")
    except (MediaError, OSError) as err:
        return {**record, "error": str(err)}, None


def caption_all(generate: Generate, todo: list[tuple[str, str]], args, out: Path, errors: Path) -> tuple:
    """Caption `todo` ([(key, path)]) batch by batch, appending as it goes; (captioned, failed, seconds)."""
    from tqdm import tqdm

    model_name = Path(args.checkpoint).resolve().name
    policy = MediaPolicy(max_image_pixels=args.max_image_pixels)
    bar = tqdm(total=len(todo), unit="img", desc="captioning", dynamic_ncols=True)
    start, n_ok, n_err = time.perf_counter(), 0, 0
    for batch in batches(todo, args.batch_size):
        loaded = [load(key, path, policy) for key, path in batch]
        ok = [(record, image) for record, image in loaded if image is not None]
        failed = [record for record, image in loaded if image is None]
        captions = generate([image for _, image in ok])
        append_lines(errors, failed)
        append_lines(
            out,
            [
                {**record, "caption": caption, "model": model_name, "prompt": args.prompt}
                for (record, _), caption in zip(ok, captions, strict=True)
            ],
        )
        n_ok, n_err = n_ok + len(ok), n_err + len(failed)
        bar.update(len(batch))
        bar.set_postfix(images_per_s=f"{n_ok / (time.perf_counter() - start):.1f}", errors=n_err)
    bar.close()
    return n_ok, n_err, time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    checkpoint, out = Path(args.checkpoint), Path(args.out)
    errors = Path(args.errors) if args.errors else out.with_name(out.name + ".errors.jsonl")
    index, count = args.shard
    root = listing_root(args.images, args.manifest)
    unique, repeated = unique_images(listing(args.images, args.manifest))
    mine = {key: path for key, path in unique.items() if shard_of(key, root, count) == index}
    repeated = {key: names for key, names in repeated.items() if key in mine}
    done = read_done(out)
    if args.retry_errors:
        failed_before = set()
        log.info("--retry-errors: %d entries taken out of %s", forget(errors, set(mine)), errors)
    else:
        failed_before = read_done(errors)
    todo = [(key, path) for key, path in mine.items() if key not in done and key not in failed_before]
    log.info(
        "%d images in shard %d/%d (%d in all): %d already captioned, %d failed before, %d to do",
        len(mine), index, count, len(unique), len(done & mine.keys()), len(failed_before & mine.keys()), len(todo),
    )  # fmt: skip
    if repeated:
        log.warning("%s", describe_duplicates(repeated))
    if not todo:
        return 0
    n_ok, n_err, elapsed = caption_all(start_engine(args, checkpoint), todo, args, out, errors)
    log.info(
        "captioned %d images in %.1f s (%.1f images/s); %d errors -> %s; %d duplicate entries skipped",
        n_ok, elapsed, n_ok / elapsed, n_err, errors, sum(len(v) - 1 for v in repeated.values()),
    )  # fmt: skip
    return 0


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
    p = sub.add_parser("caption", help="caption a directory or manifest of images (offline vLLM, resumable)")
    p.add_argument("checkpoint", help="checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="directory of images (searched recursively)")
    src.add_argument("--manifest", type=Path, help="file with one image path (or JSON object) per line")
    p.add_argument("--out", required=True, help="captions JSONL (appended to; a rerun resumes)")
    p.add_argument("--errors", default=None, help="errors JSONL (default: OUT.errors.jsonl)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--batch-size", type=int, default=32, help="images per engine call (and per fsync)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument(
        "--shard", type=shard_arg, default=(0, 1), metavar="I/N", help="caption only the I-th of N shards"
    )
    p.add_argument("--retry-errors", action="store_true", help="retry images listed in the errors file")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (faster start)")
    p.add_argument("--max-image-pixels", type=int, default=MediaPolicy.max_image_pixels)
    # As `vlm -v caption`; SUPPRESS keeps the subcommand's default from resetting a global -v.
    p.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="vLLM's INFO logs too"
    )
    p.set_defaults(func=run)
