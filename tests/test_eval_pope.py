"""POPE probe: generator (balanced splits, negatives absent and of the right kind) and POPE's scoring."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from vlm.data import pope as pope_data
from vlm.data import synth
from vlm.eval.pope import is_unparsed, parse_yes_no, pope_metrics


@pytest.fixture(scope="module")
def scenes():
    return [s.to_dict() for s, _ in synth.iter_scenes(60, seed=0, split="eval")]


def test_each_split_is_balanced_and_negatives_are_absent(scenes):
    records = pope_data.pope_records(scenes)
    assert len(records) == len(scenes) * 3 * 2
    assert len({r["id"] for r in records}) == len(records)
    by_scene = {s["id"]: pope_data.scene_object(s) for s in scenes}
    for split in pope_data.SPLITS:
        rows = [r for r in records if r["pope_split"] == split]
        assert Counter(r["answers"][0] for r in rows) == {"yes": len(scenes), "no": len(scenes)}
        for r in rows:
            present = by_scene[r["scene_id"]]
            assert (r["object"] == present) == (r["answers"] == ["yes"])
            assert r["conversations"][0]["value"].startswith("<image>\nIs there ")
            assert r["conversations"][1]["value"] == r["answers"][0]


def test_negative_sampling_kinds(scenes):
    records = pope_data.pope_records(scenes)
    ranking = pope_data.popularity(scenes)
    for r in records:
        if r["answers"] != ["no"]:
            continue
        present = pope_data.scene_object(next(s for s in scenes if s["id"] == r["scene_id"]))
        colour, shape = present.split()
        if r["pope_split"] == "popular":  # the most frequent object the scene lacks
            assert r["object"] == next(o for o in ranking if o != present)
        if r["pope_split"] == "adversarial":  # same colour or same shape, never both
            o_colour, o_shape = r["object"].split()
            assert (o_colour == colour) != (o_shape == shape)


def test_question_article_and_determinism(scenes):
    records = pope_data.pope_records(scenes, seed=3)
    assert records == pope_data.pope_records(scenes, seed=3)
    questions = {r["conversations"][0]["value"] for r in records}
    assert all(("an orange" in q) or ("a orange" not in q) for q in questions)
    assert any("an orange" in q for q in questions)


def test_synth_writes_pope_eval(tmp_path):
    paths = synth.generate(tmp_path, n=2, n_eval=4, progress=False)
    lines = paths["pope_eval"].read_text().splitlines()
    assert len(lines) == 4 * 6
    assert json.loads(paths["manifest"].read_text())["files"]["pope_eval"]["records"] == 24


def test_pope_parsing_as_pope_does_it():
    assert parse_yes_no("Yes, there is.") == "yes"
    assert parse_yes_no("No") == "no"
    assert parse_yes_no("There is not a dog.") == "no"
    assert parse_yes_no("Yes. No.") == "yes"  # only the first sentence counts
    assert parse_yes_no("red") == "yes"  # neither word: POPE counts it as yes ...
    assert is_unparsed("red") and not is_unparsed("No!")  # ... and we count it as unparsed


def test_pope_metrics_hand_computed():
    preds = ["yes", "no", "Yes, it is.", "not at all", "red"]
    labels = ["yes", "no", "no", "yes", "no"]
    # parsed: yes no yes no yes -> TP 1, FP 2, FN 1, TN 1
    m = pope_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(0.4)
    assert m["yes_ratio"] == pytest.approx(3 / 5)
    assert m["unparsed"] == pytest.approx(1 / 5)


def test_data_pope_command_rebuilds_the_file_synth_wrote(tmp_path, capsys):
    from vlm.cli import main

    paths = synth.generate(tmp_path, n=2, n_eval=4, progress=False)
    out = tmp_path / "again.jsonl"
    assert main(["data", "pope", "--scenes", str(paths["scenes_eval"]), "--out", str(out)]) == 0
    assert out.read_text() == paths["pope_eval"].read_text()
    assert main(["data", "pope", "--scenes", str(tmp_path / "missing.jsonl")]) == 2
    assert "scenes file not found" in capsys.readouterr().err
