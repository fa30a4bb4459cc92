"""The persisted encoding index (vlm/data/encoded_index.py): same dataset as encoding in place, rebuilt on change."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from vlm.data import encoded_index
from vlm.data.encoded_index import EncodingIndex
from vlm.data.records import load_llava_dataset
from vlm.data.samples import SampleError, SupervisedDataset


@pytest.fixture(scope="module")
def proc(build):
    return build("clip", "llama", "mlp")[1]


def _records(tmp_path) -> str:
    Image.new("RGB", (20, 20), "red").save(tmp_path / "a.png")
    good = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    rows = [
        {"id": "ok0", "image": "a.png", "conversations": good},
        {"id": "no_answer", "image": "a.png", "conversations": good[:1]},
        {"id": "gone", "image": "gone.png", "conversations": good},
        {"id": "ok1", "image": "a.png", "conversations": [good[0], {"from": "gpt", "value": "a red one"}]},
        {"id": "long", "image": "a.png", "conversations": [good[0], {"from": "gpt", "value": "red " * 300}]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _same(a: SupervisedDataset, b: SupervisedDataset):
    assert a.ids == b.ids and a.lengths == b.lengths and a.image_paths == b.image_paths
    assert a.skipped == b.skipped and a.skipped_ids == b.skipped_ids
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x["id"] == y["id"] and torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["labels"], y["labels"]) and torch.equal(x["pixel_values"], y["pixel_values"])


def test_index_gives_the_dataset_encoding_gives(proc, tmp_path):
    path = _records(tmp_path)
    index = EncodingIndex(tmp_path / "cache", path, None, proc, "chatml", 128)
    assert not index.exists()
    index.build()
    assert index.exists()
    direct = SupervisedDataset(load_llava_dataset(path), proc, "chatml", 128, on_error="skip")
    cached = SupervisedDataset([], proc, "chatml", 128, on_error="skip", encoded=index.load())
    _same(direct, cached)
    assert cached.ids == ["ok0", "ok1"]
    assert set(cached.skipped) == {"no_assistant_turn", "missing_image", "too_long"}
    # raise mode: the first bad record in file order, as encoding in place raises it
    with pytest.raises(SampleError) as err:
        SupervisedDataset([], proc, "chatml", 128, encoded=index.load())
    assert err.value.sample_id == "no_answer" and err.value.reason == "no_assistant_turn"


def test_a_changed_file_or_setting_gets_a_new_index(proc, tmp_path):
    path = _records(tmp_path)
    first = EncodingIndex(tmp_path / "cache", path, None, proc, "chatml", 128)
    assert EncodingIndex(tmp_path / "cache", path, None, proc, "chatml", 128).file == first.file
    assert EncodingIndex(tmp_path / "cache", path, None, proc, "chatml", 256).file != first.file
    assert EncodingIndex(tmp_path / "cache", path, None, proc, "plain", 128).file != first.file
    with open(path, "a") as f:
        f.write("\n")
    os.utime(path, ns=(1, 1))
    assert EncodingIndex(tmp_path / "cache", path, None, proc, "chatml", 128).file != first.file


def test_a_built_index_is_read_not_re_encoded(proc, tmp_path, monkeypatch):
    path = _records(tmp_path)
    EncodingIndex(tmp_path / "cache", path, None, proc, "chatml", 128).build()

    def refuse(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(encoded_index, "encode_records", refuse)
    index = EncodingIndex(tmp_path / "cache", path, None, proc, "chatml", 128)
    assert index.exists() and index.load().ids == ["ok0", "gone", "ok1"]
    with pytest.raises(AssertionError, match="encoded again"):
        EncodingIndex(tmp_path / "other", path, None, proc, "chatml", 128).build()
