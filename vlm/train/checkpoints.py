"""Resumable checkpoints: DeepSpeed engine state + trainer state + per-rank RNG, written atomically.

Every rank writes into `ROOT/.staging/TAG`; after a barrier rank 0 writes `trainer_state.json` last, then renames
the directory to `ROOT/TAG` (atomic on one filesystem) and updates `ROOT/latest`. A killed save therefore leaves
only a staging directory, never a `step-*` directory that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

STATE_FILE = "trainer_state.json"


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
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


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
        engine.save_checkpoint(str(staging_root), tag=tag, save_latest=False)
        torch.save(rng_state(), staging_root / tag / f"rng_rank{self.rank}.pt")
        _barrier()
        final = self.root / tag
        if self.rank == 0:
            state = {**trainer_state, "step": step, "world_size": self.world_size, "tag": tag}
            _fsync_tree(staging_root / tag)
            _write_atomic(staging_root / tag / STATE_FILE, json.dumps(state, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging_root / tag, final)
            _write_atomic(self.root / "latest", tag)
            self._prune()
        _barrier()
        return final

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
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"checkpoint {path} has an unreadable {STATE_FILE}: {err}") from err
        if state.get("world_size") != self.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {state.get('world_size')} processes but this run has "
                f"{self.world_size}; resume with the same process count, or convert it with DeepSpeed's "
                f"`python -m deepspeed.checkpoint.ds_to_universal --input_folder {path} --output_folder OUT` "
                f"and load the universal checkpoint"
            )
        return state

    def load(self, engine, path: Path) -> dict[str, Any]:
        state = self.read_state(path)
        loaded, _ = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise ValueError(f"DeepSpeed could not load the checkpoint in {path}")
        set_rng_state(torch.load(path / f"rng_rank{self.rank}.pt", weights_only=False))
        return state
