"""`vlm caption`'s inputs: Parquet (bytes, paths, datasets' Image struct), WebDataset shards, fsspec URLs, and the
Parquet output; whole runs with a stand-in engine (the real engine's runs are in test_caption*.py)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from vllm_helpers import noise_image, png_bytes

import vlm.serve.caption as caption
from vlm.cli import main
from vlm.serve.caption_inputs import INPUT_KINDS, content_id, expand, image_key


@pytest.fixture
def stand_in(monkeypatch):
    """vLLM replaced by a function captioning an image by its size; counts the images it was given."""
    seen = []

    def start(args, checkpoint):
        def generate(images):
            seen.extend(images)
            return [f"a {im.width}x{im.height} image" for im in images]

        return generate

    monkeypatch.setattr(caption, "start_engine", start)
    return seen


def _run(tmp_path, *args):
    return main(["caption", str(tmp_path / "ckpt"), "--batch-size", "3", *map(str, args)])


def _images(n, start=0):
    return [png_bytes(noise_image(i, size=(16 + i, 16))) for i in range(start, start + n)]


def _entries(kind, location, column=None):
    return [e for unit in INPUT_KINDS[kind].units(str(location), column) for e in expand(unit, column)]


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_parquet_bytes_paths_and_the_datasets_image_struct(tmp_path):
    data, root = _images(5), tmp_path / "set"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(data[0])
    pq.write_table(
        pa.table({"image": data[1:3], "caption": ["x", "y"]}), root / "bytes.parquet", row_group_size=1
    )
    pq.write_table(pa.table({"path": ["img/a.png"]}), root / "paths.parquet")
    structs = [{"bytes": data[3], "path": None}, {"bytes": None, "path": "set/img/a.png"}]
    pq.write_table(pa.table({"img": structs}), tmp_path / "hf.parquet")

    entries = _entries("parquet", root / "bytes.parquet")
    assert [(e.id, e.source) for e in entries] == [
        (content_id(data[1]), f"{root}/bytes.parquet#row=0"),
        (content_id(data[2]), f"{root}/bytes.parquet#row=1"),
    ]
    assert len(INPUT_KINDS["parquet"].units(str(root / "bytes.parquet"), None)) == 2  # a task per row group
    [by_path] = _entries("parquet", root / "paths.parquet")
    assert by_path.id == image_key(str(root / "img" / "a.png")) and by_path.data is None
    hf = _entries("parquet", tmp_path / "hf.parquet", column="img")
    assert [e.id for e in hf] == [content_id(data[3]), image_key(str(root / "img" / "a.png"))]
    assert len(_entries("parquet", root)) == 3  # a directory: every file in it, sorted

    with pytest.raises(
        ValueError, match=r"hf.parquet: no image column among img; name one with --image-column"
    ):
        _entries("parquet", tmp_path / "hf.parquet")
    with pytest.raises(ValueError, match=r"no column 'nope' \(columns: image, caption\)"):
        _entries("parquet", root / "bytes.parquet", column="nope")
    pq.write_table(pa.table({"image": [3]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet#row=0: column 'image' holds int"):
        _entries("parquet", tmp_path / "bad.parquet")


def test_webdataset_shards_as_img2dataset_writes_them(tmp_path):
    data = _images(3)
    members = [
        ("00000.jpg", data[0]),  # the extension is not checked against the bytes here: decoding sniffs them
        ("00000.json", b'{"url": "http://example.com/0.jpg"}'),
        ("00000.txt", b"a caption"),
        ("sub/00001.png", data[1]),
        ("00002.txt", b"a sample without an image is skipped"),
        ("00003.webp", data[2]),
        ("00003.png", data[0]),  # two image members: the first extension in the preferred order wins (png)
    ]
    _tar(tmp_path / "00000.tar", members)
    entries = _entries("webdataset", tmp_path / "00000.tar")
    assert [(e.id, e.source) for e in entries] == [
        (content_id(data[0]), f"{tmp_path}/00000.tar:00000.jpg"),
        (content_id(data[1]), f"{tmp_path}/00000.tar:sub/00001.png"),
        (content_id(data[0]), f"{tmp_path}/00000.tar:00003.png"),
    ]
    _tar(tmp_path / "00001.tar", [("x.png", data[2])])
    assert len(_entries("webdataset", f"{tmp_path}/0000*.tar")) == 4  # a glob of shards
    with pytest.raises(FileNotFoundError, match="no .tar files there"):
        _entries("webdataset", tmp_path / "*.zip")


def test_file_urls_give_the_ids_plain_paths_do(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_images(1)[0])
    plain = _entries("images", tmp_path / "img")
    assert [e.id for e in _entries("images", f"file://{tmp_path}/img")] == [e.id for e in plain]
    (tmp_path / "list.txt").write_text("img/a.png\n")
    assert [e.id for e in _entries("manifest", f"file://{tmp_path}/list.txt")] == [e.id for e in plain]


def test_parquet_and_webdataset_runs_caption_each_image_once_and_resume(tmp_path, stand_in):
    data = _images(7)
    pq.write_table(pa.table({"image": [*data[:4], data[0]]}), tmp_path / "in.parquet", row_group_size=2)
    out = tmp_path / "captions.parquet"
    assert _run(tmp_path, "--parquet", tmp_path / "in.parquet", "--out", out) == 0
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(content_id(d) for d in data[:4])  # the copy: once
    assert {r["sha256"] for r in rows} == {hashlib.sha256(d).hexdigest() for d in data[:4]}
    assert {r["generation"]["max_tokens"] for r in rows} == {64} and rows[0][
        "prompt"
    ] == "Describe the image."
    assert not (tmp_path / "captions.parquet.staging.jsonl").exists()
    assert len(stand_in) == 4
    assert _run(tmp_path, "--parquet", tmp_path / "in.parquet", "--out", out) == 0
    assert len(stand_in) == 4 and pq.read_table(out).num_rows == 4  # a rerun reads, captions nothing

    _tar(tmp_path / "a.tar", [(f"{i:05d}.png", d) for i, d in enumerate(data[4:])] + [("bad.png", b"junk")])
    jsonl = tmp_path / "captions.jsonl"
    assert _run(tmp_path, "--webdataset", tmp_path / "a.tar", "--out", jsonl) == 0
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["source"].rsplit(":", 1)[1] for r in lines] == ["00000.png", "00001.png", "00002.png"]
    [error] = [
        json.loads(line) for line in (tmp_path / "captions.jsonl.errors.jsonl").read_text().splitlines()
    ]
    assert error["source"].endswith("a.tar:bad.png") and error["cause"] == "not a readable image"
    assert _run(tmp_path, "--webdataset", tmp_path / "a.tar", "--out", jsonl) == 0
    assert len(jsonl.read_text().splitlines()) == 3 and len(stand_in) == 7


def test_a_parquet_run_killed_before_its_fold_is_folded_in_by_the_next(tmp_path, stand_in):
    data = _images(4)
    pq.write_table(pa.table({"image": data}), tmp_path / "in.parquet")
    out = tmp_path / "captions.parquet"
    staged = {"id": content_id(data[0]), "source": "x", "caption": "staged before a kill"}
    (tmp_path / "captions.parquet.staging.jsonl").write_text(json.dumps(staged) + "\n")
    assert _run(tmp_path, "--parquet", tmp_path / "in.parquet", "--out", out) == 0
    rows = {r["id"]: r["caption"] for r in pq.read_table(out).to_pylist()}
    assert len(rows) == 4 and rows[content_id(data[0])] == "staged before a kill" and len(stand_in) == 3


def test_bad_inputs_are_refused_up_front_in_one_line_naming_the_file(tmp_path, stand_in, capsys):
    pq.write_table(pa.table({"pixels": [b"x"]}), tmp_path / "in.parquet")
    out = tmp_path / "captions.jsonl"
    assert _run(tmp_path, "--parquet", tmp_path / "in.parquet", "--out", out) == 2
    assert f"error: {tmp_path}/in.parquet: no image column among pixels" in capsys.readouterr().err
    assert _run(tmp_path, "--webdataset", tmp_path / "none", "--out", out) == 2
    assert "none: no such file or directory" in capsys.readouterr().err
    (tmp_path / "in.tar").write_bytes(b"")
    assert (
        _run(tmp_path, "--webdataset", tmp_path / "in.tar", "--engine", "ray", "--shard", "0/2", "--out", out)
        == 2
    )
    assert "--shard is for --engine local" in capsys.readouterr().err
    assert not out.exists() and not stand_in


def test_http_urls_go_through_the_guard_fetch_refused_for_private_addresses_unless_allowed(
    tmp_path, stand_in
):
    import functools
    import http.server
    import threading

    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a.png").write_bytes(_images(1)[0])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        (tmp_path / "urls.txt").write_text(f"{url}/a.png\n{url}/missing.png\n")
        out, errors = tmp_path / "captions.jsonl", tmp_path / "captions.jsonl.errors.jsonl"
        assert _run(tmp_path, "--manifest", tmp_path / "urls.txt", "--out", out) == 0
        failed = [json.loads(line) for line in errors.read_text().splitlines()]
        assert [(e["id"], e["cause"]) for e in failed] == [(f"{url}/a.png", "refused URL"), (f"{url}/missing.png", "refused URL")]  # fmt: skip
        assert "non-public address 127.0.0.1; refused" in failed[0]["error"] and not stand_in

        run = ["--manifest", tmp_path / "urls.txt", "--out", out, "--retry-errors", "--allow-private-urls"]
        assert _run(tmp_path, *run) == 0
        [line] = [json.loads(line) for line in out.read_text().splitlines()]
        assert line["id"] == f"{url}/a.png" and line["caption"] == "a 16x16 image"
        [error] = [json.loads(line) for line in errors.read_text().splitlines()]
        assert error["cause"] == "fetch failed" and "HTTP 404" in error["error"]
    finally:
        server.shutdown()
