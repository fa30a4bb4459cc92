"""Caption metrics through pycocoevalcap: CIDEr-D (its `Cider`, with the Gaussian length penalty, clipped
counts and x10) and corpus BLEU-4 (its `BleuScorer`, "closest" reference length), after COCO's PTB tokenisation.

The PTB tokenizer is Stanford CoreNLP's, run with `java` from the jar pycocoevalcap ships. Without Java (or if
it fails) a regex fallback stands in: lower case, PTB-style clitic splits ("dog's" -> "dog 's",
"don't" -> "do n't"), COCO's punctuation list removed. It is close but not identical, so the report names the
tokenizer used and scores from the two are not to be mixed.

CIDEr's IDF is computed from the references of the evaluated set itself (pycocoevalcap's default): scores
depend on which images are in the set, and a set of one image scores 0.

The human-agreement ceiling is COCO's "human" CIDEr-D: each reference is scored as a candidate against the
other references of its image, and the per-image score is the mean over these leave-one-out rounds. With 5
references the model is scored against 5 and a human against 4, as in COCO's own comparison.
"""

from __future__ import annotations

import re
import shutil
import subprocess

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--"}
PUNCTUATIONS |= {"...", ";"}
PTB = "ptb (Stanford CoreNLP via java)"
FALLBACK = "fallback regex tokenizer (no java): approximates PTB, not comparable with published CIDEr"
IDF_NOTE = "CIDEr-D IDF is computed from the references of the evaluated set itself (pycocoevalcap default)"

_CLITIC = re.compile(r"(?i)\b(\w+)(n't)\b|(\w)('s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'\w+|\w+|\.\.\.|--|[^\w\s]")


def _fallback_tokenize(text: str) -> str:
    text = _CLITIC.sub(lambda m: f"{m[1]} {m[2]}" if m[1] else f"{m[3]} {m[4]}", text.lower())
    return " ".join(t for t in _TOKEN.findall(text) if t not in PUNCTUATIONS)


def _ptb_tokenize(texts: list[str]) -> list[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # Empty lines would shift PTB's line-aligned output, so only non-empty texts go to java.
    keep = [i for i, t in enumerate(texts) if t.strip()]
    tokenized = PTBTokenizer().tokenize({i: [{"caption": texts[i]}] for i in keep})
    out = [""] * len(texts)
    for i in keep:
        out[i] = tokenized[i][0]
    return out


def tokenize(texts: list[str], use_java: bool | None = None) -> tuple[list[str], str]:
    """(tokenized texts, tokenizer name). use_java=None: PTB when java runs, else the fallback."""
    texts = [t.replace("\n", " ") for t in texts]
    if use_java is not False and shutil.which("java"):
        try:
            return _ptb_tokenize(texts), PTB
        except (OSError, subprocess.SubprocessError, KeyError):
            if use_java:
                raise
    elif use_java:
        raise FileNotFoundError("java is not on PATH; the PTB tokenizer needs it")
    return [_fallback_tokenize(t) for t in texts], FALLBACK


def cider_d(preds: list[str], refs: list[list[str]]) -> tuple[float, list[float]]:
    """Corpus CIDEr-D and per-image scores of tokenized predictions; the IDF comes from these refs."""
    from pycocoevalcap.cider.cider import Cider

    score, per = Cider().compute_score(dict(enumerate(refs)), {i: [p] for i, p in enumerate(preds)})
    return float(score), [float(x) for x in per]


def bleu4(preds: list[str], refs: list[list[str]]) -> tuple[float, list[float]]:
    """Corpus BLEU-4 ("closest" reference length, as pycocoevalcap's Bleu) and per-sentence BLEU-4."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for p, r in zip(preds, refs, strict=True):
        scorer += (p, r)
    score, per = scorer.compute_score(option="closest", verbose=0)
    return float(score[3]), [float(x) for x in per[3]]


def tokenize_pairs(
    predictions: list[str], references: list[list[str]], use_java: bool | None = None
) -> tuple[list[str], list[list[str]], str]:
    """Tokenize predictions and references in one tokenizer run; (preds, refs, tokenizer name)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("need one prediction per image and at least one image")
    if any(not refs for refs in references):
        raise ValueError("every image needs at least one reference caption")
    tokens, tokenizer = tokenize(list(predictions) + [r for refs in references for r in refs], use_java)
    preds, it = tokens[: len(predictions)], iter(tokens[len(predictions) :])
    return preds, [[next(it) for _ in r] for r in references], tokenizer


def human_cider_d(refs: list[list[str]]) -> list[float] | None:
    """Per-image human-agreement CIDEr-D of tokenized references (None when an image has fewer than 2).

    Round k scores every image's k-th reference against its others (one corpus run, so the IDF comes from the
    held-out references of that round); an image with fewer than k + 1 references sits out round k.
    """
    if any(len(r) < 2 for r in refs):
        return None
    totals, rounds = [0.0] * len(refs), [0] * len(refs)
    for k in range(max(len(r) for r in refs)):
        idx = [i for i, r in enumerate(refs) if k < len(r)]
        _, per = cider_d([refs[i][k] for i in idx], [refs[i][:k] + refs[i][k + 1 :] for i in idx])
        for i, score in zip(idx, per, strict=True):
            totals[i] += score
            rounds[i] += 1
    return [t / n for t, n in zip(totals, rounds, strict=True)]
