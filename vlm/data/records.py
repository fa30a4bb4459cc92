"""LLaVA conversation records: validation, file checks, `datasets` loading, chat-message conversion.

A record is `{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}` (see data/README.md). `image` may be a path string, a list of path
strings (one `<image>` token each, in order) or absent for a text-only record. Paths are relative to an
image root (absolute paths are used as they are).

Roles: "human", "gpt" and "system" (LLaVA's names). "user" and "assistant" are accepted as aliases of
human and gpt, because ShareGPT-derived sets mix both spellings. An optional leading system turn is
allowed, then human and gpt alternate, starting with human and ending with gpt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..constants import IMAGE_TOKEN

ROLE_TO_CHAT = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_SPEAKER = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "system": "system"}

__all__ = [
    "IMAGE_TOKEN",
    "CheckReport",
    "record_images",
    "validate_record",
    "check_file",
    "iter_file",
    "load_llava_dataset",
    "conversation_to_messages",
]


def record_images(record: dict[str, Any]) -> list[str]:
    """The record's image paths as a list: a string becomes [string], absent/None becomes []."""
    image = record.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def _record_name(record: Any, line_no: int | None) -> str:
    if isinstance(record, dict) and record.get("id") not in (None, ""):
        return f"record {record['id']!r}"
    return f"record at line {line_no}" if line_no is not None else "record without id"


def _image_problem(path: Path, cache: dict[Path, str | None] | None) -> str | None:
    if cache is not None and path in cache:
        return cache[path]
    if not path.is_file():
        problem: str | None = f"image file not found: {path}"
    else:
        try:
            with Image.open(path) as im:
                im.verify()  # reads headers and chunk checksums, decodes no pixels
            problem = None
        except Exception as e:  # PIL raises many types for bad files; all mean "unusable"
            problem = f"image file cannot be opened: {path} ({type(e).__name__}: {e})"
    if cache is not None:
        cache[path] = problem
    return problem


# `datasets` parses JSON lines with ujson/Arrow, which hold integers in [-2**63, 2**64 - 1] only; Python's json
# reads any size, so a larger one passes our checks and then fails inside `datasets` naming no record.
_INT_RANGE = (-(2**63), 2**64 - 1)


