"""Frozen-tower feature caching: compute each image's vision-tower features once, then train from them.

Layout: `ROOT/<fingerprint[:16]>/` holds `fingerprint.json` (what the fingerprint covers) and shards
`shard-r<rank>-<id>.safetensors`, each mapping image content hashes (sha256 of the file bytes) to the tower's
selected features (P, Dv) in the tower's dtype. The fingerprint covers the tower config and weights, the image
processor config, the feature layer and select strategy and the dtype, so a changed tower or preprocessing gets a
new directory (logged) and never reads stale features. Entries are keyed by content, not by dataset: every
connector and every run on the same tower shares one cache.

Building is safe under the DeepSpeed launcher: each rank computes a disjoint share of the missing images and
writes its own shard (temp file + rename, so a killed build leaves only whole shards, which a resumed run
reuses); after a barrier every rank rescans, and computes itself whatever it still cannot see (a cache directory
that is not shared between nodes). A shard that fails to open or holds wrongly shaped tensors is moved aside as
`*.corrupt` and its images are rebuilt.

Image content hashes are computed once per cluster: the ranks split the files and exchange their digests, and
`ROOT/digests.json` keeps them for later runs, keyed by path, size and mtime (`shared_digests`).

Unreadable images are recorded in the shards too (content hash -> reason and detail), whatever the bad-sample
policy, so a later run does not decode them again. Each run then treats them as an uncached run would: in raise
mode the build ends with the first affected sample's `SampleError` (on every rank alike, after the shards are
written), in skip mode each affected sample is skipped, logged and counted by reason.

Valid only while the tower is frozen and deterministic (no dropout): `setup_feature_cache` refuses otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from ..data.samples import SampleError, SkippedSample, load_images

log = logging.getLogger("vlm.train")

FORMAT_VERSION = 1
SHARD_BYTES = 512 * 2**20  # flush a shard at this size: bounded memory, and a killed build keeps its shards
_DROPOUT_KEYS = ("attention_dropout", "dropout", "hidden_dropout_prob", "attention_probs_dropout_prob")


class FeatureCacheError(RuntimeError):
    """The feature cache cannot be used as configured, or lost an entry during the run."""


# -- keys ----------------------------------------------------------------------------------------------------
_DIGESTS: dict[tuple[str, int, int], str] = {}
DIGEST_INDEX = "digests.json"  # {absolute path: [size, mtime_ns, sha256]} beside the fingerprint directories


def file_digest(path: str) -> str:
    """sha256 of the file's bytes, memoised per (path, size, mtime) in this process."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def shared_digests(paths: Sequence[str], root: Path, rank: int, world_size: int) -> dict[str, str]:
    """{path: file_digest(path)} for every path, with each file read once per cluster, not once per rank and run.

    The index ROOT/digests.json keeps earlier runs' digests, valid while a file's size and mtime are unchanged
    (a stat per path); the rest are split across the ranks and exchanged, and rank 0 writes the merged index
    (atomically: a killed run leaves the old one)."""
    index_file = root / DIGEST_INDEX
    known = _read_digest_index(index_file)
    out, todo = {}, {}  # todo: {path: (absolute path, size, mtime_ns)}, the stat taken once
    for p in paths:
        st = os.stat(p)
        key = (os.path.abspath(p), st.st_size, st.st_mtime_ns)
        entry = known.get(key[0])
        if entry is not None and entry[:2] == [st.st_size, st.st_mtime_ns]:
            out[p] = _DIGESTS[key] = entry[2]
        else:
            todo[p] = key
    mine = {p: file_digest(p) for p in list(todo)[rank::world_size]}
    parts = [mine]
    if dist.is_initialized() and world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, mine)
    for part in parts:
        out.update(part)
    if todo and rank == 0:
        for p, (path, size, mtime) in todo.items():
            known[path] = [size, mtime, out[p]]
        root.mkdir(parents=True, exist_ok=True)
        _atomic_write(index_file, json.dumps(known))
    return out


def _read_digest_index(path: Path) -> dict[str, list]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as err:  # a damaged index only costs the hashing it saved
        log.warning("feature cache: ignoring the unreadable digest index %s (%s)", path, err)
        return {}


