"""Supervised samples: LLaVA records -> token ids, labels masked from the template's assistant spans, images.

Labels come from the template's `{% generation %}` spans (`return_assistant_tokens_mask=True`), never from
string matching. Every way LLaVA's preprocessing could silently zero a sample's labels ("tokenization
mismatch") is an explicit `SampleError` here, naming the sample id and a short reason code:

- `no_assistant_turn` / `empty_answer`: nothing (or only a stop token) would be supervised;
- `empty_mask` / `misaligned_mask`: the token mask is empty, or does not cover exactly the template's
  assistant character spans (a token straddles a span boundary, a span has no token);
- `image_count_mismatch`: the rendered text holds another number of `<image>` tokens than the record's images;
- `too_long`: the expanded sample (placeholders included) exceeds max_length. Samples are refused, never
  truncated: cutting would drop the answer or slice an image's placeholder run in half;
- `missing_image` / `corrupt_image`: an image file cannot be found or decoded;
- `bad_image_size`: a tiled image policy (anyres) cannot lay the image out (smaller than one tile);
- `bad_record`: the record cannot be rendered at all (unknown role, missing fields).

`SupervisedDataset(on_error="skip")` counts these by reason instead of raising; see its docstring for how the
counts reach the end-of-run report.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..constants import IGNORE_INDEX
from ..templates import get_template, led_by_bos
from .images import load_strict
from .records import conversation_to_messages, record_images

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]

__all__ = [
    "IGNORE_INDEX",
    "EncodedRecords",
    "EncodedSample",
    "SampleError",
    "SkippedSample",
    "SupervisedDataset",
    "MixedDataset",
    "encode_conversation",
    "encode_records",
    "image_shape",
    "image_token_counts",
    "load_images",
    "load_tiled_images",
    "mix_datasets",
]


class SampleError(ValueError):
    """A sample that cannot be trained on. `reason` is a short code (the skip counter's key)."""

    def __init__(self, sample_id: Any, reason: str, detail: str = ""):
        self.sample_id = sample_id
        self.reason = reason
        self.detail = detail
        super().__init__(f"sample {sample_id!r}: {reason}" + (f": {detail}" if detail else ""))

    def __reduce__(self):  # picklable across processes despite the 3-argument constructor
        return type(self), (self.sample_id, self.reason, self.detail)


@dataclass(frozen=True)
class SkippedSample:
    """What `SupervisedDataset.__getitem__` returns in skip mode when a sample's images fail to load.

    The collators drop it and list `(id, reason)` under `batch["skipped"]`, so the information crosses
    DataLoader worker processes with the batch itself.
    """

    id: Any
    reason: str
    detail: str = ""


@dataclass
class EncodedSample:
    id: Any
    input_ids: list[int]  # placeholders expanded: each <image> id repeated as many times as that image takes
    labels: list[int]  # IGNORE_INDEX where not supervised (prompt, placeholders, template scaffolding)
    image_paths: list[str]
    n_tokens: int


# -- encoding ------------------------------------------------------------------------------------------------


def _record_id(record: dict[str, Any]) -> Any:
    return record.get("id")


def _record_image_paths(record: dict[str, Any]) -> list[str]:
    # `load_llava_dataset` rows carry absolute `images`; raw LLaVA records carry `image` (used as given).
    images = record.get("images")
    return list(images) if images is not None else record_images(record)


def _render_spans(messages: list[dict[str, str]], jinja: str, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the template's assistant (generation) character spans."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, spans = render_jinja_template(
        conversations=[messages],
        chat_template=jinja,
        return_assistant_tokens_mask=True,
        **tokenizer.special_tokens_map,
    )
    return rendered[0], [tuple(s) for s in spans[0]]


def _strict_mask(
    offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]], sample_id: Any
) -> np.ndarray:
    """1 for tokens wholly inside an assistant span; a token across a span boundary is a misalignment."""
    starts = np.array([o[0] for o in offsets])
    ends = np.array([o[1] for o in offsets])
    mask = np.zeros(len(offsets), dtype=bool)
    for a, b in spans:
        inside = (starts >= a) & (ends <= b) & (ends > starts)
        crossing = (starts < b) & (ends > a) & ~inside & (ends > starts)
        if crossing.any():
            i = int(np.flatnonzero(crossing)[0])
            raise SampleError(
                sample_id,
                "misaligned_mask",
                f"token {i} (chars {starts[i]}-{ends[i]}) straddles the assistant span at chars {a}-{b}",
            )
        if not inside.any():
            raise SampleError(
                sample_id, "misaligned_mask", f"the assistant span at chars {a}-{b} has no token"
            )
        mask |= inside
    return mask


