"""Resumable checkpoints: DeepSpeed engine state + trainer state + per-rank RNG (CPU and GPU), written atomically.

Every rank writes into `ROOT/.staging/TAG`; after a barrier rank 0 writes `trainer_state.json` last, then renames
the directory to `ROOT/TAG` (atomic on one filesystem) and updates `ROOT/latest`. A killed save therefore leaves
only a staging directory, never a `step-*` directory that looks complete.

Before `trainer_state.json`, rank 0 writes `manifest.json`: the size and SHA-256 of every file. `--resume` checks
it and, when a checkpoint was truncated or corrupted on disk afterwards, says which file is wrong and falls back
to the previous good checkpoint. A failed save (a full disk, say) removes its staging directory and stops the
run with a clear error; the previous checkpoints are untouched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
LOW_SPACE = 16 * 1024 * 1024

log = logging.getLogger("vlm.train")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written."""


class CorruptCheckpoint(ValueError):
    """A checkpoint on disk does not match what was written: resume falls back to an older one."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _data_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name not in (STATE_FILE, MANIFEST_FILE))


def build_manifest(path: Path) -> dict[str, list]:
    """{relative path: [bytes, sha256]} of every file in a checkpoint directory but the state and manifest."""
    return {str(p.relative_to(path)): [p.stat().st_size, _sha256(p)] for p in _data_files(path)}


def verify_manifest(path: Path) -> None:
    """Raise CorruptCheckpoint naming the first file that is missing, extra, resized or altered."""
    if not (path / STATE_FILE).is_file():
        raise CorruptCheckpoint(f"checkpoint {path} is incomplete or gone (no {STATE_FILE})")
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        log.warning(
            "checkpoint %s has no %s (written by an older version); not verified", path, MANIFEST_FILE
        )
        return
    except (OSError, ValueError) as err:
        raise CorruptCheckpoint(f"checkpoint {path}: unreadable {MANIFEST_FILE}: {err}") from None
    present = {str(p.relative_to(path)) for p in _data_files(path)}
    missing = sorted(set(manifest) - present)
    if missing:
        raise CorruptCheckpoint(f"checkpoint {path}: file {missing[0]} is missing ({len(missing)} missing)")
    for name, (size, digest) in manifest.items():
        actual = (path / name).stat().st_size
        if actual != size:
            raise CorruptCheckpoint(f"checkpoint {path}: {name} is {actual} bytes, {size} were written")
        if _sha256(path / name) != digest:
            raise CorruptCheckpoint(f"checkpoint {path}: {name} does not match its SHA-256 (corrupted)")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_failure(err: Exception, tag: str, root: Path, previous: str | None) -> CheckpointError:
    free = shutil.disk_usage(root).free if root.exists() else 0
    # torch.save's RuntimeError on a full disk names no errno ("unexpected pos ..."): judge by free space too.
    full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err) or free < LOW_SPACE
    reason = f"the disk is full ({free} bytes free on {root})" if full else f"{type(err).__name__}: {err}"
    kept = (
        f"the previous checkpoint {root / previous} is intact" if previous else "no earlier checkpoint exists"
    )
    return CheckpointError(f"saving checkpoint {tag} failed: {reason}; {kept}; free space and --resume")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch CPU generators, and every visible GPU's (LoRA dropout on a GPU draws from those)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], source: str | Path = "the checkpoint") -> None:
    """Restore `rng_state()`'s generators. A state without "cuda" (saved on a CPU, or before it was saved) leaves
    the GPU generators as seeded; a different GPU count restores the devices both have, with a warning."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if not torch.cuda.is_available():
        if cuda:
            log.warning(
                "%s holds %d GPUs' RNG states; this run has no GPU, so they are not restored",
                source,
                len(cuda),
            )
        return
    if cuda is None:
        log.warning(
            "%s has no CUDA RNG state (saved without a GPU, or by an older version): GPU-side randomness such as "
            "LoRA dropout continues from this run's seed, not from where the run stopped",
            source,
        )
        return
    devices = torch.cuda.device_count()
    if len(cuda) != devices:
        log.warning(
            "%s holds the RNG states of %d GPUs but this process sees %d; restoring the first %d, so GPU-side "
            "randomness may not resume identically",
            source,
            len(cuda),
            devices,
            min(len(cuda), devices),
        )
    for index, device_state in enumerate(cuda[:devices]):
        torch.cuda.set_rng_state(device_state, index)


