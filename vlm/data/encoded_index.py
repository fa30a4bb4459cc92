"""A data file's encoded text, persisted: the O(records) chat-template rendering and tokenization runs once per
(file, tokenizer, template, max_length), not once per rank and run.

`ROOT/<key[:24]>.npz` holds `EncodedRecords` (ids, image paths, compact token ids, supervised masks, lengths
and each bad record's error), written atomically (temp file + rename): a killed build leaves no half index, and
ranks of one node, or nodes sharing ROOT, that write the same key at once each write a whole, equal file. The
key covers the file's path, size and mtime, the image root, the tokenizer (its serialised vocabulary and
rules), the rendered template, the image token and its count, and max_length: any change gets a new index.
Images are not part of it: missing files are still checked (a stat per path) when the dataset is built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np

from ..templates import get_template, led_by_bos
from .samples import EncodedRecords, encode_records

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

__all__ = ["EncodingIndex", "resolve_data_cache"]


def resolve_data_cache(setting: str) -> Path:
    """`auto` -> $VLM_DATA_CACHE or ~/.cache/vlm/encoded; anything else is the path itself."""
    if setting == "auto":
        return Path(os.environ.get("VLM_DATA_CACHE") or Path.home() / ".cache" / "vlm" / "encoded")
    return Path(setting)


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((blob + extra).encode()).hexdigest()


class EncodingIndex:
    """The persisted encoding of one data file for one processor, template and max_length."""

    def __init__(
        self, root: Path, path: str, image_root: str | None, processor, template: str, max_length: int | None
    ):
        self.path, self.image_root = path, image_root
        self.processor, self.template, self.max_length = processor, template, max_length
        st = os.stat(path)
        key = {
            "format": FORMAT_VERSION,
            "file": os.path.abspath(path),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "image_root": None if image_root is None else os.path.abspath(image_root),
            "template": led_by_bos(get_template(template).jinja, processor.tokenizer),
            "tokenizer": _tokenizer_digest(processor.tokenizer),
            "image_token_id": processor.image_token_id,
            "num_image_tokens": processor.num_image_tokens,
            "max_length": max_length,
        }
        if processor.policy.tiled:
            # Lengths then depend on the policy (and the images' sizes, read from their headers at build time).
            key["image_policy"] = processor.image_policy
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.file = Path(root) / f"{digest[:24]}.npz"

    def exists(self) -> bool:
        return self.file.is_file()

    def build(self) -> EncodedRecords:
        """Load the file's records, encode them and write the index."""
        from .records import load_llava_dataset

        started = time.time()
        records = load_llava_dataset(self.path, image_root=self.image_root)
        encoded = encode_records(records, self.processor, self.template, self.max_length)
        self._write(encoded)
        log.info(
            "encoded %s (%d records) in %.1f s; index %s",
            self.path,
            encoded.n_records,
            time.time() - started,
            self.file,
        )
        return encoded

    def _write(self, e: EncodedRecords) -> None:
        meta = {"n_records": e.n_records, "ids": e.ids, "image_paths": e.image_paths, "errors": e.errors}
        arrays = {
            "positions": np.asarray(e.positions, dtype=np.int64),
            "lengths": np.asarray(e.lengths, dtype=np.int64),
            "offsets": np.cumsum([0, *(len(c) for c in e.compact)], dtype=np.int64),
            "compact": np.concatenate(e.compact) if e.compact else np.zeros(0, np.int32),
            "masks": np.concatenate(e.masks) if e.masks else np.zeros(0, bool),
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        }
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{self.file.name}")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, self.file)

    def load(self) -> EncodedRecords:
        try:
            with np.load(self.file, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes())
                offsets = z["offsets"]
                compact, masks = np.split(z["compact"], offsets[1:-1]), np.split(z["masks"], offsets[1:-1])
                positions, lengths = z["positions"].tolist(), z["lengths"].tolist()
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(
                f"encoding index {self.file} is unreadable ({err}); delete it to rebuild"
            ) from err
        return EncodedRecords(
            meta["n_records"],
            positions,
            meta["ids"],
            meta["image_paths"],
            compact if positions else [],
            masks if positions else [],
            lengths,
            [tuple(e) for e in meta["errors"]],
        )