def _encode_compact(
    record: dict[str, Any], processor, template_name: str, max_length: int | None, jinja: str | None = None
) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """(ids with one <image> id per image, supervised mask, image paths, expanded length) or SampleError.

    jinja: the template as `led_by_bos` gives it, when the caller encodes many records (it probes the tokenizer)."""
    sid = _record_id(record)
    tokenizer = processor.tokenizer
    jinja = jinja or led_by_bos(get_template(template_name).jinja, tokenizer)  # BOS as serving renders it
    try:
        messages = conversation_to_messages(record)
    except (KeyError, TypeError, ValueError) as e:
        raise SampleError(sid, "bad_record", str(e)) from e
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        raise SampleError(
            sid, "no_assistant_turn", "the conversation has no gpt turn, so nothing is supervised"
        )
    for k, m in enumerate(answers):
        if not m["content"].strip():
            raise SampleError(
                sid, "empty_answer", f"gpt turn {k} is empty; only a stop token would be supervised"
            )

    try:
        out = tokenizer.apply_chat_template(
            messages,
            chat_template=jinja,
            return_dict=True,
            return_assistant_tokens_mask=True,
            tokenizer_kwargs={"return_offsets_mapping": True},
        )
        rendered, spans = _render_spans(messages, jinja, tokenizer)
    except Exception as e:  # jinja raise_exception, bad content types
        raise SampleError(sid, "bad_record", f"{type(e).__name__}: {e}") from e

    ids = np.asarray(out["input_ids"], dtype=np.int64)
    hf_mask = np.asarray(out["assistant_masks"], dtype=bool)
    if not hf_mask.any():
        raise SampleError(sid, "empty_mask", "the chat template's assistant mask selects no token")
    # HF maps span characters to tokens loosely (a straddling token is included; an end on token 0 runs to the
    # end of the text); recompute the mask strictly from offsets and refuse any disagreement.
    strict = _strict_mask(out["offset_mapping"], spans, sid)
    if not np.array_equal(strict, hf_mask):
        bad = np.flatnonzero(strict != hf_mask)
        raise SampleError(
            sid, "misaligned_mask", f"assistant mask and template spans disagree at tokens {bad[:8].tolist()}"
        )

    images = _record_image_paths(record)
    image_id = processor.image_token_id
    n_markers = int((ids == image_id).sum())
    if n_markers != len(images):
        raise SampleError(
            sid,
            "image_count_mismatch",
            f"the rendered text holds {n_markers} <image> tokens but the record has {len(images)} images",
        )
    if (hf_mask & (ids == image_id)).any():
        raise SampleError(sid, "image_count_mismatch", "an <image> token lies inside an assistant answer")
    counts = image_token_counts(processor, images, sid)
    n_tokens = len(ids) + sum(counts) - n_markers
    if max_length is not None and n_tokens > max_length:
        per_image = (
            f"{n_markers} images x {processor.num_image_tokens} placeholders"
            if not _tiled(processor)
            else f"{n_markers} images taking {counts} placeholders"
        )
        raise SampleError(
            sid,
            "too_long",
            f"{n_tokens} tokens ({per_image}) > max_length {max_length}; samples are refused, not truncated",
        )
    return ids, hf_mask, images, n_tokens


def _tiled(processor) -> bool:
    """Whether the processor's image policy makes an image's token count depend on its size."""
    return processor.policy.tiled


def image_token_counts(processor, paths: Sequence[str], sample_id: Any) -> list[int]:
    """Placeholder tokens each image takes (processor.image_token_count). A tiled policy needs the image sizes:
    read from the file headers, no pixel decoded; a file that is missing or not an image is a SampleError."""
    if not _tiled(processor):
        return [processor.num_image_tokens] * len(paths)
    return [_counted(processor, _header_size(p, sample_id), sample_id) for p in paths]


