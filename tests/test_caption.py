"""`vlm caption`: exactly one line per image, however the image is spelled, across shards, reruns and kills.

Unit tests of the bookkeeping; then whole runs in-process with a stand-in engine (cheap: shards, duplicates,
--retry-errors, older output files); then one real vLLM run that is SIGKILLed and resumed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vllm_helpers import noise_image, png_bytes, tiny_checkpoint, vllm_info_lines

import vlm.serve.caption as caption
from vlm.cli import main
from vlm.serve.caption import image_key, list_images, read_done, shard_of


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _keys(path):
    return [r["id"] for r in _lines(path)]


# -- bookkeeping -----------------------------------------------------------------------------------------------
def test_read_done_cuts_a_torn_last_line_and_keys_older_lines_by_their_resolved_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "captions.jsonl"
    good = [json.dumps({"path": f"img{i}.png", "caption": "x"}) + "\n" for i in range(2)]  # older: no key
    good.append(json.dumps({"path": "./x.png", "key": str(tmp_path / "img2.png"), "caption": "x"}) + "\n")
    out.write_text("".join(good) + '{"path": "img3.png", "capt')
    assert read_done(out) == {str(tmp_path / f"img{i}.png") for i in range(3)}
    assert out.read_text() == "".join(good)  # appending after this starts on a fresh line


def test_read_done_refuses_a_corrupt_middle_line_naming_it(tmp_path):
    out = tmp_path / "captions.jsonl"
    out.write_text('{"path": "/a"}\nnot json\n{"path": "/b"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:2: corrupt line"):
        read_done(out)
    out.write_text('{"path": "/a"}\n{"caption": "no path"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:2: corrupt line"):
        read_done(out)


def test_manifest_paths(tmp_path):
    manifest = tmp_path / "list.txt"
    manifest.write_text('a.png\n\n{"image": "sub/b.png"}\n/abs/c.png\n')
    paths = list_images(None, manifest)
    assert paths == [str(tmp_path / "a.png"), str(tmp_path / "sub/b.png"), "/abs/c.png"]
    manifest.write_text('a.png\n{"image": "b.png"\n')
    with pytest.raises(ValueError, match=r"list.txt:2: not valid JSON"):
        list_images(None, manifest)
    manifest.write_text('{"caption": "b.png"}\n')
    with pytest.raises(ValueError, match=r"list.txt:1: JSON line has no 'image' or 'path'"):
        list_images(None, manifest)


def test_shards_hash_keys_below_the_root_so_added_files_and_mount_points_move_nothing():
    keys = [f"/data/images/img-{i:04d}.png" for i in range(300)]
    before = {k: shard_of(k, "/data", 3) for k in keys}
    assert (
        sorted(set(before.values())) == [0, 1, 2]
        and min(list(before.values()).count(s) for s in range(3)) > 80
    )
    assert {k: shard_of(k, "/data", 3) for k in [*keys, "/data/images/new.png"]}.items() >= before.items()
    moved = {k.replace("/data/", "/mnt/nfs/data/"): s for k, s in before.items()}
    assert {k: shard_of(k, "/mnt/nfs/data", 3) for k in moved} == moved
    with pytest.raises(SystemExit):
        main(["caption", "ckpt", "--images", "x", "--out", "o", "--shard", "3/3"])


# -- whole runs with a stand-in engine ------------------------------------------------------------------------
@pytest.fixture
def engine_starts(monkeypatch):
    """Replace vLLM by a function captioning an image by its size; records each engine start's batch sizes."""
    starts = []

    def start(args, checkpoint):
        starts.append([])

        def generate(images):
            starts[-1].append(len(images))
            return [f"a {im.width}x{im.height} image" for im in images]

        return generate

    monkeypatch.setattr(caption, "start_engine", start)
    return starts


def _caption(tmp_path, *args):
    return main(["caption", str(tmp_path / "ckpt"), "--batch-size", "4", *map(str, args)])


