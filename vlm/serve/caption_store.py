"""Where `vlm caption` writes: captions (JSONL or Parquet) and errors (JSONL), exactly one line per image id.

Crash-safe by construction: lines are appended and fsync'd as the job goes, and every open first reads the file
back (dropping a torn last line, the only damage an append can leave) to learn which ids are done. A Parquet
output cannot be appended to, so its lines go to a JSONL staging file beside it (OUT.staging.jsonl) that is
folded into the Parquet file at the end with a temp file and an atomic rename; a run killed before that folds
it in at its next start. Whichever step a kill lands on, a rerun neither loses nor repeats an id.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .caption_inputs import image_key

log = logging.getLogger(__name__)


def record_key(record: dict) -> str:
    """A line's image id; older lines carry it as "key", or only a "path" to resolve."""
    return record.get("id") or record.get("key") or image_key(record["path"])


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


def read_done(path: Path) -> set[str]:
    """Ids already written to a JSONL file (see `read_records`)."""
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


class CaptionStore:
    """The captions file (JSONL, or Parquet by its suffix) and the errors file, with the ids each holds."""

    def __init__(self, out: Path, errors: Path):
        self.out, self.errors = out, errors
        self.parquet = out.suffix.lower() == ".parquet"
        self.staging = out.with_name(out.name + ".staging.jsonl") if self.parquet else out
        if self.parquet:
            self.commit()  # a run killed before its fold: its staged lines go in first
        self.done = self._parquet_ids() | read_done(self.staging) if self.parquet else read_done(out)
        self.failed: set[str] = set()  # ids this run wrote to the errors file

    def failed_before(self) -> set[str]:
        return read_done(self.errors)

    def write(self, captions: list[dict], failures: list[dict]) -> tuple[int, int]:
        """Append the lines of ids not written yet (a retried task may deliver some twice); (new, new errors)."""
        captions = [r for r in captions if r["id"] not in self.done]
        self.done.update(r["id"] for r in captions)
        failures = [r for r in failures if r["id"] not in self.failed and r["id"] not in self.done]
        self.failed.update(r["id"] for r in failures)
        append_lines(self.errors, failures)
        append_lines(self.staging, captions)
        return len(captions), len(failures)

    def commit(self) -> None:
        """Parquet: fold the staged lines into the file (temp + atomic rename), then drop the staging file."""
        if not self.parquet or not self.staging.exists():
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        staged = read_records(self.staging)
        have = pq.read_table(self.out).to_pylist() if self.out.exists() else []
        seen = {r["id"] for r in have}
        rows = have + [r for r in staged if r["id"] not in seen and not seen.add(r["id"])]
        tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        names = list(
            dict.fromkeys(k for r in rows for k in r)
        )  # lines may differ in their fields (e.g. older)
        pq.write_table(pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in names}), tmp)
        os.replace(tmp, self.out)
        self.staging.unlink()

    def _parquet_ids(self) -> set[str]:
        if not self.out.exists():
            return set()
        import pyarrow.parquet as pq

        return set(pq.read_table(self.out, columns=["id"]).column("id").to_pylist())
