"""Checkpoint faults without a training run: a stand-in engine writes and loads real files through the
CheckpointManager. Corrupted, truncated or missing files are caught by the manifest and resume falls back to
the previous good checkpoint; a full disk during save is a clear error that leaves the previous one intact.
The same faults on real DeepSpeed runs: `make reliability-train` (bench/reliability.py train).
"""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch

from vlm.train import checkpoints
from vlm.train.checkpoints import CheckpointError, CheckpointManager, CorruptCheckpoint
from vlm.train.metrics import MetricsLogger

MODEL_FILE = "mp_rank_00_model_states.pt"


class FakeEngine:
    """The two DeepSpeed engine calls the manager makes, writing/reading one tensor per step."""

    def __init__(self):
        self.value = torch.zeros(4096)

    def save_checkpoint(self, root, tag, save_latest):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"value": self.value}, Path(root) / tag / MODEL_FILE)

    def load_checkpoint(self, root, tag, **kwargs):
        self.value = torch.load(Path(root) / tag / MODEL_FILE)["value"]
        return str(Path(root) / tag), {}


@pytest.fixture
def saved(tmp_path):
    """Checkpoints at steps 1, 2, 3 whose engine value equals the step."""
    manager, engine = CheckpointManager(tmp_path, rank=0, world_size=1, keep=3), FakeEngine()
    for step in (1, 2, 3):
        engine.value = torch.full((4096,), float(step))
        manager.save(engine, step, {"micro_batches_done": step * 2})
    return manager


def resumed_step(manager) -> int:
    engine = FakeEngine()
    path, state = manager.load_latest_good(engine)
    assert engine.value[0].item() == state["step"] and path.name == f"step-{state['step']:07d}"
    return state["step"]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {  # name -> (how, message fragment)
    "flipped byte": (lambda d: flip_byte(d / MODEL_FILE), "does not match its SHA-256"),
    "truncated file": (lambda d: (d / MODEL_FILE).write_bytes((d / MODEL_FILE).read_bytes()[:100]), "bytes"),
    "deleted file": (lambda d: (d / MODEL_FILE).unlink(), "is missing"),
    "deleted rng state": (lambda d: (d / "rng_rank0.pt").unlink(), "is missing"),
    "garbled trainer state": (lambda d: (d / "trainer_state.json").write_text("{ not json"), "unreadable"),
    "emptied trainer state": (lambda d: (d / "trainer_state.json").write_text("{}"), "lacks step"),
    "garbled manifest": (lambda d: (d / "manifest.json").write_text("[1, 2"), "unreadable manifest"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_reported_and_the_previous_one_resumes(saved, damage, caplog):
    how, fragment = DAMAGE[damage]
    how(saved.root / "step-0000003")
    with caplog.at_level(logging.WARNING, logger="vlm.train"):
        assert resumed_step(saved) == 2
    assert fragment in caplog.text and "step-0000003" in caplog.text and "falling back" in caplog.text


def test_every_checkpoint_damaged_is_an_error_not_a_silent_restart(saved):
    for step in (1, 2, 3):
        flip_byte(saved.root / f"step-{step:07d}" / MODEL_FILE)
    with pytest.raises(CorruptCheckpoint, match="no checkpoint in .* verifies"):
        saved.load_latest_good(FakeEngine())


def test_an_interrupted_save_leaves_only_staging(saved):
    (saved.root / ".staging" / "step-0000004").mkdir(parents=True)  # a save killed before its rename
    (saved.root / ".staging" / "step-0000004" / MODEL_FILE).write_bytes(b"partial")
    assert resumed_step(saved) == 3


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),  # torch.save's
    ],
)
def test_a_full_disk_during_save_is_a_clear_error_and_keeps_the_previous_checkpoint(
    saved, failure, monkeypatch
):
    before = {p: p.read_bytes() for p in (saved.root / "step-0000003").iterdir()}
    engine = FakeEngine()

    def fill_then_fail(root, tag, save_latest):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / MODEL_FILE).write_bytes(b"half a checkpoint")
        raise failure

    monkeypatch.setattr(engine, "save_checkpoint", fill_then_fail)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: type("U", (), {"free": 4096})())
    with pytest.raises(CheckpointError) as info:
        saved.save(engine, 4, {"micro_batches_done": 8})
    message = str(info.value)
    assert "saving checkpoint step-0000004 failed: the disk is full (4096 bytes free" in message
    assert "step-0000003 is intact" in message
    assert not (saved.root / ".staging" / "step-0000004").exists()  # the space is given back
    assert not (saved.root / "step-0000004").exists()
    assert (saved.root / "latest").read_text() == "step-0000003"
    assert {p: p.read_bytes() for p in (saved.root / "step-0000003").iterdir()} == before
    assert resumed_step(saved) == 3


