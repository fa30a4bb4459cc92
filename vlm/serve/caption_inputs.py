"""What `vlm caption` reads: a directory, a manifest, Parquet files or WebDataset shards, local or any fsspec URL.

Both engines (one process, and Ray) read through this module, so they see the same images under the same ids.

- Listed by path (a directory, a manifest, a Parquet column of paths): the id is the resolved path (symlinks, `.`
  and `..` resolved) for a local file and the URL as fsspec spells it otherwise. It is known before the file is
  read, so a rerun skips done images without opening them.
  An http(s) URL is fetched through the server guard's checks (no private addresses unless allowed).
- Embedded (Parquet bytes, WebDataset members): the id is "sha256:" and the hash of the bytes, so the same image
  stored twice is captioned once, and a rerun skips it after reading it (never after captioning it).

Input kinds are a registry (`INPUT_KINDS`): each turns its location into `Unit`s, the pieces a Ray task reads
(a list of paths, one Parquet row group, one tar shard), and a unit into `Entry`s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ..constants import IMAGE_SUFFIXES
from .media import MediaPolicy, fetch_url

PATHS_PER_UNIT = 256  # a read task's share of a path listing (`vlm caption` uses its --batch-size)
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "bytes", "path", "image_path")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One image as listed: its id, where it was listed, and either a path to read or the bytes themselves."""

    id: str
    source: str
    path: str | None = None
    data: bytes | None = None


@dataclasses.dataclass(frozen=True)
class Unit:
    """A piece of the input one task reads: `kind`'s `expand` turns it into entries."""

    kind: str
    location: str
    part: int = 0  # Parquet: the row group
    paths: tuple[tuple[str, str], ...] = ()  # path listings: (path, where listed)


# -- paths and filesystems -----------------------------------------------------------------------------------------
def is_url(location: str) -> bool:
    return "://" in location


def _fs(location: str):
    import fsspec

    return fsspec.core.url_to_fs(location)


def is_http(location: str) -> bool:
    return location.lower().startswith(("http://", "https://"))


def image_key(path: str) -> str:
    """One id per file whatever the spelling: the real path locally (file:// included), the URL otherwise."""
    if is_http(path):
        return path
    if is_url(path):
        fs, inner = _fs(path)
        if _is_local(fs):
            return os.path.realpath(inner)
        return fs.unstrip_protocol(inner)
    return os.path.realpath(path)


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def read_bytes(path: str) -> bytes:
    if not is_url(path):
        return Path(path).read_bytes()
    fs, inner = _fs(path)
    with fs.open(inner, "rb") as f:
        return f.read()


def join(base: str, relative: str) -> str:
    """`relative` as listed in a file at `base` (a directory path or URL); absolute paths and URLs stand."""
    if is_url(relative) or os.path.isabs(relative):
        return relative
    return f"{base.rstrip('/')}/{relative}" if is_url(base) else str(Path(base) / relative)


def parent(location: str) -> str:
    return location.rsplit("/", 1)[0] if is_url(location) else str(Path(location).parent)


def content_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def expand_files(location: str, suffixes: tuple[str, ...]) -> list[str]:
    """A file, a directory (searched recursively) or a glob, as sorted paths (URLs stay URLs)."""
    fs, inner = _fs(location)
    if any(c in inner for c in "*?["):
        found = fs.glob(inner)
    elif fs.isdir(inner):
        found = [p for p in fs.find(inner) if p.lower().endswith(suffixes)]
    elif fs.exists(inner):
        found = [inner]
    else:
        raise FileNotFoundError(f"{location}: no such file or directory")
    if not found:
        raise FileNotFoundError(f"{location}: no {' or '.join(suffixes)} files there")
    return sorted(p if _is_local(fs) else fs.unstrip_protocol(p) for p in found)


