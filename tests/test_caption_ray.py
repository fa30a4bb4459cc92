"""`vlm caption --engine ray` on a real two-node Ray cluster on loopback, with the real vLLM engine.

One engine actor is SIGKILLed mid-run; the output must still hold each image exactly once, with the captions the
single-process engine gives, and a second run writes nothing. Parquet and WebDataset inputs, on a Ray instance the
job starts itself, give the same captions.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from vllm_helpers import free_port, noise_image, png_bytes, tiny_checkpoint

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

N_GOOD = 200
RAY = str(Path(sys.executable).with_name("ray"))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _caption_cmd(ckpt: Path, out: Path, *args) -> list[str]:
    return [
        sys.executable, "-m", "vlm.cli", "caption", str(ckpt), "--out", str(out), *map(str, args),
        "--batch-size", "8", "--max-tokens", "12", "--enforce-eager", "--dtype", "float32",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and one worker node, 2 logical CPUs each (one engine actor per node), on loopback, with Ray's
    token authentication (its default): every process of the test, the jobs included, carries the token."""
    import secrets

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    port, env = free_port(), dict(os.environ)
    common = ["--num-cpus", "2", "--disable-usage-stats"]
    subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--include-dashboard", "false", *common], check=True, capture_output=True, env=env)  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run([RAY, "start", "--address", address, "--node-ip-address", "127.0.0.1", *common],
                       check=True, capture_output=True, env=env)  # fmt: skip
        yield address
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True)
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-images")
    (root / "images").mkdir()
    for i in range(N_GOOD):
        (root / "images" / f"img-{i:04d}.png").write_bytes(png_bytes(noise_image(i, size=(28 + i % 9, 32))))
    (root / "images" / "corrupt.png").write_bytes(b"not an image at all")
    (root / "images" / "truncated.png").write_bytes(png_bytes(noise_image(999, size=(64, 64)))[:300])
    return root


@pytest.fixture(scope="module")
def reference(images):
    """The single-process engine's captions: {sha256: caption}."""
    ckpt = tiny_checkpoint("clip", "llama", "mlp")
    out = images / "local.jsonl"
    run = subprocess.run(
        _caption_cmd(ckpt, out, "--images", images / "images"), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    records = _lines(out)
    assert len(records) == N_GOOD
    return {r["sha256"]: r["caption"] for r in records}


def _engine_actors() -> list[int]:
    import psutil

    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any("MapWorker(MapBatches(Captioner))" in part for part in p.info["cmdline"] or [])
    ]


def test_parquet_and_webdataset_on_a_local_ray_give_the_single_process_captions(images, reference):
    """Without RAY_ADDRESS or --ray-address, the job starts its own Ray instance (one engine actor here)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ckpt = tiny_checkpoint("clip", "llama", "mlp")
    data = [(images / "images" / f"img-{i:04d}.png").read_bytes() for i in range(0, N_GOOD, 5)]
    pq.write_table(pa.table({"image": data[:20]}), images / "in.parquet", row_group_size=8)
    with tarfile.open(images / "00000.tar", "w") as tar:
        for i, blob in enumerate([*data[20:], b"junk"]):
            info = tarfile.TarInfo(f"{i:05d}.png")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    for flag, source, out, n in [
        ("--parquet", images / "in.parquet", images / "pq.parquet", 20),
        ("--webdataset", images / "00000.tar", images / "wds.jsonl", len(data) - 20),
    ]:
        cmd = _caption_cmd(ckpt, out, flag, source, "--engine", "ray")
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        rows = pq.read_table(out).to_pylist() if out.suffix == ".parquet" else _lines(out)
        assert len(rows) == n and all(reference[r["sha256"]] == r["caption"] for r in rows)
    [junk] = _lines(images / "wds.jsonl.errors.jsonl")
    assert junk["source"].endswith("00000.tar:00020.png") and junk["cause"] == "not a readable image"


def test_an_actor_killed_mid_run_loses_and_repeats_nothing(cluster, images, reference):
    ckpt = tiny_checkpoint("clip", "llama", "mlp")
    out, errors = images / "ray.jsonl", images / "ray.jsonl.errors.jsonl"
    cmd = _caption_cmd(ckpt, out, "--images", images / "images", "--engine", "ray", "--ray-address", cluster)
    log = (images / "ray.log").open("w")
    job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    killed, written_at_kill = None, 0
    try:
        # A hang guard only: on a loaded 2-core box starting the two engines alone takes minutes.
        deadline = time.monotonic() + 900
        while job.poll() is None and time.monotonic() < deadline and not killed:
            written = len(_lines(out))
            if written >= 8 and len(actors := _engine_actors()) == 2:  # results flow, and work is left
                killed, written_at_kill = actors[0], written
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        job.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        job.kill()
    text = (images / "ray.log").read_text()
    assert job.returncode == 0, text[-4000:]
    assert killed is not None and written_at_kill < N_GOOD, "the kill did not land mid-run"

    records = _lines(out)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == N_GOOD, "each image exactly once"
    assert {r["sha256"]: r["caption"] for r in records} == reference, "the single-process engine's captions"
    assert all(r["model"] == ckpt.name and r["generation"]["max_tokens"] == 12 for r in records)
    failed = sorted((Path(e["id"]).name, e["cause"]) for e in _lines(errors))
    assert failed == [("corrupt.png", "not a readable image"), ("truncated.png", "not a readable image")]
    assert "2 not a readable image" in text and "images/s" in text  # the summary

    before = out.read_bytes(), errors.read_bytes()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out.read_bytes(), errors.read_bytes()) == before, "a second run writes nothing"
