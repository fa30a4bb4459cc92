"""Slice grouping and the --bars file."""

from __future__ import annotations

import pytest

from vlm.eval.slices import check_bars, group_by_slice, load_bars

TASKS = ["vqa", "caption", "pope"]
METRICS = {"overall": {"n": 4, "accuracy": 0.75}, "question_type=colour": {"n": 2, "accuracy": 0.5}}


def test_group_by_slice_orders_numbers_numerically():
    items = [{"num_objects": "10"}, {"num_objects": "2"}, {"num_objects": "2", "question_type": "shape"}]
    groups = group_by_slice(items, lambda x: x)
    assert list(groups) == ["overall", "num_objects=2", "num_objects=10", "question_type=shape"]
    assert len(groups["overall"]) == 3 and len(groups["num_objects=2"]) == 2


def test_task_sections_and_flat_files(tmp_path):
    sectioned = tmp_path / "bars.yaml"
    sectioned.write_text("vqa:\n  overall: 0.5\npope:\n  overall: 0.6\n")
    assert load_bars(sectioned, "vqa", TASKS) == {"overall": 0.5}
    assert load_bars(sectioned, "caption", TASKS) == {}  # no section, no bars
    sectioned.write_text("vqa:\n  overall: 0.5\ncaptions:\n  overall: 1\n")
    with pytest.raises(ValueError, match="unknown task section"):
        load_bars(sectioned, "vqa", TASKS)
    flat = tmp_path / "flat.yaml"
    flat.write_text("overall: 0.5\n")
    assert load_bars(flat, "caption", TASKS) == {"overall": 0.5}
    with pytest.raises(FileNotFoundError):
        load_bars(tmp_path / "missing.yaml", "vqa", TASKS)


def test_check_bars_lists_every_miss():
    bars = {"overall": 0.8, "question_type=colour": {"accuracy": 0.4}}
    assert check_bars(METRICS, bars, "accuracy") == ["overall: accuracy 0.7500 < 0.8"]
    assert check_bars(METRICS, {"overall": 0.75}, "accuracy") == []  # a bar equal to the score is met
    assert len(check_bars(METRICS, {"overall": 0.9, "question_type=colour": 0.9}, "accuracy")) == 2


def test_unknown_slices_metrics_and_values_are_errors():
    with pytest.raises(ValueError, match="unknown slice 'question_type=color'"):
        check_bars(METRICS, {"question_type=color": 0.5}, "accuracy")
    with pytest.raises(ValueError, match="unknown metric overall.f1"):
        check_bars(METRICS, {"overall": {"f1": 0.5}}, "accuracy")
    with pytest.raises(ValueError, match="expected a number"):
        check_bars(METRICS, {"overall": "high"}, "accuracy")


POPE = {"overall": {"f1": 0.95, "unparsed": 0.02, "yes_ratio": 0.65}}


def test_bounds_check_maxima_and_ranges():
    bars = {"overall": {"f1": 0.9, "unparsed": {"max": 0.01}, "yes_ratio": {"min": 0.4, "max": 0.6}}}
    assert check_bars(POPE, bars, "f1") == [
        "overall: unparsed 0.0200 > 0.01",
        "overall: yes_ratio 0.6500 > 0.6",
    ]
    assert check_bars(POPE, {"overall": {"yes_ratio": {"min": 0.4, "max": 0.65}}}, "f1") == []


def test_drop_bars_compare_two_slices():
    metrics = {"phrasing=seen": {"accuracy": 0.95}, "phrasing=heldout": {"accuracy": 0.80}}
    bar = {"phrasing=heldout": {"accuracy": {"within": 0.1, "of": "phrasing=seen"}}}
    assert check_bars(metrics, bar, "accuracy") == [
        "phrasing=heldout: accuracy 0.8000 is 0.1500 below phrasing=seen (allowed 0.1)"
    ]
    metrics["phrasing=heldout"]["accuracy"] = 0.86
    assert check_bars(metrics, bar, "accuracy") == []
    with pytest.raises(ValueError, match="unknown slice 'phrasing=novel'"):
        check_bars(
            metrics, {"phrasing=heldout": {"accuracy": {"within": 0.1, "of": "phrasing=novel"}}}, "accuracy"
        )


def test_malformed_bounds_are_errors():
    for bound in ({"within": 0.1}, {"maximum": 1}, {}, {"max": "low"}):
        with pytest.raises(ValueError, match="overall.f1"):
            check_bars(POPE, {"overall": {"f1": bound}}, "f1")