def _oversized_int(value: Any) -> int | None:
    """The first integer anywhere in a parsed JSON value that `datasets` cannot load, or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if (
            isinstance(item, int)
            and not isinstance(item, bool)
            and not _INT_RANGE[0] <= item <= _INT_RANGE[1]
        ):
            return item
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _oversized_problem(record: Any) -> str | None:
    big = _oversized_int(record)
    if big is None:
        return None
    return f"the integer {str(big):.40} is outside the 64-bit range a dataset loader can hold"


def _problems(record: Any, image_root: Path | None, cache: dict[Path, str | None] | None = None) -> list[str]:
    """Bare problem messages (without the record's name)."""
    if not isinstance(record, dict):
        return [f"not a JSON object (got {type(record).__name__})"]
    problems: list[str] = [p for p in (_oversized_problem(record),) if p]

    image = record.get("image")
    images: list[str] = []
    image_ok = True
    if image is None or image == []:  # both mean a text-only record
        pass
    elif isinstance(image, str) and image.strip():
        images = [image]
    elif isinstance(image, list) and all(isinstance(p, str) and p.strip() for p in image):
        images = image
    else:
        image_ok = False
        problems.append(f"'image' must be a path string or a list of path strings, got {image!r:.80}")

    convs = record.get("conversations")
    if convs is None:
        return problems + ["missing 'conversations'"]
    if not isinstance(convs, list):
        return problems + [f"'conversations' must be a list, got {type(convs).__name__}"]
    if not convs:
        return problems + ["'conversations' is empty"]

    speakers: list[str] = []
    n_tokens = 0
    for i, turn in enumerate(convs):
        where = f"turn {i}"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            problems.append(f"{where} must be an object with 'from' and 'value', got {turn!r:.80}")
            continue
        role, value = turn["from"], turn["value"]
        if not isinstance(role, str) or role not in _SPEAKER:  # a list role used to raise TypeError
            problems.append(f"{where} has unknown role {role!r} (allowed: {', '.join(_SPEAKER)})")
            continue
        speakers.append(_SPEAKER[role])
        if not isinstance(value, str):
            problems.append(f"{where} ({role}) value must be a string, got {type(value).__name__}")
            continue
        if not value.strip():
            problems.append(f"{where} ({role}) is empty")
        k = value.count(IMAGE_TOKEN)
        n_tokens += k
        if k and _SPEAKER[role] == "gpt":
            problems.append(f"{where} ({role}) contains {IMAGE_TOKEN}; only human turns may carry images")

    if n_tokens and not images and image_ok:
        problems.append(f"has {n_tokens} {IMAGE_TOKEN} token(s) but no 'image'")
    elif images and not n_tokens:
        problems.append(f"has {len(images)} image(s) but no {IMAGE_TOKEN} token in any turn")
    elif images and n_tokens != len(images):
        problems.append(f"has {n_tokens} {IMAGE_TOKEN} tokens but {len(images)} images")
    n_images = record.get("num_images")  # a multi-image eval record's slice field: it must not lie
    if "num_images" in record and image_ok and (type(n_images) is not int or n_images != len(images)):
        problems.append(f"'num_images' is {n_images!r} but the record has {len(images)} image(s)")

    if len(speakers) == len(convs):  # role order only makes sense when every role is known
        problems += _order_problems(speakers)
    problems += _eval_field_problems(record)

    if image_root is not None:
        for p in images:
            problem = _image_problem(Path(image_root) / p, cache)
            if problem:
                problems.append(problem)
    return problems


# Optional reference and slice fields of eval records (data/README.md); `vlm eval` reads them as these types.
_STRING_FIELDS = ("question_type", "phrasing", "pope_split", "scene_id", "family", "pair")


def _eval_field_problems(record: dict[str, Any]) -> list[str]:
    problems = []
    answers = record.get("answers")
    if "answers" in record and (
        not isinstance(answers, list)
        or not answers
        or not all(isinstance(a, str) and a.strip() for a in answers)
    ):
        problems.append(f"'answers' must be a non-empty list of non-empty strings, got {answers!r:.80}")
    for name in _STRING_FIELDS:
        value = record.get(name)
        if name in record and (not isinstance(value, str) or not value.strip()):
            problems.append(f"'{name}' must be a non-empty string, got {value!r:.80}")
    return problems


def _order_problems(speakers: list[str]) -> list[str]:
    body = speakers[1:] if speakers[0] == "system" else speakers
    if not body:
        return ["has only a system turn"]
    if "system" in body:
        return [f"system turn at position {speakers.index('system', 1)}; only the first turn may be system"]
    for i, s in enumerate(body):
        expected = "human" if i % 2 == 0 else "gpt"
        if s != expected:
            pos = i + (len(speakers) - len(body))
            return [
                f"turns must alternate human/gpt starting with human: turn {pos} is {s}, expected {expected}"
            ]
    if body[-1] != "gpt":
        return ["conversation must end with a gpt turn"]
    return []


def validate_record(
    record: Any, image_root: str | os.PathLike | None = None, *, line_no: int | None = None
) -> list[str]:
    """Human-readable problems with one record, each naming it ("record 'id': ..."); [] if it is fine.

    With image_root, image files are checked for existence and cheaply verified with PIL.
    line_no names records that have no id.
    """
    name = _record_name(record, line_no)
    root = Path(image_root) if image_root is not None else None
    return [f"{name}: {p}" for p in _problems(record, root)]


@dataclass
class CheckReport:
    path: Path
    n_records: int = 0
    n_ok: int = 0
    # (line number, record id or None, message); for a .json list the "line" is the 1-based record index.
    problems: list[tuple[int, str | None, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format_problem(self, problem: tuple[int, str | None, str]) -> str:
        line_no, record_id, message = problem
        tag = f" [{record_id}]" if record_id is not None else ""
        return f"{self.path}:{line_no}{tag}: {message}"

    def summary(self) -> str:
        status = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        return f"{self.path}: {self.n_records} records, {self.n_ok} OK, {status}"


def iter_file(path: str | os.PathLike) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed record or None, JSON error or None) for each record of a .jsonl/.json file.

    .jsonl: one record per non-blank line. .json: a list of records, numbered from 1.
    """
    path = Path(path)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            yield e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})"
            return
        if not isinstance(data, list):
            yield 1, None, f"a .json file must hold a list of records, got {type(data).__name__}"
            return
        for i, rec in enumerate(data, 1):
            yield i, rec, None
        return
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line), None
            except json.JSONDecodeError as e:
                yield line_no, None, f"invalid JSON: {e.msg} (column {e.colno})"


def check_file(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, verify_images: bool = True
) -> CheckReport:
    """Validate every record of a .jsonl/.json file; bad JSON and duplicate ids are problems too.

    image_root defaults to the file's directory; verify_images=False skips all image-file checks.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    report = CheckReport(path)
    cache: dict[Path, str | None] = {}  # eval sets reuse one image for several questions
    first_line: dict[str, int] = {}
    for line_no, record, error in iter_file(path):
        report.n_records += 1
        if error is not None:
            report.problems.append((line_no, None, error))
            continue
        rid = record.get("id") if isinstance(record, dict) else None
        rid = None if rid in (None, "") else str(rid)
        messages = _problems(record, root if verify_images else None, cache)
        if rid is not None:
            if rid in first_line:
                messages.append(f"duplicate id (first used at line {first_line[rid]})")
            else:
                first_line[rid] = line_no
        report.problems += [(line_no, rid, m) for m in messages]
        report.n_ok += not messages
    return report


# ---- datasets --------------------------------------------------------------------------------------------

_SCHEMA_SCAN = 10_000  # records per file read to learn the column set


def _scan_columns(path: Path, limit: int) -> list[str]:
    columns: dict[str, None] = {}
    for i, (_, record, _) in enumerate(iter_file(path)):
        if i >= limit:
            break
        if isinstance(record, dict):
            columns.update(dict.fromkeys(record))
    return list(columns)


def _normalise(record: dict[str, Any], index: int, root: str, file: str) -> dict[str, Any]:
    rid = record.get("id")
    convs = record.get("conversations")
    where = f"{file}: record {rid!r} (record {index + 1})"
    if not isinstance(convs, list):
        raise ValueError(f"{where} has no 'conversations' list; run `vlm data check {file}`")
    for i, t in enumerate(convs):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise ValueError(
                f"{where}: turn {i} is not an object with 'from' and 'value'; run `vlm data check`"
            )
    images = record.get("image")
    if images is not None and not isinstance(images, (str, list)):
        raise ValueError(f"{where}: 'image' must be a path or a list of paths; run `vlm data check {file}`")
    return {
        "id": None if rid is None else str(rid),
        "images": [os.path.join(root, str(p)) for p in record_images(record)],
        "conversations": [{"from": str(t["from"]), "value": str(t["value"])} for t in convs],
    }


def _check_objects(path: Path) -> None:
    """Refuse a file whose records are not all JSON objects, before `datasets` sees it: a `null` line makes
    pyarrow's JSON reader crash the process (segfault), other non-objects give an unexplained error."""
    if path.suffix == ".json":
        for n, record, error in iter_file(path):
            if error or not isinstance(record, dict):
                got = error or f"not a JSON object (got {type(record).__name__})"
                raise ValueError(f"{path}:{n}: {got}; run `vlm data check {path}`")
        return
    with open(path, "rb") as f:  # a byte-level check per line: cheap on multi-GB files
        for n, line in enumerate(f, 1):
            if line.strip() and not line.lstrip().startswith(b"{"):
                raise ValueError(f"{path}:{n}: not a JSON object; run `vlm data check {path}`")


def _first_problem(path: Path) -> str | None:
    """The first record `datasets` cannot parse, named by its line: bad JSON or an integer beyond 64 bits."""
    for n, record, err in iter_file(path):
        err = err or _oversized_problem(record)
        if err:
            return f"{path}:{n}: {err}"
    return None


def load_llava_dataset(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    image_root: str | os.PathLike | None = None,
    streaming: bool = False,
    cache_dir: str | os.PathLike | None = None,
):
    """Load LLaVA .jsonl/.json files with `datasets.load_dataset("json", ...)` (one "train" split).

    Output columns: `id` (string), `images` (list of ABSOLUTE image paths, [] for text-only records),
    `conversations` (list of {from, value} strings), plus any other top-level fields unchanged (e.g. the
    eval files' `answers`, `question_type`). The raw `image` field is replaced by `images`.

    Why not a plain load_dataset: `image` is a string in one record, a list in the next and absent in a
    third, and ids may be ints or strings; Arrow infers one type per column and fails (or, across files,
    mis-casts). So every column is loaded as a `datasets.Json` feature (stored as JSON text), then one
    `map` normalises to the fixed schema above. The column set is taken from the first 10,000 records of
    each file; a field first appearing later makes `datasets` raise a cast error.

    image_root: where relative image paths resolve; default: each file's own directory.
    """
    import datasets
    from datasets import Features, Json, List, Value

    files = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not files:
        raise ValueError("no data files given")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"data file not found: {f}")

    columns: dict[str, None] = {"id": None, "image": None, "conversations": None}
    for f in files:
        columns.update(dict.fromkeys(_scan_columns(f, _SCHEMA_SCAN)))
    raw = Features({c: Json() for c in columns})
    extra = {c: Json() for c in columns if c not in ("id", "image", "conversations")}
    out = Features(
        {
            "id": Value("string"),
            "images": List(Value("string")),
            "conversations": List({"from": Value("string"), "value": Value("string")}),
            **extra,
        }
    )

    parts = []
    # One load per file so each file's records resolve against that file's directory by default.
    for f in files:
        _check_objects(f)
        root = str(Path(image_root if image_root is not None else f.parent).resolve())
        try:
            ds = datasets.load_dataset(
                "json",
                data_files=str(f),
                split="train",
                features=raw,
                streaming=streaming,
                cache_dir=None if cache_dir is None else str(cache_dir),
            )
        except datasets.exceptions.DatasetGenerationError as err:  # says only "an error occurred"
            problem = _first_problem(f)
            if problem is None:
                raise
            raise ValueError(f"{problem}; run `vlm data check {f}`") from err
        map_kwargs = {} if streaming else {"desc": f"normalising {f.name}"}
        fn_kwargs = {"root": root, "file": str(f)}
        parts.append(
            ds.map(
                _normalise, with_indices=True, fn_kwargs=fn_kwargs, remove_columns=["image"], features=out,
                **map_kwargs,
            )
        )  # fmt: skip
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# ---- chat messages -------------------------------------------------------------------------------------


def conversation_to_messages(record: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, str]]:
    """LLaVA turns -> transformers chat messages: human/user -> user, gpt/assistant -> assistant, system.

    `<image>` stays as literal text inside `content`; the processor expands it. Accepts a record or its
    `conversations` list.
    """
    turns = record["conversations"] if isinstance(record, dict) else record
    messages = []
    for i, turn in enumerate(turns):
        role = turn.get("from")
        if role not in ROLE_TO_CHAT:
            raise ValueError(f"turn {i} has unknown role {role!r} (allowed: {', '.join(ROLE_TO_CHAT)})")
        messages.append({"role": ROLE_TO_CHAT[role], "content": turn["value"]})
    return messages
