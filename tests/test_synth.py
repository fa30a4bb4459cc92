"""The synthetic shapes generator: determinism, counts, splits, validity, pixels vs metadata, text coverage."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from vlm.data import synth, synth_text
from vlm.data.cli import add_parser
from vlm.data.records import load_llava_dataset, validate_record

N, N_EVAL = 40, 12
IMAGE_FILES = (*synth.STAGE2_SOURCES[:-1], "caption_eval", "describe_eval", "vqa_eval", "pope_eval")
RECORD_FILES = (*IMAGE_FILES, "text_train", "lm_train")
SUFFIX = "\n" + synth_text.SHORT_ANSWER


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> dict[str, Path]:
    return synth.generate(tmp_path_factory.mktemp("synth"), N, seed=0, n_eval=N_EVAL, progress=False)


@pytest.fixture(scope="module")
def data(out) -> dict[str, list[dict]]:
    return {name: _read_jsonl(out[name]) for name in synth.FILES}


def test_same_seed_is_byte_identical_and_other_seed_differs(out, tmp_path):
    again = synth.generate(tmp_path / "again", N, seed=0, n_eval=N_EVAL, progress=False)
    other = synth.generate(tmp_path / "other", N, seed=1, n_eval=N_EVAL, progress=False)
    ref = _tree_bytes(out["root"])
    assert len(ref) == N + N_EVAL + len(synth.FILES) + 1  # images + jsonl + manifest
    assert _tree_bytes(again["root"]) == ref
    differ = _tree_bytes(other["root"])
    assert differ.keys() == ref.keys()
    assert differ["vqa_train.jsonl"] != ref["vqa_train.jsonl"]
    assert sum(differ[k] != ref[k] for k in ref if k.endswith(".png")) > (N + N_EVAL) // 2


def test_counts_and_manifest(out, data):
    assert len(list(out["images_train"].glob("*.png"))) == N
    assert len(list(out["images_eval"].glob("*.png"))) == N_EVAL
    for name, expected in (("scenes_train", N), ("caption_train", N), ("vqa_train", N)):
        assert len(data[name]) == expected, name
    assert len(data["scenes_eval"]) == len(data["caption_eval"]) == N_EVAL
    single = sum(s["count"] == 1 for s in data["scenes_eval"])
    assert len(data["vqa_eval"]) == 3 * N_EVAL + single  # colour, shape, count (+ position if one shape)
    manifest = json.loads(out["manifest"].read_text())
    assert manifest["seed"] == 0 and manifest["image_sizes"] == [32, 48, 64]
    assert manifest["n_train_images"] == N and manifest["n_eval_images"] == N_EVAL
    assert {k: v["records"] for k, v in manifest["files"].items()} == {k: len(v) for k, v in data.items()}
    assert manifest["answers"]["count"] == ["1", "2", "3"]


def test_default_n_eval_and_bad_n(tmp_path):
    assert synth.default_n_eval(2000) == 200 and synth.default_n_eval(10) == 50
    for bad in (0, -3):
        with pytest.raises(ValueError, match="n .*must be an integer >= 1"):
            synth.generate(tmp_path, bad, progress=False)
    with pytest.raises(ValueError, match="image_sizes"):
        synth.generate(tmp_path, 5, image_sizes=(8,), progress=False)


def test_train_and_eval_ids_are_disjoint_and_unique(data):
    train = {s["id"] for s in data["scenes_train"]}
    evals = {s["id"] for s in data["scenes_eval"]}
    assert len(train) == N and len(evals) == N_EVAL and not train & evals
    for name in RECORD_FILES:
        ids = [r["id"] for r in data[name]]
        assert len(ids) == len(set(ids)), name
    assert {r["scene_id"] for r in data["vqa_eval"]} == evals
    for name in IMAGE_FILES:
        split = "train" if name.endswith("_train") else "eval"
        assert all(r["image"].startswith(f"images/{split}/") for r in data[name]), name


def test_every_record_is_valid(out, data):
    for name in RECORD_FILES:
        for r in data[name]:
            assert validate_record(r, out["root"]) == [], (name, r)
            assert r["conversations"][0]["value"].startswith("<image>\n") == (name in IMAGE_FILES), (name, r)
    for r in data["caption_eval"] + data["describe_eval"] + data["vqa_eval"]:
        assert len(r["conversations"]) == 2 and r["answers"][0] == r["conversations"][1]["value"]
        assert set(r) >= {"answers", "question_type", "num_objects", "image_size", "scene_id"}


def test_pixels_match_scene_metadata(out, data):
    white = (255, 255, 255)
    for s in data["scenes_train"] + data["scenes_eval"]:
        img = Image.open(out["root"] / s["image"]).convert("RGB")
        side = s["width"]
        assert img.size == (side, s["height"]) == (side, side) and side in (32, 48, 64)
        colour = synth.COLOURS[s["colour"]]
        half = side // 2
        for quadrant, (x0, y0, x1, y1) in zip(s["quadrants"], s["boxes"], strict=True):
            # The box stays inside its quadrant.
            qx, qy = ("right" in quadrant) * half, ("bottom" in quadrant) * half
            assert qx <= x0 < x1 < qx + half and qy <= y0 < y1 < qy + half, (s, quadrant)
            assert img.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == colour, (s["id"], quadrant)
            # The outline tells the shapes apart: squares fill their box corners, circles none,
            # triangles (apex up) only the bottom ones.
            corners = [img.getpixel(p) == colour for p in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))]
            expected = {"square": [True] * 4, "circle": [False] * 4, "triangle": [False, False, True, True]}
            assert corners == expected[s["shape"]], (s["id"], corners)
        for quadrant in set(synth.QUADRANTS) - set(s["quadrants"]):
            i = synth.QUADRANTS.index(quadrant)
            centre = (half // 2 + (i % 2) * half, half // 2 + (i // 2) * half)
            assert img.getpixel(centre) == white, (s["id"], quadrant)
        assert img.getpixel((0, 0)) == img.getpixel((side - 1, side - 1)) == white


def test_answers_match_scenes_and_vocab(data):
    scenes = {s["id"]: s for s in data["scenes_eval"]}
    for r in data["vqa_eval"]:
        s = scenes[r["scene_id"]]
        qt, (answer,) = r["question_type"], r["answers"]
        assert answer in synth_text.ANSWERS[qt]
        truth = {"colour": s["colour"], "shape": s["shape"], "count": str(s["count"])}
        truth["position"] = s["quadrants"][0]
        assert answer == truth[qt]
        assert r["num_objects"] == s["count"] and r["image_size"] == s["width"]
    for r in data["caption_eval"]:
        s = scenes[r["id"]]
        assert r["answers"][0] == synth_text.caption(s["shape"], s["colour"], s["size"], s["quadrants"])


def test_position_questions_only_for_one_shape_and_never_before_a_count(data):
    position_questions = set(synth_text.QUESTIONS["position"])
    count_questions = set(synth_text.QUESTIONS["count"])
    scenes = {s["id"]: s for s in data["scenes_train"]}
    seen_position = seen_first = 0
    for r in data["vqa_train"]:
        turns = r["conversations"][::2]
        assert all(t["value"].endswith(SUFFIX) for t in turns)  # LLaVA-1.5's short-answer prompt
        questions = [t["value"].removeprefix("<image>\n").removesuffix(SUFFIX) for t in turns]
        has_position = any(q in position_questions for q in questions)
        assert has_position == (scenes[r["id"]]["count"] == 1), r
        if has_position:
            seen_position += 1
            pos = next(i for i, q in enumerate(questions) if q in position_questions)
            seen_first += pos == 0
            # A count question after a position question could be answered from the dialogue alone.
            assert not any(q in count_questions for q in questions[pos:]), r
        else:
            assert len(questions) == 3
    assert seen_position > 0 and seen_first > 0
    for r in data["vqa_eval"]:
        if r["question_type"] == "position":
            assert r["num_objects"] == 1


def test_caption_example_wording():
    cap = synth_text.caption("circle", "red", "small", ["top left", "bottom right"])
    assert cap == "two small red circles at the top left and bottom right."
    cap = synth_text.caption("square", "blue", "large", ["top left", "top right", "bottom left"])
    assert cap == "three large blue squares at the top left, top right and bottom left."
    assert (
        synth_text.caption("triangle", "green", "small", ["top right"])
        == "a small green triangle at the top right."
    )


def _words(texts) -> set[str]:
    return {w for t in texts for w in re.findall(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]", t.replace("<image>", ""))}


def test_corpus_covers_every_emitted_word(data):
    emitted = [t["value"] for name in RECORD_FILES for r in data[name] for t in r["conversations"]]
    emitted += [
        a for name in ("vqa_eval", "caption_eval", "describe_eval") for r in data[name] for a in r["answers"]
    ]
    emitted += [q for qs in synth_text.HELDOUT_QUESTIONS.values() for q in qs]  # vocabulary, even if unused
    exhaustive = synth.corpus_texts(n=0)  # the enumerated part alone must already cover everything
    assert _words(emitted) <= _words(exhaustive)
    assert not any("<image>" in t for t in exhaustive)
    sampled = synth.corpus_texts(n=20, seed=0)
    assert len(sampled) > len(exhaustive) and sampled[: len(exhaustive)] == exhaustive
    assert synth.corpus_texts(n=20, seed=0) == sampled
    # Everything a scene can say is in the corpus, for every combination, not just the sampled ones.
    assert _words(synth_text.QUESTIONS["position"]) | _words(synth.COLOURS) <= _words(exhaustive)


def test_scene_is_prefix_stable_and_round_trips():
    long = [s for s, _ in synth.iter_scenes(10, seed=3)]
    short = [s for s, _ in synth.iter_scenes(4, seed=3)]
    assert long[:4] == short
    assert synth.Scene.from_dict(json.loads(json.dumps(long[0].to_dict()))) == long[0]


def test_datasets_loads_generated_jsonl(out, tmp_path):
    ds = load_llava_dataset([out["caption_train"], out["vqa_eval"]], cache_dir=tmp_path / "cache")
    assert len(ds) == N + len(_read_jsonl(out["vqa_eval"]))
    row = ds[0]
    assert row["id"] == "train-000000" and len(row["images"]) == 1
    assert Path(row["images"][0]).is_absolute() and Path(row["images"][0]).is_file()
    assert row["conversations"][0]["from"] == "human"
    assert ds[-1]["question_type"] in synth.QUESTION_TYPES and isinstance(ds[-1]["answers"], list)


def test_cli_synth(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="vlm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["data", "synth", "--out", str(tmp_path), "--n", "5", "--n-eval", "2", "--sizes", "32", "--quiet"]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path) in printed and "caption_train.jsonl: 5 records" in printed
    assert {Image.open(p).size for p in tmp_path.glob("images/*/*.png")} == {(32, 32)}
    args = parser.parse_args(["data", "synth", "--out", str(tmp_path / "x"), "--n", "0", "--quiet"])
    assert args.func(args) == 2
