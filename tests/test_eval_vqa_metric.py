"""The official VQA normalisation and accuracy, pinned on hand-computed cases."""

from __future__ import annotations

import pytest

from vlm.eval.vqa_metric import normalize_answer, vqa_score


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two.", "2"),  # final period dropped, number word -> digit
        ("the dog's", "dog's"),  # article dropped; the apostrophe is not punctuation here
        ("1,000", "1000"),  # digit,digit: the comma is removed, not spaced
        ("1,000 dogs!", "1000 dogs"),  # ... and then every punctuation mark is removed outright
        ("no!", "no"),  # '!' touching no space becomes a space, then trimmed
        ("yes ", "yes"),
        ("Yes.", "yes"),
        ("\tcat\n", "cat"),
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("e.g. this", "eg this"),
        ("hello, world", "hello world"),  # ', ' -> the comma is removed
        ("red-circle", "red circle"),  # '-' touching no space -> space
        ("top - left", "top left"),  # ' -' -> removed, the double space collapses
        ("(a) red", "red"),  # '(' -> space, ') ' -> removed, article dropped
        ("what?!", "what"),
        ("An apple", "apple"),
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("dont", "don't"),  # contraction repaired
        ("isnt it", "isn't it"),
        ("Im", "im"),  # the official map's "Im" key never matches: words are lower-cased first
        ("top left", "top left"),
    ],
)
def test_normalization(raw, expected):
    assert normalize_answer(raw) == expected


def test_single_reference_is_exact_match_after_normalisation():
    assert vqa_score("Two.", ["2"]) == 1.0
    assert vqa_score("the Red", ["red"]) == 1.0
    assert vqa_score("3", ["2"]) == 0.0


def test_ten_references_leave_one_out():
    refs = ["2"] * 3 + ["3"] * 7
    # Leaving out a "2": 2 matches left -> 2/3; leaving out a "3": 3 matches -> 1.  (3 * 2/3 + 7) / 10
    assert vqa_score("two", refs) == pytest.approx(0.9)
    # One matching reference: 0 when it is left out, 1/3 in the other nine subsets.
    assert vqa_score("blue", ["blue"] + ["red"] * 9) == pytest.approx(0.3)
    assert vqa_score("red", ["blue"] + ["red"] * 9) == 1.0
    assert vqa_score("green", ["blue"] + ["red"] * 9) == 0.0


def test_two_or_three_references_match_any():
    assert vqa_score("red", ["red", "crimson"]) == 1.0
    assert vqa_score("blue", ["red", "crimson", "scarlet"]) == 0.0
    with pytest.raises(ValueError):
        vqa_score("x", [])