def _weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(vlm, image_processor) -> tuple[str, dict[str, Any]]:
    """(hex digest, description) of everything that decides an image's cached features."""
    config = vlm.config
    processor_config = {k: v for k, v in image_processor.to_dict().items() if not k.startswith("_")}
    description = {
        "format": FORMAT_VERSION,
        "vision_config": config.vision_config.to_diff_dict(),
        "image_processor": processor_config,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "dtype": str(vlm.vision_tower.dtype),
        "tower_weights_sha256": _weights_digest(vlm.vision_tower),
    }
    blob = json.dumps(description, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest(), description


# -- the on-disk cache ---------------------------------------------------------------------------------------
class FeatureCache:
    """One fingerprint's directory: shards of {content hash: features}, plus the hashes known to be unreadable."""

    def __init__(self, root: str | Path, digest: str, description: dict, shape: tuple[int, int], dtype):
        self.root = Path(root)
        self.digest, self.description = digest, description
        self.dir = self.root / digest[:16]
        self.shape, self.dtype = tuple(shape), dtype
        self.index: dict[str, Path] = {}
        self.failed: dict[str, str] = {}  # content hash -> reason (a corrupt image, found while building)
        self.failed_detail: dict[str, str] = {}  # content hash -> its loader message (absent in older shards)
        self._handles: dict[Path, Any] = {}

    def prepare(self, rank: int) -> None:
        """Create the directory (rank 0), logging other fingerprints' caches found beside it."""
        if rank != 0:
            return
        others = sorted(p.name for p in self.root.glob("*") if p.is_dir() and p != self.dir)
        meta = self.dir / "fingerprint.json"
        if meta.is_file() and json.loads(meta.read_text()).get("sha256") != self.digest:
            raise FeatureCacheError(f"{self.dir}: holds another fingerprint (prefix collision); remove it")
        if not meta.is_file():
            if others:
                log.info(
                    "feature cache: tower or preprocessing differs from the caches in %s (%s): new cache %s",
                    self.root,
                    ", ".join(others),
                    self.dir.name,
                )
            self.dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(
                meta, json.dumps({"sha256": self.digest, **self.description}, indent=1, default=str)
            )

    def scan(self, rank: int) -> None:
        """(Re)build the index from the shards on disk; corrupt shards are moved aside by rank 0."""
        self.close()
        self.index, self.failed, self.failed_detail = {}, {}, {}
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            try:
                keys, failed, detail = self._validate(shard)
            except (SafetensorError, OSError, ValueError) as err:
                log.warning("feature cache: corrupt shard %s (%s); its images will be rebuilt", shard, err)
                if rank == 0:
                    os.replace(shard, shard.with_suffix(".corrupt"))
                continue
            self.index.update(dict.fromkeys(keys, shard))
            self.failed.update(failed)
            self.failed_detail.update(detail)

    def _validate(self, shard: Path) -> tuple[list[str], dict[str, str], dict[str, str]]:
        with safe_open(str(shard), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != self.digest:
                raise ValueError(f"fingerprint {meta.get('fingerprint')!r} is not {self.digest!r}")
            keys = list(f.keys())
            for key in keys:
                s = f.get_slice(key)
                if tuple(s.get_shape()) != self.shape or s.get_dtype() != _st_dtype(self.dtype):
                    raise ValueError(
                        f"{key}: {s.get_dtype()} {s.get_shape()}, expected {self.dtype} {self.shape}"
                    )
        return keys, json.loads(meta.get("failed", "{}")), json.loads(meta.get("failed_detail", "{}"))

    def missing(self, digests: Sequence[str]) -> list[str]:
        return sorted({d for d in digests if d not in self.index and d not in self.failed})

    def write_shard(
        self, features: dict[str, torch.Tensor], failed: dict[str, SampleError], rank: int
    ) -> Path:
        name = f"shard-r{rank:04d}-{uuid.uuid4().hex[:12]}.safetensors"
        tmp = self.dir / f".tmp-{name}"
        meta = {
            "fingerprint": self.digest,
            "failed": json.dumps({d: e.reason for d, e in failed.items()}),  # the format's original field
            "failed_detail": json.dumps({d: e.detail for d, e in failed.items()}),
        }
        save_file({k: v.contiguous() for k, v in features.items()}, str(tmp), metadata=meta)
        os.replace(tmp, self.dir / name)
        return self.dir / name

    def failure(self, digest: str, sample_id) -> SampleError | None:
        """The error an uncached load of this image would raise for `sample_id`, or None if it is readable."""
        if digest not in self.failed:
            return None
        return SampleError(sample_id, self.failed[digest], self.failed_detail.get(digest, ""))

    def get(self, digest: str) -> torch.Tensor:
        shard = self.index.get(digest)
        if shard is None:
            raise FeatureCacheError(f"image {digest[:12]} is not in the feature cache {self.dir}")
        try:
            if shard not in self._handles:
                self._handles[shard] = safe_open(str(shard), framework="pt")
            return self._handles[shard].get_tensor(digest)
        except (SafetensorError, OSError) as err:
            raise FeatureCacheError(
                f"feature cache shard {shard} became unreadable during the run ({err}); "
                f"remove it and rerun to rebuild its images"
            ) from err

    def close(self) -> None:
        self._handles.clear()


def _st_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- building ------------------------------------------------------------------------------------------------
def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def compute_features(
    cache: FeatureCache,
    vlm,
    image_processor,
    todo: dict[str, str],
    batch_size: int,
    device,
    rank: int,
) -> int:
    """Run the tower over `todo` ({content hash: a path}) in batches; write shards; return images computed.

    Unreadable images are recorded, not raised: the caller applies the bad-sample policy once every rank's
    shards are written."""
    features: dict[str, torch.Tensor] = {}
    failed: dict[str, SampleError] = {}
    size = done = 0
    items = sorted(todo.items())
    for start in range(0, len(items), batch_size):
        chunk = []
        for digest, path in items[start : start + batch_size]:
            try:
                chunk.append((digest, load_images([path], image_processor, sample_id=path)))
            except SampleError as err:
                failed[digest] = err
        if chunk:
            pixels = torch.cat([p for _, p in chunk]).to(device)
            with torch.no_grad():
                out = vlm.get_tower_features(pixels).cpu()
            for (digest, _), f in zip(chunk, out, strict=True):
                features[digest] = f.clone()
            size += out.numel() * out.element_size()
            done += len(chunk)
        if size >= SHARD_BYTES:
            cache.write_shard(features, failed, rank)
            features, failed, size = {}, {}, 0
    if features or failed:
        cache.write_shard(features, failed, rank)
    return done


class CachedFeatureDataset(Dataset):
    """A SupervisedDataset (or MixedDataset of them) whose items carry `image_features` from the cache instead
    of `pixel_values`: no image is decoded and the tower does not run. Indices and lengths are unchanged, so
    samplers, packing and resume positions are those of the uncached run."""

    def __init__(self, dataset, cache: FeatureCache, digests: dict[str, str], on_error: str = "raise"):
        self.dataset, self.cache, self.digests = dataset, cache, digests
        self.on_error = on_error
        self.lengths = dataset.lengths
        self.load_skipped: Counter[str] = Counter()
        self.load_skipped_ids: dict[str, list] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def _resolve(self, k: int):
        if hasattr(self.dataset, "datasets"):  # MixedDataset
            return self.dataset.datasets[self.dataset.sources[k]], int(self.dataset.indices[k])
        return self.dataset, k

    def __getitem__(self, k: int):
        ds, i = self._resolve(k)
        sample = ds.encoded(i)
        keys = [self.digests[p] for p in sample.image_paths]
        err = next(filter(None, (self.cache.failure(d, sample.id) for d in keys)), None)
        if err is not None:  # as SupervisedDataset does when the image fails to load
            if self.on_error == "raise":
                raise err
            self.load_skipped[err.reason] += 1
            self.load_skipped_ids.setdefault(err.reason, []).append(sample.id)
            log.warning("skipping %s", err)
            return SkippedSample(sample.id, err.reason, err.detail)
        features = [self.cache.get(d) for d in keys]
        return {
            "id": sample.id,
            "input_ids": torch.tensor(sample.input_ids, dtype=torch.long),
            "labels": torch.tensor(sample.labels, dtype=torch.long),
            "image_features": torch.stack(features)
            if features
            else torch.zeros((0, *self.cache.shape), dtype=self.cache.dtype),
            "source": int(self.dataset.sources[k]) if hasattr(self.dataset, "sources") else 0,
        }

    def skip_report(self) -> dict[str, int]:
        return dict(Counter(self.dataset.skip_report()) + self.load_skipped)

    def first_failure(self) -> SampleError | None:
        """The error of the first sample (index order) whose image is recorded as unreadable, if any."""
        if not self.cache.failed:
            return None
        for k in range(len(self)):
            ds, i = self._resolve(k)
            for path in ds.image_paths[i]:
                err = self.cache.failure(self.digests[path], ds.ids[i])
                if err is not None:
                    return err
        return None


def _image_paths(dataset) -> list[str]:
    parts = dataset.datasets if hasattr(dataset, "datasets") else [dataset]
    return sorted({p for ds in parts for paths in ds.image_paths for p in paths})


def _check_frozen(vlm) -> None:
    tower = vlm.vision_tower
    if any(p.requires_grad for p in tower.parameters()):
        raise FeatureCacheError(
            "feature_cache needs a frozen vision tower, but this run trains it: set feature_cache=null"
        )
    config = vlm.config.vision_config
    dropouts = [k for k in _DROPOUT_KEYS if float(getattr(config, k, 0) or 0) > 0]
    dropouts += [n for n, m in tower.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    if dropouts:
        raise FeatureCacheError(
            f"feature_cache needs a deterministic tower, but it has dropout ({', '.join(dropouts)}): "
            f"set feature_cache=null"
        )


def resolve_root(setting: str) -> Path:
    """`auto` -> $VLM_FEATURE_CACHE or ~/.cache/vlm/features; anything else is the path itself."""
    if setting == "auto":
        return Path(os.environ.get("VLM_FEATURE_CACHE") or Path.home() / ".cache" / "vlm" / "features")
    return Path(setting)


def build_feature_cache(
    vlm, processor, dataset, root: Path, batch_size: int, device, rank: int, world_size: int, on_error: str
) -> CachedFeatureDataset:
    """Compute whatever the cache lacks for `dataset` (ranks share the work), then wrap the dataset."""
    _check_frozen(vlm)
    started = time.time()
    digest, description = fingerprint(vlm, processor.image_processor)
    shape = (vlm.config.num_patches, vlm.config.vision_config.hidden_size)
    cache = FeatureCache(root, digest, description, shape, vlm.vision_tower.dtype)
    cache.prepare(rank)
    _barrier()
    paths = _image_paths(dataset)
    digests = shared_digests(paths, root, rank, world_size)
    by_digest = {d: p for p, d in sorted(digests.items(), reverse=True)}  # first path per content
    cache.scan(rank)
    missing = cache.missing(list(by_digest))
    mine = {d: by_digest[d] for d in missing[rank::world_size]}
    n = compute_features(cache, vlm, processor.image_processor, mine, batch_size, device, rank)
    _barrier()
    cache.scan(rank)
    unseen = {d: by_digest[d] for d in cache.missing(list(by_digest))}
    if unseen:  # another rank's shards are not visible here (a per-node cache directory)
        n += compute_features(cache, vlm, processor.image_processor, unseen, batch_size, device, rank)
        cache.scan(rank)
    if rank == 0:
        log.info(
            "feature cache %s: %d images, %d computed by rank 0 (%d missing before, %d unreadable), %.1f s",
            cache.dir,
            len(by_digest),
            n,
            len(missing),
            len(cache.failed),
            time.time() - started,
        )
    # Raise mode stops here, before training, where an uncached run would stop at that sample's batch; the
    # failures may have been recorded by an earlier run of either mode.
    cached = CachedFeatureDataset(dataset, cache, digests, on_error)
    err = cached.first_failure() if on_error == "raise" else None
    if err is not None:
        raise err
    return cached


def _disk_shortfall(vlm, dataset, root: Path) -> str:
    """Why the cache would not fit on root's disk (an upper bound: one entry per distinct image path)."""
    per_image = (
        vlm.config.num_patches * vlm.config.vision_config.hidden_size * vlm.vision_tower.dtype.itemsize
    )
    n_images = len(_image_paths(dataset))
    existing = next(p for p in [root, *root.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if per_image * n_images <= 0.9 * free:
        return ""
    return (
        f"the feature cache needs up to {per_image * n_images / 2**30:.1f} GiB for {n_images} images, "
        f"{free / 2**30:.1f} GiB free at {existing}: set feature_cache=PATH on a larger disk, or null"
    )


def setup_feature_cache(
    recipe, vlm, processor, data, zero_stage: int, rank: int, world_size: int, device
) -> bool:
    """Swap `data.dataset` for its cached-features form when the recipe asks for it; True when on."""
    setting = recipe.feature_cache
    if setting is None:
        return False
    if zero_stage == 3:
        # Under ZeRO-3 the tower's weights are partitioned: neither the fingerprint nor a tower pass outside
        # the engine's forward can see them whole.
        if setting == "auto":
            if rank == 0:
                log.info("feature_cache=auto is off under ZeRO-3 (partitioned tower weights)")
            return False
        raise FeatureCacheError(
            "feature_cache needs the tower unpartitioned: use ZeRO-2 (stages/zero2.json, as LLaVA stage 1 does) "
            "or feature_cache=null"
        )
    if vlm.config.policy.tiled:
        # The cache holds one crop's features per image file; a tiled policy feeds the tower several per image.
        policy = vlm.config.image_policy["type"]
        if setting == "auto":
            if rank == 0:
                log.info(
                    "feature_cache=auto is off under the %s image policy (several crops per image)", policy
                )
            return False
        raise FeatureCacheError(
            f"feature_cache caches one crop per image; image_policy {policy!r} tiles images: set feature_cache=null"
        )
    root = resolve_root(setting)
    shortfall = _disk_shortfall(vlm, data.dataset, root)
    if shortfall:
        if setting == "auto":
            if rank == 0:
                log.warning("feature_cache=auto is off: %s", shortfall)
            return False
        raise FeatureCacheError(shortfall)
    data.dataset = build_feature_cache(
        vlm,
        processor,
        data.dataset,
        root,
        recipe.micro_batch_size,
        device,
        rank,
        world_size,
        recipe.on_bad_sample,
    )
    return True


__all__ = [
    "CachedFeatureDataset",
    "FeatureCache",
    "FeatureCacheError",
    "build_feature_cache",
    "file_digest",
    "fingerprint",
    "resolve_root",
    "shared_digests",
    "setup_feature_cache",
]
