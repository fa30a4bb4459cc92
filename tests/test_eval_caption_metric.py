"""CIDEr-D and BLEU-4 through pycocoevalcap, checked against hand-computed values; PTB vs fallback tokenizer."""

from __future__ import annotations

import math
import os
import shutil

import pytest

from vlm.eval import caption_metric as cm

JAVA = shutil.which("java") is not None


def test_bleu4_hand_computed():
    # n-gram precisions 4/5, 3/4, 2/3, 1/2; same length, so no brevity penalty.
    score, per = cm.bleu4(["the cat sat on mat"], [["the cat sat on hat"]])
    assert score == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, rel=1e-6)
    assert per[0] == pytest.approx(score, rel=1e-6)
    # All precisions 1; candidate 4 words vs reference 6: brevity penalty exp(1 - 6/4).
    score, _ = cm.bleu4(["the cat sat on"], [["the cat sat on the mat"]])
    assert score == pytest.approx(math.exp(-0.5), rel=1e-6)


def test_cider_d_hand_computed():
    # Two images with disjoint words: every n-gram has df 1, IDF log 2. A candidate equal to its reference
    # has cosine 1 for n = 1, 2 and no 3-/4-grams (0), no length penalty: mean 0.5, x10 = 5.
    score, per = cm.cider_d(["red circle", "blue square"], [["red circle"], ["blue square"]])
    assert per == pytest.approx([5.0, 5.0]) and score == pytest.approx(5.0)
    score, per = cm.cider_d(["red circle", "green star"], [["red circle"], ["blue square"]])
    assert per == pytest.approx([5.0, 0.0]) and score == pytest.approx(2.5)
    # The IDF comes from the evaluated references: with one image every n-gram has IDF log(1) = 0.
    assert cm.cider_d(["red circle"], [["red circle"]])[0] == 0.0


def test_fallback_tokenizer_follows_ptb_conventions():
    tokens, name = cm.tokenize(["The dog's ball, isn't it?", "two large red circles at the top left."], False)
    assert name == cm.FALLBACK
    assert tokens == ["the dog 's ball is n't it", "two large red circles at the top left"]


# CI installs a JRE (.ci/run), so there a missing java is a broken install step, not a reason to skip.
@pytest.mark.skipif(
    not JAVA and not os.environ.get("CI"), reason="java is not installed: the PTB tokenizer cannot run"
)
def test_ptb_tokenizer_runs_with_java_and_matches_the_fallback_on_simple_text():
    texts = ["The dog's ball, isn't it?", "", "two large red circles at the top left."]
    tokens, name = cm.tokenize(texts)
    assert name == cm.PTB
    assert tokens == ["the dog 's ball is n't it", "", "two large red circles at the top left"]
    assert cm.tokenize(texts, use_java=False)[0] == tokens


def test_tokenize_pairs_checks_its_input():
    with pytest.raises(ValueError, match="reference"):
        cm.tokenize_pairs(["a"], [[]], use_java=False)
    with pytest.raises(ValueError, match="one prediction per image"):
        cm.tokenize_pairs(["a", "b"], [["a"]], use_java=False)


def test_human_ceiling_hand_computed():
    # Each image's references are scored against its others, round by round; each round's IDF comes from that
    # round's held-out references. Agreeing references score as a perfect candidate does (5, see above).
    same = [["red circle", "red circle"], ["blue square", "blue square"]]
    assert cm.human_cider_d(same) == pytest.approx([5.0, 5.0])
    # Image 0's two references share nothing: 0 in both rounds; image 1 still agrees.
    assert cm.human_cider_d([["red circle", "green star"], ["blue square", "blue square"]]) == pytest.approx(
        [0.0, 5.0]
    )
    # Three references. Rounds 0 and 1 score "red circle" against ["red circle", "green star"]: CIDEr averages
    # over references, 5 and 0, so 2.5. Round 2 scores "green star" against two "red circle"s: 0. Mean 5/3.
    per = cm.human_cider_d([["red circle", "red circle", "green star"], ["blue square"] * 3])
    assert per == pytest.approx([5 / 3, 5.0])
    assert cm.human_cider_d([["a b"], ["c d", "c d"]]) is None  # an image with one reference has no ceiling