def test_other_save_errors_keep_their_own_message(saved, monkeypatch):
    engine = FakeEngine()
    monkeypatch.setattr(
        engine, "save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "no"))
    )
    with pytest.raises(CheckpointError, match="PermissionError.*step-0000003 is intact"):
        saved.save(engine, 4, {"micro_batches_done": 8})


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True)
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    logger.path.write_text("\n".join(lines) + '\n{"step": 4, "lo')  # killed mid-write
    logger.truncate_after(2)
    assert [r["step"] for r in logger.read()] == [1, 2]


def _draws(device: str = "cpu") -> list:
    """One value from every generator a resumed run draws from: Python, NumPy, torch (dropout masks included)."""
    import random

    import numpy as np

    mask = torch.nn.functional.dropout(torch.ones(64, device=device), p=0.5, training=True)
    return [random.random(), float(np.random.rand()), torch.rand(3).tolist(), mask.tolist()]


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    manager, engine = CheckpointManager(tmp_path, rank=0, world_size=1), FakeEngine()
    torch.manual_seed(1)
    path = manager.save(engine, 1, {"micro_batches_done": 2})
    after_save = _draws()
    _draws()  # the run goes on (or another process starts fresh): the generators move
    manager.load(FakeEngine(), path)
    assert _draws() == after_save
    saved = torch.load(path / "rng_rank0.pt", weights_only=False)
    assert ("cuda" in saved) == torch.cuda.is_available()


def test_a_state_saved_without_cuda_restores_the_cpu_generators(caplog):
    state = checkpoints.rng_state()
    state.pop("cuda", None)  # a checkpoint from a CPU run, or from before the CUDA state was saved
    expected = _draws()
    with caplog.at_level(logging.WARNING, logger="vlm.train"):
        checkpoints.set_rng_state(state, "ckpt/rng_rank0.pt")
    assert _draws() == expected
    # With a GPU, its generators keep this run's seed, and the log says so; without one there is nothing to say.
    assert ("has no CUDA RNG state" in caplog.text) == torch.cuda.is_available()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU-less side of a checkpoint saved with GPUs")
def test_gpu_states_in_a_checkpoint_are_reported_not_fatal_without_a_gpu(caplog):
    state = {**checkpoints.rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}
    expected = _draws()
    with caplog.at_level(logging.WARNING, logger="vlm.train"):
        checkpoints.set_rng_state(state, "ckpt/rng_rank0.pt")
    assert _draws() == expected
    assert "ckpt/rng_rank0.pt holds 2 GPUs' RNG states; this run has no GPU" in caplog.text


@pytest.mark.gpu
def test_cuda_rng_state_round_trips_through_a_checkpoint(tmp_path):
    """LoRA dropout on a GPU draws from the CUDA generator: a resume must replay the same masks."""
    manager = CheckpointManager(tmp_path, rank=0, world_size=1)
    torch.cuda.manual_seed_all(1)
    path = manager.save(FakeEngine(), 1, {"micro_batches_done": 2})
    after_save = _draws("cuda")
    _draws("cuda")
    manager.load(FakeEngine(), path)
    assert _draws("cuda") == after_save