def _header_size(path: str, sample_id: Any) -> tuple[int, int]:
    if not os.path.isfile(path):
        raise SampleError(sample_id, "missing_image", f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:  # PIL raises many types for bad files; all mean "unusable"
        raise SampleError(sample_id, "corrupt_image", f"cannot read {path} ({type(e).__name__}: {e})") from e


def _counted(processor, size: tuple[int, int], sample_id: Any) -> int:
    try:
        return processor.image_token_count(*size)
    except ValueError as e:  # an image the policy cannot lay out (smaller than a tile)
        raise SampleError(sample_id, "bad_image_size", str(e)) from e


def _expand(
    ids: np.ndarray, mask: np.ndarray, image_token_id: int, counts: int | Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Repeat the k-th <image> id counts[k] times (an int: every one that many); labels: the ids where
    supervised, else IGNORE_INDEX."""
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[ids == image_token_id] = counts
    full_ids = np.repeat(ids, repeats)
    labels = np.where(np.repeat(mask, repeats), full_ids, IGNORE_INDEX)
    return full_ids, labels


def encode_conversation(
    record: dict[str, Any], processor, template_name: str, max_length: int | None
) -> EncodedSample:
    """Render one record with the registered chat template and build expanded ids and labels.

    record: a `load_llava_dataset` row (`id`, `images` absolute paths, `conversations`) or a raw LLaVA record.
    max_length: the longest allowed sample in tokens, placeholders included (None: no limit).
    Raises SampleError (with the record's id) for every reason listed in the module docstring except images.
    """
    ids, mask, images, n_tokens = _encode_compact(record, processor, template_name, max_length)
    counts = image_token_counts(processor, images, _record_id(record))
    full_ids, labels = _expand(ids, mask, processor.image_token_id, counts)
    return EncodedSample(_record_id(record), full_ids.tolist(), labels.tolist(), images, n_tokens)


# -- images --------------------------------------------------------------------------------------------------


def _open_rgb(path: str, sample_id: Any) -> Image.Image:
    if not os.path.isfile(path):
        raise SampleError(sample_id, "missing_image", f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            load_strict(im)  # decodes every pixel, so truncated files fail here
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for bad files; all mean "unusable"
        raise SampleError(
            sample_id, "corrupt_image", f"cannot decode {path} ({type(e).__name__}: {e})"
        ) from e


def image_shape(image_processor) -> tuple[int, int]:
    """(H, W) of the processor's output, found by processing a blank image (works for any processor type)."""
    pv = image_processor(images=[Image.new("RGB", (8, 8))], return_tensors="pt")["pixel_values"]
    return int(pv.shape[-2]), int(pv.shape[-1])


def load_images(
    paths: Sequence[str], image_processor, sample_id: Any = None, empty_hw: tuple[int, int] | None = None
) -> torch.Tensor:
    """Pixel values (n, 3, H, W) float32, (0, 3, H, W) for no paths; SampleError naming the id and path.

    empty_hw: (H, W) for the empty case, if known (saves a probe of the processor)."""
    if not paths:
        return torch.zeros((0, 3, *(empty_hw or image_shape(image_processor))))
    images = [_open_rgb(p, sample_id) for p in paths]
    return image_processor(images=images, return_tensors="pt")["pixel_values"].float()


def load_tiled_images(
    paths: Sequence[str], processor, sample_id: Any = None, empty_hw: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Under a tiled image policy: (pixel values of every image's crops (n_crops, 3, H, W) float32, image_sizes
    (n, 2) as (height, width), each image's placeholder count), from the decoded images' own sizes."""
    if not paths:
        hw = empty_hw or image_shape(processor.image_processor)
        return torch.zeros((0, 3, *hw)), torch.zeros((0, 2), dtype=torch.long), []
    images = [_open_rgb(p, sample_id) for p in paths]
    counts = [_counted(processor, im.size, sample_id) for im in images]
    out = processor.process_images(images, return_tensors="pt")
    return out["pixel_values"].float(), out["image_sizes"], counts


# -- datasets ------------------------------------------------------------------------------------------------


def _iter_records(sources: Any) -> Iterable[dict[str, Any]]:
    """Records from an HF dataset, a list of dicts, or a list of either."""
    if isinstance(sources, dict):
        raise TypeError("pass a dataset or a list of records, not a single record")
    if isinstance(sources, Sequence) and sources and not isinstance(sources[0], dict):
        for source in sources:
            yield from source
    else:
        yield from sources


@dataclass
class EncodedRecords:
    """The text side of a list of records, encoded once (vlm/data/encoded_index.py persists it): for each
    encodable record, at `positions` in record order, its id, image paths, compact ids (int32, one <image> id
    per image), supervised mask and expanded length; `errors` are the others' (position, id, reason, detail)."""

    n_records: int
    positions: list[int]
    ids: list[Any]
    image_paths: list[list[str]]
    compact: list[np.ndarray]
    masks: list[np.ndarray]
    lengths: list[int]
    errors: list[tuple[int, Any, str, str]]


def encode_records(sources: Any, processor, template_name: str, max_length: int | None) -> EncodedRecords:
    """Encode every record (text only: images are not opened), keeping each one's SampleError."""
    jinja = led_by_bos(get_template(template_name).jinja, processor.tokenizer)
    out = EncodedRecords(0, [], [], [], [], [], [], [])
    for position, record in enumerate(_iter_records(sources)):
        out.n_records += 1
        try:
            ids, mask, images, n_tokens = _encode_compact(record, processor, template_name, max_length, jinja)
        except SampleError as e:
            out.errors.append((position, e.sample_id, e.reason, e.detail))
            continue
        out.positions.append(position)
        out.ids.append(_record_id(record))
        out.image_paths.append(images)
        out.compact.append(ids.astype(np.int32))
        out.masks.append(mask)
        out.lengths.append(n_tokens)
    return out


class SupervisedDataset(Dataset):
    """Pre-encoded supervised samples; images are loaded in `__getitem__`.

    All text is encoded at construction, in order, in one Python loop (deterministic), unless `encoded` brings
    it already encoded (`encode_records`, or its persisted form from vlm/data/encoded_index.py). Bad samples:
    - on_error="raise": the first bad sample raises SampleError naming its id;
    - on_error="skip": it is left out and counted: `.skipped` (Counter by reason) and `.skipped_ids`
      (reason -> ids). These construction-time counts are exact: construction runs in the main process.

    Image failures happen later, in `__getitem__` (check_images=True moves "missing" to construction time by
    stat-ing every path; only corrupt files are then left for load time). At load time:
    - "raise": SampleError naming the id and path;
    - "skip": `__getitem__` returns `SkippedSample(id, reason, detail)`; the collator drops it and lists
      `(id, reason)` in `batch["skipped"]`. The trainer adds those to its report: that path is exact for any
      num_workers, because the batch carries it back from the worker. The dataset also records load-time skips
      in `.load_skipped` / `.load_skipped_ids`, which is exact with num_workers=0 only (each worker process
      holds its own copy of the dataset, so with workers > 0 those counters stay at zero in the main process).
    `skip_report()` merges construction and (in-process) load-time counts.
    """

    def __init__(
        self,
        sources: Any,
        processor,
        template_name: str,
        max_length: int | None = None,
        on_error: OnError = "raise",
        check_images: bool = True,
        encoded: EncodedRecords | None = None,
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        get_template(template_name)  # fail fast on a typo
        self.processor = processor
        self.template_name = template_name
        self.max_length = max_length
        self.on_error = on_error
        self.skipped: Counter[str] = Counter()
        self.skipped_ids: dict[str, list[Any]] = {}
        self.load_skipped: Counter[str] = Counter()
        self.load_skipped_ids: dict[str, list[Any]] = {}
        self._empty_hw: tuple[int, int] | None = None  # pixel size, for text-only samples' (0, 3, H, W)

        self.ids: list[Any] = []
        self.image_paths: list[list[str]] = []
        # unexpanded (one <image> id per image) and int32: 576x smaller per image
        self._ids: list[np.ndarray] = []
        self._mask: list[np.ndarray] = []
        self.lengths: list[int] = []  # expanded token counts, for length grouping and packing
        if encoded is None:
            encoded = encode_records(sources, processor, template_name, max_length)
        self._adopt(encoded, check_images)
        if self.skipped:
            log.warning(
                "skipped %d samples while encoding: %s", sum(self.skipped.values()), dict(self.skipped)
            )

    def _adopt(self, encoded: EncodedRecords, check_images: bool) -> None:
        """Keep the encoded records (record order), applying the bad-sample policy to the encoding errors and,
        with check_images, to missing image files."""
        errors = iter(encoded.errors)
        error = next(errors, None)
        for k, position in enumerate([*encoded.positions, encoded.n_records]):
            while error is not None and error[0] < position:
                self._bad(SampleError(*error[1:]))
                error = next(errors, None)
            if position == encoded.n_records:
                break
            sid, images = encoded.ids[k], encoded.image_paths[k]
            missing = next((p for p in images if not os.path.isfile(p)), None) if check_images else None
            if missing is not None:
                self._bad(SampleError(sid, "missing_image", f"image file not found: {missing}"))
                continue
            self.ids.append(sid)
            self.image_paths.append(images)
            self._ids.append(encoded.compact[k])
            self._mask.append(encoded.masks[k])
            self.lengths.append(encoded.lengths[k])

    def _bad(self, err: SampleError) -> None:
        if self.on_error == "raise":
            raise err
        self._count(self.skipped, self.skipped_ids, err.sample_id, err.reason)

    @staticmethod
    def _count(counter: Counter, ids: dict[str, list[Any]], sample_id: Any, reason: str) -> None:
        counter[reason] += 1
        ids.setdefault(reason, []).append(sample_id)

    def __len__(self) -> int:
        return len(self.ids)

    def encoded(self, i: int) -> EncodedSample:
        ids, labels = _expand(
            self._ids[i].astype(np.int64),
            self._mask[i],
            self.processor.image_token_id,
            image_token_counts(self.processor, self.image_paths[i], self.ids[i]),
        )
        return EncodedSample(self.ids[i], ids.tolist(), labels.tolist(), self.image_paths[i], self.lengths[i])

    def __getitem__(self, i: int) -> dict[str, Any] | SkippedSample:
        sid = self.ids[i]
        images: dict[str, torch.Tensor] = {}
        counts: int | list[int] = self.processor.num_image_tokens
        try:
            if not self.image_paths[i] and self._empty_hw is None:
                self._empty_hw = image_shape(self.processor.image_processor)
            if _tiled(self.processor):
                # Counts from the decoded images themselves, so pixels and placeholders always agree.
                pixels, sizes, counts = load_tiled_images(
                    self.image_paths[i], self.processor, sid, self._empty_hw
                )
                images = {"pixel_values": pixels, "image_sizes": sizes}
            else:
                images = {
                    "pixel_values": load_images(
                        self.image_paths[i], self.processor.image_processor, sid, self._empty_hw
                    )
                }
        except SampleError as e:
            if self.on_error == "raise":
                raise
            self._count(self.load_skipped, self.load_skipped_ids, sid, e.reason)
            log.warning("skipping %s", e)
            return SkippedSample(sid, e.reason, e.detail)
        ids, labels = _expand(
            self._ids[i].astype(np.int64), self._mask[i], self.processor.image_token_id, counts
        )
        return {"id": sid, "input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels), **images}

    def skip_report(self) -> dict[str, int]:
        """Skipped samples by reason: construction time plus load time seen in this process."""
        return dict(self.skipped + self.load_skipped)


class MixedDataset(Dataset):
    """Several datasets behind one index: item k is `datasets[sources[k]][indices[k]]`, with `source` set to
    sources[k] (the dataset's position in the mix)."""

    def __init__(self, datasets: Sequence[Dataset], sources: Sequence[int], indices: Sequence[int]):
        self.datasets = list(datasets)
        self.sources = np.asarray(sources, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.lengths: list[int] = [
            int(self.datasets[s].lengths[j]) for s, j in zip(self.sources, self.indices, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        item = self.datasets[self.sources[k]][int(self.indices[k])]
        # The source index travels with the sample (collate -> token_sources) for the per-source loss.
        return {**item, "source": int(self.sources[k])} if isinstance(item, dict) else item

    def skip_report(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for ds in self.datasets:
            total.update(ds.skip_report() if hasattr(ds, "skip_report") else {})
        return dict(total)


def _largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Integer counts proportional to weights that sum exactly to total (ties go to the earlier dataset)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


def mix_datasets(
    datasets: Sequence[Dataset], weights: Sequence[float], seed: int = 0, total: int | None = None
) -> MixedDataset:
    """Mix datasets so dataset i makes up weights[i] / sum(weights) of the result (up to rounding).

    Proportional repetition, not sampling with replacement: dataset i contributes n_i = round(total * share_i)
    items (largest-remainder rounding, so they sum to `total`), taken by walking seeded permutations of it:
    whole passes first, then a partial pass. So every sample of a dataset appears floor or ceil of its repeat
    factor times, with less variance than i.i.d. sampling. total defaults to the sum of the dataset sizes.
    The result is in source order (all of dataset 0's picks, then 1's, ...): the sampler shuffles. The mapping
    depends only on (sizes, weights, seed, total).
    """
    if len(datasets) != len(weights) or not datasets:
        raise ValueError(
            f"need one weight per dataset, got {len(datasets)} datasets and {len(weights)} weights"
        )
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights must be > 0, got {list(weights)}")
    sizes = [len(d) for d in datasets]
    if any(n == 0 for n in sizes):
        raise ValueError(f"cannot mix an empty dataset (sizes {sizes}); were all its samples skipped?")
    total = sum(sizes) if total is None else total
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    rng = np.random.default_rng(seed)
    sources: list[np.ndarray] = []
    indices: list[np.ndarray] = []
    for i, (n, count) in enumerate(zip(sizes, _largest_remainder(total, weights), strict=True)):
        passes = [rng.permutation(n) for _ in range(-(-count // n))]
        picked = np.concatenate(passes)[:count] if passes else np.zeros(0, dtype=np.int64)
        sources.append(np.full(count, i, dtype=np.int64))
        indices.append(picked)
    return MixedDataset(datasets, np.concatenate(sources), np.concatenate(indices))
