"""The training DataLoader (vlm/data/loader.py through TrainData): worker processes change nothing but speed."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.data.loader import micro_batch_loader
from vlm.data.samples import SampleError
from vlm.train.recipe import DataSource, Recipe
from vlm.train.run_data import TrainData

COLOURS = [(255, 0, 0), (0, 0, 255), (0, 160, 0), (200, 200, 0), (0, 0, 0), (90, 40, 200)]


@pytest.fixture(scope="module")
def proc(build):
    return build("clip", "llama", "mlp")[1]


def _write(tmp_path, n: int, broken: dict[int, bytes] | None = None) -> str:
    """n caption records, each with its own image (distinct sizes and colours, so pixels tell them apart)."""
    broken = broken or {}
    lines = []
    for i in range(n):
        path = tmp_path / f"im{i}.png"
        if i in broken:
            path.write_bytes(broken[i])
        else:
            Image.new("RGB", (24 + i % 5, 32), COLOURS[i % len(COLOURS)]).save(path)
        turns = [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "x" * (1 + i % 7)},
        ]
        lines.append(json.dumps({"id": f"s{i}", "image": path.name, "conversations": turns}))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return str(data)


def _data(proc, path, workers: int, rank=0, world_size=1, **kw) -> TrainData:
    recipe = Recipe(
        stage=1,
        model="unused",
        output_dir="unused",
        data=[DataSource(path)],
        template="plain",
        micro_batch_size=2,
        global_batch_size=4,
        epochs=2,
        num_workers=workers,
        seed=3,
        **kw,
    )
    return TrainData(recipe, proc, rank, world_size)


def _summary(batches):
    return [(b["ids"], b["input_ids"], b["pixel_values"]) for b in batches]


def _assert_same(a, b):
    assert len(a) == len(b) and a
    for (ids_a, tok_a, px_a), (ids_b, tok_b, px_b) in zip(a, b, strict=True):
        assert ids_a == ids_b
        assert torch.equal(tok_a, tok_b) and torch.equal(px_a, px_b)


def test_workers_yield_the_in_process_batches(proc, tmp_path):
    path = _write(tmp_path, 13)
    in_process = _summary(_data(proc, path, 0).iterate())
    assert len(in_process) == 2 * 4 * 2  # 2 epochs of ceil(13 / 4) global batches of 2 micro-batches
    _assert_same(in_process, _summary(_data(proc, path, 2).iterate()))
    # epochs differ (the order is a function of seed and epoch) and every sample shows up in each
    epoch0, epoch1 = ([i for ids, _, _ in in_process[k : k + 8] for i in ids] for k in (0, 8))
    assert epoch0 != epoch1 and set(epoch0) == set(epoch1) == {f"s{i}" for i in range(13)}


@pytest.mark.parametrize("micro_done", [3, 8, 11])  # mid-epoch, the epoch boundary, into the second epoch
def test_resume_with_workers_continues_the_uninterrupted_run(proc, tmp_path, micro_done):
    path = _write(tmp_path, 13)
    full = _summary(_data(proc, path, 0).iterate())
    resumed = _summary(_data(proc, path, 2).iterate(micro_done))
    _assert_same(resumed, full[micro_done:])


def test_two_ranks_with_workers_split_each_global_batch(proc, tmp_path):
    path = _write(tmp_path, 12)
    one = [b["ids"] for b in _data(proc, path, 0).iterate()]
    ranks = [[b["ids"] for b in _data(proc, path, 1, r, 2).iterate()] for r in range(2)]
    # one rank's step k holds micro-batches 2k and 2k+1; with two ranks each holds one of a step's halves
    for k, (a, b) in enumerate(zip(*ranks, strict=True)):
        assert sorted(a + b) == sorted(one[2 * k] + one[2 * k + 1])


def test_a_worker_sample_error_reaches_the_trainer_unchanged(proc, tmp_path):
    path = _write(tmp_path, 6, broken={4: b"\x89PNG\r\n\x1a\n truncated"})
    with pytest.raises(SampleError) as err:
        list(_data(proc, path, 2).iterate())
    assert err.value.sample_id == "s4" and err.value.reason == "corrupt_image"
    assert "im4.png" in str(err.value)


def test_skips_in_workers_are_counted_in_the_report(proc, tmp_path):
    path = _write(tmp_path, 6, broken={4: b"\x89PNG\r\n\x1a\n truncated"})
    data = _data(proc, path, 2, on_bad_sample="skip")
    batches = list(data.iterate())
    assert all("s4" not in b["ids"] for b in batches)
    assert data.skipped_report() == {"corrupt_image": 2}  # once per epoch


class _Draws(torch.utils.data.Dataset):
    """Items that are random draws, as an augmentation would make them."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[float, float, float]:
        return torch.rand(()).item(), float(np.random.rand()), random.random()


def test_worker_random_draws_are_reproducible_and_differ_between_workers():
    plan = [[0, 1], [2, 3], [4, 5], [6, 7]]

    def run(seed):
        return list(micro_batch_loader(_Draws(), list, plan, len(plan), num_workers=2, seed=seed))

    first = run(5)
    assert run(5) == first and run(6) != first
    # batches 0 and 1 come from workers 0 and 1: each of torch, NumPy and random is seeded per worker
    assert all(a != b for a, b in zip(first[0][0], first[1][0], strict=True))