class CheckpointManager:
    def __init__(self, root: str | Path, rank: int, world_size: int, keep: int = 2):
        self.root = Path(root)
        self.rank, self.world_size, self.keep = rank, world_size, keep

    # -- saving ----------------------------------------------------------------------------------------------
    def save(self, engine, step: int, trainer_state: dict[str, Any]) -> Path:
        tag = f"step-{step:07d}"
        staging_root = self.root / ".staging"
        if self.rank == 0:
            shutil.rmtree(staging_root / tag, ignore_errors=True)
        _barrier()
        previous = self._latest_tag()
        try:
            engine.save_checkpoint(str(staging_root), tag=tag, save_latest=False)
            torch.save(rng_state(), staging_root / tag / f"rng_rank{self.rank}.pt")
            _barrier()
            if self.rank == 0:
                self._seal(staging_root / tag, {**trainer_state, "step": step, "tag": tag})
                self._publish(staging_root / tag)
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
            failure = _save_failure(err, tag, self.root, previous)  # measures free space before cleanup
            shutil.rmtree(staging_root / tag, ignore_errors=True)  # give the space back
            raise failure from err
        _barrier()
        return self.root / tag

    def _publish(self, staging: Path) -> None:
        final = self.root / staging.name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        _write_atomic(self.root / "latest", staging.name)
        _fsync_dir(self.root)
        self._prune()

    def _seal(self, staging: Path, state: dict[str, Any]) -> None:
        """Manifest, then trainer state last: a directory with a state file is complete."""
        _fsync_tree(staging)
        _write_atomic(staging / MANIFEST_FILE, json.dumps(build_manifest(staging), indent=1))
        _write_atomic(staging / STATE_FILE, json.dumps({**state, "world_size": self.world_size}, indent=2))

    def _latest_tag(self) -> str | None:
        latest = self.root / "latest"
        return latest.read_text().strip() if latest.is_file() else None

    def _prune(self) -> None:
        tags = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in tags[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # -- loading ---------------------------------------------------------------------------------------------
    def candidates(self) -> list[Path]:
        """Complete checkpoints, newest first (`latest` first when it names one)."""
        tags = sorted((p for p in self.root.glob("step-*") if (p / STATE_FILE).is_file()), reverse=True)
        latest = self.root / "latest"
        if latest.is_file():
            named = self.root / latest.read_text().strip()
            if named in tags:
                tags.remove(named)
                tags.insert(0, named)
        return tags

    def read_state(self, path: Path) -> dict[str, Any]:
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError) as err:
            raise CorruptCheckpoint(f"checkpoint {path} has an unreadable {STATE_FILE}: {err}") from None
        if not isinstance(state, dict) or not {"step", "micro_batches_done"} <= state.keys():
            raise CorruptCheckpoint(f"checkpoint {path}: {STATE_FILE} lacks step / micro_batches_done")
        if state.get("world_size") != self.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {state.get('world_size')} processes but this run has "
                f"{self.world_size}; resume with the same process count, or convert it with DeepSpeed's "
                f"`python -m deepspeed.checkpoint.ds_to_universal --input_folder {path} --output_folder OUT` "
                f"and load the universal checkpoint"
            )
        return state

    def load_latest_good(self, engine) -> tuple[Path, dict[str, Any]] | None:
        """Load the newest checkpoint that verifies; a corrupt one is reported and skipped, never loaded."""
        candidates, problems = self.candidates(), []
        for path in candidates:
            try:
                verify_manifest(path)
                return path, self.load(engine, path)
            except CorruptCheckpoint as err:
                log.warning("%s; falling back to the previous checkpoint", err)
                problems.append(str(err))
        if problems:  # never silently restart from step 0 over checkpoints that exist
            raise CorruptCheckpoint(f"no checkpoint in {self.root} verifies: {'; '.join(problems)}")
        return None

    def load(self, engine, path: Path) -> dict[str, Any]:
        state = self.read_state(path)
        loaded, _ = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise ValueError(f"DeepSpeed could not load the checkpoint in {path}")
        rng_file = path / f"rng_rank{self.rank}.pt"
        set_rng_state(torch.load(rng_file, weights_only=False), rng_file)
        return state