@pytest.fixture
def mixed_manifest(tmp_path):
    """12 images listed 17 times under relative, ./relative, absolute and symlink spellings, plus 2 bad files."""
    images, links = tmp_path / "data" / "images", tmp_path / "data" / "links"
    images.mkdir(parents=True)
    links.mkdir()
    for i in range(12):
        (images / f"img-{i:02d}.png").write_bytes(png_bytes(noise_image(i, size=(16 + i, 16))))
    (images / "corrupt.png").write_bytes(b"not an image")
    (links / "img-00.png").symlink_to(images / "img-00.png")
    lines = [f"images/img-{i:02d}.png" for i in range(0, 12, 3)]
    lines += [f"./images/img-{i:02d}.png" for i in range(1, 12, 3)]
    lines += [str(images / f"img-{i:02d}.png") for i in range(2, 12, 3)]
    lines += [
        "links/img-00.png",
        "images/../images/img-01.png",
        "images/img-02.png",
        '{"image": "images/img-03.png"}',
    ]
    lines += ["images/img-04.png", "images/corrupt.png", "./images/corrupt.png", "images/missing.png"]
    manifest = tmp_path / "data" / "manifest.txt"
    manifest.write_text("\n".join(lines) + "\n")
    good = {str(p.resolve()) for p in images.glob("img-*.png")}
    bad = {str((images / "corrupt.png").resolve()), str((images / "missing.png").resolve())}
    return manifest, good, bad


def test_mixed_spellings_and_duplicates_give_one_line_per_image_across_three_shards(
    tmp_path, mixed_manifest, engine_starts, caplog
):
    manifest, good, bad = mixed_manifest
    parts = [tmp_path / f"part-{i}.jsonl" for i in range(3)]
    with caplog.at_level(logging.INFO, logger="vlm.serve.caption"):
        for i, part in enumerate(parts):
            assert _caption(tmp_path, "--manifest", manifest, "--shard", f"{i}/3", "--out", part) == 0
    shard_keys = [_keys(p) for p in parts]
    assert all(shard_keys), "every shard has work"
    assert sorted(k for keys in shard_keys for k in keys) == sorted(good)  # disjoint, complete, no repeats
    errors = [_keys(Path(f"{p}.errors.jsonl")) for p in parts]
    assert sorted(k for keys in errors for k in keys) == sorted(bad)
    records = [r for p in parts for r in _lines(p)]
    assert all(r["id"] == image_key(r["source"]) and len(r["sha256"]) == 64 for r in records)
    assert all(r["caption"].endswith("image") and r["prompt"] == "Describe the image." for r in records)
    # Duplicates are reported once per shard run, in one line, with the count: 6 extra lines in all.
    reports = [r.getMessage() for r in caplog.records if "listed more than once" in r.getMessage()]
    assert len(reports) <= 3 and sum(int(m.split("(")[1].split()[0]) for m in reports) == 6
    assert any(f"{sorted(good)[0]} (manifest.txt:1, manifest.txt:13)" in m for m in reports)

    # A rerun does nothing; a file added to the manifest is captioned once, in one shard, and moves no other.
    starts_before = len(engine_starts)
    for i, part in enumerate(parts):
        assert _caption(tmp_path, "--manifest", manifest, "--shard", f"{i}/3", "--out", part) == 0
    assert len(engine_starts) == starts_before  # nothing to do: no engine start
    new = manifest.parent / "images" / "new.png"
    new.write_bytes(png_bytes(noise_image(99, size=(20, 20))))
    manifest.write_text(manifest.read_text() + "images/new.png\n")
    for i, part in enumerate(parts):
        assert _caption(tmp_path, "--manifest", manifest, "--shard", f"{i}/3", "--out", part) == 0
    assert [_keys(p) for p in parts] == [
        keys + ([str(new)] if shard_of(str(new), str(manifest.parent), 3) == i else [])
        for i, keys in enumerate(shard_keys)
    ]

    # The same shards into one shared output file, one after another: still one line per image.
    shared = tmp_path / "all.jsonl"
    for i in range(3):
        assert _caption(tmp_path, "--manifest", manifest, "--shard", f"{i}/3", "--out", shared) == 0
    assert sorted(_keys(shared)) == sorted(good | {str(new)})
    assert sorted(_keys(Path(f"{shared}.errors.jsonl"))) == sorted(bad)


def test_output_from_before_keys_is_resumed_by_resolved_path(
    tmp_path, mixed_manifest, engine_starts, monkeypatch
):
    manifest, good, _ = mixed_manifest
    monkeypatch.chdir(manifest.parent)
    out = tmp_path / "captions.jsonl"
    old = sorted(good)[:5]  # written by an older version: a relative, unresolved "path" and no key
    out.write_text("".join(json.dumps({"path": os.path.relpath(k), "caption": "old"}) + "\n" for k in old))
    assert _caption(tmp_path, "--manifest", manifest, "--out", out) == 0
    records = _lines(out)
    assert [r["caption"] for r in records[:5]] == ["old"] * 5
    assert sorted({caption.record_key(r) for r in records}) == sorted(good) and len(records) == len(good)
    assert sum(engine_starts[0]) == len(good) - 5