# -- directory and manifest ------------------------------------------------------------------------------------------
def list_directory(location: str) -> list[tuple[str, str]]:
    """(path, where listed) for a directory's images, sorted; the path itself is where it was listed."""
    if not is_url(location):  # every name with an image suffix: a directory or a dangling link so named fails
        if not Path(location).is_dir():  # later with its cause, instead of vanishing from the listing
            raise FileNotFoundError(f"--images {location} is not a directory")
        paths = sorted(str(p) for p in Path(location).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        paths = expand_files(location, tuple(IMAGE_SUFFIXES))
    return [(path, path) for path in paths]


def list_manifest(location: str) -> list[tuple[str, str]]:
    """A manifest's lines as given: a path or a JSON object with an "image" (or "path") key; relative paths
    resolve against the manifest's directory. Where listed: MANIFEST:LINE."""
    text = read_bytes(location).decode("utf-8")
    base, name = parent(location), location.rsplit("/", 1)[-1]
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line:
            entries.append((join(base, _manifest_entry(line, f"{location}:{n}")), f"{name}:{n}"))
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


def path_units(
    kind: str, location: str, listing: list[tuple[str, str]], size: int = PATHS_PER_UNIT
) -> list[Unit]:
    return [Unit(kind, location, paths=tuple(listing[i : i + size])) for i in range(0, len(listing), size)]


def expand_paths(unit: Unit, column: str | None = None) -> Iterator[Entry]:
    for path, where in unit.paths:
        yield Entry(image_key(path), where, path=path)


# -- Parquet ---------------------------------------------------------------------------------------------------------
def parquet_units(location: str, column: str | None = None) -> list[Unit]:
    """A unit per row group; each file's image column is found (or refused, naming the file) here, up front."""
    import pyarrow.parquet as pq

    units = []
    for path in expand_files(location, (".parquet",)):
        fs, inner = _fs(path)
        with fs.open(inner, "rb") as f:
            parquet = pq.ParquetFile(f)
            image_column(parquet.schema_arrow, path, column)
        units += [Unit("parquet", path, part=g) for g in range(parquet.num_row_groups)]
    return units


def image_column(schema, path: str, wanted: str | None) -> str:
    names = list(schema.names)
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"{path}: no column {wanted!r} (columns: {', '.join(names)})")
        return wanted
    for name in PARQUET_IMAGE_COLUMNS:
        if name in names:
            return name
    raise ValueError(
        f"{path}: no image column among {', '.join(names)}; name one with --image-column "
        f"(looked for {', '.join(PARQUET_IMAGE_COLUMNS)})"
    )


def expand_parquet(unit: Unit, column: str | None = None) -> Iterator[Entry]:
    """A row group's images: a binary column (bytes), a string column (paths, relative to the file), or a
    struct with "bytes" and "path" fields (what `datasets` writes for its Image feature)."""
    import pyarrow.parquet as pq

    fs, inner = _fs(unit.location)
    with fs.open(inner, "rb") as f:
        parquet = pq.ParquetFile(f)
        name = image_column(parquet.schema_arrow, unit.location, column)
        values = parquet.read_row_group(unit.part, columns=[name]).column(name).to_pylist()
    offset = sum(parquet.metadata.row_group(g).num_rows for g in range(unit.part))
    for i, value in enumerate(values):
        where = f"{unit.location}#row={offset + i}"
        yield _parquet_entry(value, where, parent(unit.location), name)


def _parquet_entry(value, where: str, base: str, column: str) -> Entry:
    if isinstance(value, dict):  # datasets' Image feature: bytes when embedded, else a path
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes):
        return Entry(content_id(value), where, data=value)
    if isinstance(value, str) and value:
        path = join(base, value)
        return Entry(image_key(path), where, path=path)
    raise ValueError(f"{where}: column {column!r} holds {type(value).__name__}, not image bytes or a path")


# -- WebDataset --------------------------------------------------------------------------------------------------------
def tar_units(location: str, column: str | None = None) -> list[Unit]:
    return [Unit("webdataset", path) for path in expand_files(location, (".tar",))]


def expand_tar(unit: Unit, column: str | None = None) -> Iterator[Entry]:
    """A shard's samples, as img2dataset writes them: members named KEY.EXT, the image under one of the image
    extensions (the first there, in TAR_IMAGE_EXTENSIONS order); a sample without one is skipped."""
    fs, inner = _fs(unit.location)
    samples: dict[str, dict[str, tuple[str, bytes]]] = {}
    with fs.open(inner, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, base = member.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if dot and ext.lower() in TAR_IMAGE_EXTENSIONS:
                key = f"{directory}/{stem}" if directory else stem
                samples.setdefault(key, {})[ext.lower()] = (member.name, tar.extractfile(member).read())
    for members in samples.values():
        ext = next(e for e in TAR_IMAGE_EXTENSIONS if e in members)
        name, data = members[ext]
        yield Entry(content_id(data), f"{unit.location}:{name}", data=data)


# -- the registry ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InputKind:
    units: Callable[[str, str | None], list[Unit]]  # (location, Parquet's image column)
    expand: Callable[[Unit, str | None], Iterator[Entry]]  # column: Parquet's image column (None: detect)
    embedded: bool  # ids come from the bytes (read to know them), not from paths


INPUT_KINDS: dict[str, InputKind] = {
    "images": InputKind(lambda loc, _: path_units("images", loc, list_directory(loc)), expand_paths, False),
    "manifest": InputKind(
        lambda loc, _: path_units("manifest", loc, list_manifest(loc)), expand_paths, False
    ),
    "parquet": InputKind(parquet_units, expand_parquet, True),
    "webdataset": InputKind(tar_units, expand_tar, True),
}


def expand(unit: Unit, column: str | None = None) -> Iterator[Entry]:
    return INPUT_KINDS[unit.kind].expand(unit, column)


def load_entry(entry: Entry, policy: MediaPolicy) -> bytes:
    """The entry's bytes. An http(s) URL goes through the server guard's fetch (media.fetch_url): non-public
    addresses are refused unless the policy allows them, redirects are vetted, and the size is capped."""
    if entry.data is not None:
        return entry.data
    return fetch_url(entry.path, policy) if is_http(entry.path) else read_bytes(entry.path)
