"""`vlm caption CKPT --images DIR | --manifest FILE --out captions.jsonl`: offline batch captioning on vLLM.

Crash-safe by construction: each batch's lines are appended and fsync'd before the next batch starts, and a
rerun first reads the output back (dropping a torn last line, the only kind of damage an append can leave),
then skips every image already captioned. So a kill at any point loses at most the batch in flight, which the
rerun redoes, and never duplicates a line. Images that cannot be read go to an errors file and are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ..constants import IMAGE_SUFFIXES
from .media import MediaError, MediaPolicy, decode_image

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Describe the image."


def list_images(images_dir: Path | None, manifest: Path | None) -> list[str]:
    """Image paths in a stable order: a directory's files sorted, or a manifest's lines as given.

    A manifest line is a path or a JSON object with an "image" (or "path") key; relative paths resolve
    against the manifest's directory.
    """
    if images_dir is not None:
        if not images_dir.is_dir():
            raise FileNotFoundError(f"--images {images_dir} is not a directory")
        return sorted(str(p) for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    paths = []
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            record = json.loads(line)
            line = record.get("image") or record.get("path")
            if not line:
                raise ValueError(f"{manifest}:{n}: JSON line has no 'image' or 'path' key")
        path = Path(line)
        paths.append(str(path if path.is_absolute() else manifest.parent / path))
    return paths


def read_done(path: Path, key: str = "path") -> set[str]:
    """Keys already written to a JSONL file; a torn last line (killed mid-write) is cut off the file."""
    if not path.exists():
        return set()
    done, good_end = set(), 0
    with open(path, "rb+") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # torn tail: its image is redone
            try:
                done.add(json.loads(raw)[key])
            except (ValueError, KeyError) as err:
                raise ValueError(f"{path} has a corrupt line at byte {good_end}: {err}") from None
            good_end += len(raw)
        if f.seek(0, os.SEEK_END) != good_end:
            log.warning("%s: dropping a torn last line (%d bytes)", path, f.tell() - good_end)
            f.truncate(good_end)
    return done


def append_lines(path: Path, records: list[dict]) -> None:
    if not records:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def batches(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def caption_prompt(checkpoint: Path, prompt: str) -> str:
    from ..processing import VLMProcessor

    processor = VLMProcessor.from_pretrained(str(checkpoint))
    content = [{"type": "image"}, {"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def run(args: argparse.Namespace) -> int:
    checkpoint, out = Path(args.checkpoint), Path(args.out)
    errors_path = Path(args.errors) if args.errors else out.with_name(out.name + ".errors.jsonl")
    index, count = (int(x) for x in args.shard.split("/"))
    if not 0 <= index < count:
        raise ValueError(f"--shard {args.shard}: expected I/N with 0 <= I < N")
    all_images = list_images(args.images, args.manifest)[index::count]
    done = read_done(out)
    skipped = read_done(errors_path) if not args.retry_errors else set()
    todo = [p for p in all_images if p not in done and p not in skipped]
    log.info(
        "%d images (shard %s): %d already captioned, %d failed before, %d to do",
        len(all_images), args.shard, len(done & set(all_images)), len(skipped & set(all_images)), len(todo),
    )  # fmt: skip
    if not todo:
        return 0

    from .engine import set_engine_env

    set_engine_env()
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    prompt = caption_prompt(checkpoint, args.prompt)
    model_name = checkpoint.resolve().name
    llm = LLM(
        model=str(checkpoint),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        limit_mm_per_prompt={"image": 1},
        enforce_eager=args.enforce_eager,
        seed=0,
    )
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    policy = MediaPolicy(max_image_pixels=args.max_image_pixels)
    bar = tqdm(total=len(todo), unit="img", desc="captioning", dynamic_ncols=True)
    start, n_ok, n_err = time.perf_counter(), 0, 0
    for paths in batches(todo, args.batch_size):
        ok, failed = [], []
        for path in paths:
            try:
                ok.append((path, decode_image(Path(path).read_bytes(), policy, what=path).convert("RGB")))
            except (MediaError, OSError) as err:
                failed.append({"path": path, "error": str(err)})
        requests = [{"prompt": prompt, "multi_modal_data": {"image": image}} for _, image in ok]
        outputs = llm.generate(requests, sampling, use_tqdm=False) if requests else []
        append_lines(errors_path, failed)
        append_lines(
            out,
            [
                {
                    "path": path,
                    "caption": o.outputs[0].text.strip(),
                    "model": model_name,
                    "prompt": args.prompt,
                }
                for (path, _), o in zip(ok, outputs, strict=True)
            ],
        )
        n_ok, n_err = n_ok + len(ok), n_err + len(failed)
        bar.update(len(paths))
        bar.set_postfix(images_per_s=f"{n_ok / (time.perf_counter() - start):.1f}", errors=n_err)
    bar.close()
    elapsed = time.perf_counter() - start
    log.info("captioned %d images in %.1f s (%.1f images/s); %d errors -> %s", n_ok, elapsed, n_ok / elapsed,
             n_err, errors_path)  # fmt: skip
    return 0


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
        "--shard", default="0/1", metavar="I/N", help="caption only every N-th image from the I-th"
    )
    p.add_argument("--retry-errors", action="store_true", help="retry images listed in the errors file")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (faster start)")
    p.add_argument("--max-image-pixels", type=int, default=MediaPolicy.max_image_pixels)
    p.set_defaults(func=run)