def test_retry_errors_keeps_one_line_per_image(tmp_path, mixed_manifest, engine_starts):
    manifest, good, bad = mixed_manifest
    out, errors = tmp_path / "captions.jsonl", tmp_path / "captions.jsonl.errors.jsonl"
    assert _caption(tmp_path, "--manifest", manifest, "--out", out) == 0
    assert sorted(_keys(errors)) == sorted(bad)
    for _ in range(2):  # still broken: the errors file is rewritten, not appended to
        assert _caption(tmp_path, "--manifest", manifest, "--out", out, "--retry-errors") == 0
        assert sorted(_keys(errors)) == sorted(bad)
    fixed = manifest.parent / "images" / "missing.png"
    fixed.write_bytes(png_bytes(noise_image(7, size=(16, 16))))
    assert _caption(tmp_path, "--manifest", manifest, "--out", out, "--retry-errors") == 0
    assert _keys(errors) == [str((manifest.parent / "images" / "corrupt.png").resolve())]
    assert sorted(_keys(out)) == sorted(good | {str(fixed)})
    assert not list(tmp_path.glob(".*.tmp-*"))  # the rewrite's temp file is gone


# -- a real engine, killed mid-run ----------------------------------------------------------------------------
@pytest.mark.vllm
@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_exactly_one_line_per_image(tmp_path):
    import vllm  # noqa: F401  (fail, not skip, without the serve extra: this is the test that uses it)

    images, links = tmp_path / "images", tmp_path / "links"
    images.mkdir()
    links.mkdir()
    n_good = 160
    lines = []
    for i in range(n_good):
        path = images / f"img-{i:04d}.png"
        path.write_bytes(png_bytes(noise_image(i, size=(32, 32))))
        (links / path.name).symlink_to(path)
        spellings = [f"images/{path.name}", f"./images/{path.name}", str(path), f"links/{path.name}"]
        lines.append(spellings[i % 4])
        if i % 10 == 0:
            lines.append(spellings[(i + 1) % 4])  # the same image again, spelled otherwise
    (images / "corrupt.png").write_bytes(b"not an image at all")
    (images / "truncated.png").write_bytes(png_bytes(noise_image(999, size=(64, 64)))[:300])
    lines += ["images/corrupt.png", "images/truncated.png", "./images/corrupt.png"]
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "captions.jsonl"
    errors = tmp_path / "captions.jsonl.errors.jsonl"
    ckpt = tiny_checkpoint("clip", "llama", "mlp")
    cmd = [
        sys.executable,
        "-m",
        "vlm.cli",
        "caption",
        str(ckpt),
        "--manifest",
        str(manifest),
        "--out",
        str(out),
    ]
    cmd += ["--batch-size", "4", "--max-tokens", "24", "--enforce-eager", "--dtype", "float32"]

    first = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while len(_lines(out)) < 12 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)  # the CLI and its engine processes, mid-run
    finally:
        first.wait()
    written = len(_lines(out))
    assert first.returncode == -signal.SIGKILL
    assert 12 <= written < n_good, f"the kill did not land mid-run ({written} of {n_good} lines)"
    with open(out, "a") as f:  # what a kill during a write leaves behind
        f.write('{"path": "' + str(images / "img-0150.png"))

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    records = _lines(out)
    keys = [r["id"] for r in records]
    assert len(keys) == len(set(keys)) == n_good
    assert set(keys) == {str(p.resolve()) for p in images.glob("img-*.png")}
    assert all(r["model"] == ckpt.name and r["prompt"] == "Describe the image." for r in records)
    assert all(isinstance(r["caption"], str) and len(r["sha256"]) == 64 for r in records)
    failed = sorted(os.path.basename(e["id"]) for e in _lines(errors))
    assert failed == ["corrupt.png", "truncated.png"]
    assert "images/s" in second.stderr or "img/s" in second.stderr  # the progress bar
    assert "images listed more than once: 17 (17 extra" in second.stderr  # 16 good + corrupt.png, once
    assert second.stderr.count("listed more than once") == 1
    assert not vllm_info_lines(second.stdout + second.stderr), "vLLM INFO logs by default"
