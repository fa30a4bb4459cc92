"""Multi-image VQA (vlm/data/multi_image.py): answers checked against the scene metadata by an independent oracle,
balance, splits, the other files untouched, the scenes world, `vlm data check`, training encoding, eval slices."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from vllm_helpers import tiny_checkpoint

from vlm.cli import main
from vlm.data import multi_image, scenes, synth
from vlm.data.records import load_llava_dataset, validate_record
from vlm.data.samples import SupervisedDataset
from vlm.data.synth_text import SHORT_ANSWER

N, N_EVAL = 40, 200
ORDINALS = ("first", "second", "third", "fourth")
# sha256 prefixes of the files `generate` wrote before multi-image records existed (seed 0, n 40, n_eval 12;
# scenes: n_eval 30): the multi-image stream must leave every one of them byte-identical.
GOLDEN = {
    "shapes": {
        "scenes_train": "bf7b6093d7b0d673", "scenes_eval": "b65ee773d033909c", "vqa_train": "e72d7c380d369ded",
        "yesno_train": "240dd703b89a544f", "caption_train": "565f3c5b23bec667",
        "describe_train": "88e27d8b91a1de40", "conversation_train": "04ff15031768f2d6",
        "text_train": "50bf3d81fbb373f1", "lm_train": "ab87450c61769d1b", "caption_eval": "4c50f4de9fdad0a2",
        "describe_eval": "dbb9fe68cd011475", "vqa_eval": "28be42479c5b125b", "pope_eval": "9cea67cfec4c01cf",
    },
    "scenes": {
        "scenes_train": "79ccf0f8d3e4dfbf", "scenes_eval": "a69443d2cc3faf39", "vqa_train": "4254242625c787cd",
        "yesno_train": "256d19241b5a18b7", "caption_train": "a0fca1c4212402f8",
        "describe_train": "a99ec938855a2575", "conversation_train": "ca688e3984f055d0",
        "text_train": "c64d83efeb296340", "lm_train": "9a47f4ed28198e5e", "caption_eval": "2cb7cb9eadaf1c00",
        "describe_eval": "1b9821f4250403a4", "vqa_eval": "85cd174f34012359", "pope_eval": "558b16cb9aa254ad",
    },
}  # fmt: skip


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    return synth.generate(tmp_path_factory.mktemp("shapes"), N, seed=0, n_eval=N_EVAL, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return scenes.generate(tmp_path_factory.mktemp("scenes"), N, seed=0, n_eval=60, progress=False)


# -- an oracle of its own: reads the question text and the scenes files, not the generator's plan ----------------


def _scene_facts(out: dict[str, Path]) -> dict[str, dict]:
    """image path -> count, colour-shape pairs (and in the shapes world colour, shape)."""
    facts = {}
    for split in ("train", "eval"):
        for s in _read(out[f"scenes_{split}"]):
            objects = s.get("objects") or [{"colour": s["colour"], "shape": s["shape"]}]
            facts[s["image"]] = {
                "id": s["id"],
                "count": s["count"],
                "pairs": {f"{o['colour']} {o['shape']}" for o in objects},
                "colours": {o["colour"] for o in objects},
                "shapes": {o["shape"] for o in objects},
            }
    return facts


def _oracle(question: str, images: list[dict]) -> tuple[str, str]:
    """(question type, answer) from the wording alone."""
    q = question.lower()
    named = re.search(r"\ban? (\w+ (?:circle|square|triangle))\b", q)
    if "more" in q or "most" in q:
        counts = [im["count"] for im in images]
        assert counts.count(max(counts)) == 1, (question, counts)
        return "multi_count", ORDINALS[counts.index(max(counts))]
    if "same colour" in q or "the colour the same" in q:
        return "multi_same_colour", "yes" if len({frozenset(im["colours"]) for im in images}) == 1 else "no"
    if "same shape" in q or "the shape the same" in q:
        return "multi_same_shape", "yes" if len({frozenset(im["shapes"]) for im in images}) == 1 else "no"
    assert named, question
    has = [named.group(1) in im["pairs"] for im in images]
    if q.startswith("which") or q.startswith("in which"):
        assert sum(has) == 1, (question, has)
        return "multi_find", ORDINALS[has.index(True)]
    return "multi_exist", "yes" if all(has) else "no"


def _check_against_scenes(out: dict[str, Path]) -> list[dict]:
    facts = _scene_facts(out)
    for name, split in (("multi_train", "train"), ("multi_eval", "eval")):
        records = _read(out[name])
        assert records, name
        for r in records:
            images = r["image"]
            assert isinstance(images, list) and len(images) in (2, 4) and len(set(images)) == len(images), r[
                "id"
            ]
            assert all(p.startswith(f"images/{split}/") for p in images), r["id"]  # one split per record
            human, gpt = (t["value"] for t in r["conversations"])
            assert human.startswith("<image>\n" * len(images)) and human.count("<image>") == len(images)
            assert human.endswith("\n" + SHORT_ANSWER)
            question = human[len("<image>\n" * len(images)) : -len("\n" + SHORT_ANSWER)]
            qt, expected = _oracle(question, [facts[p] for p in images])
            assert gpt == expected, (r["id"], question, gpt, expected)
            if name == "multi_eval":
                assert r["question_type"] == qt and r["answers"] == [gpt] and r["num_images"] == len(images)
                assert r["scene_ids"] == [facts[p]["id"] for p in images]
            else:
                assert set(r) == {"id", "image", "conversations"}, r["id"]  # training records hold no answers
    return _read(out["multi_eval"])


# -- the shapes world ------------------------------------------------------------------------------------------


def test_answers_follow_from_the_scene_metadata(shapes):
    evals = _check_against_scenes(shapes)
    assert {r["question_type"] for r in evals} == set(multi_image.WORLD_TYPES["shapes"])


def test_every_type_and_size_is_balanced_over_its_answers(shapes):
    evals = _read(shapes["multi_eval"])
    assert len(evals) == N_EVAL  # every plan realised at this size
    cells = Counter((r["question_type"], r["num_images"]) for r in evals)
    assert set(cells) == {(t, k) for t in multi_image.WORLD_TYPES["shapes"] for k in (2, 4)}
    for qt, k in cells:
        answers = Counter(r["answers"][0] for r in evals if (r["question_type"], r["num_images"]) == (qt, k))
        expected = ORDINALS[:k] if qt in ("multi_count", "multi_find") else ("yes", "no")
        assert set(answers) == set(expected), (qt, k, answers)
        assert max(answers.values()) - min(answers.values()) <= 1, (qt, k, answers)


def test_a_no_differs_in_one_image_and_find_needs_both_attributes(shapes):
    facts = _scene_facts(shapes)
    evals = _read(shapes["multi_eval"])
    for r in evals:
        images = [facts[p] for p in r["image"]]
        if r["question_type"] in ("multi_same_colour", "multi_same_shape") and r["answers"] == ["no"]:
            key = "colours" if r["question_type"] == "multi_same_colour" else "shapes"
            values = Counter(frozenset(im[key]) for im in images)
            assert sorted(values.values()) == [1, len(images) - 1], r["id"]  # exactly one odd image
    finds = [r for r in evals if r["question_type"] == "multi_find" and r["num_images"] == 4]
    for r in finds:
        colour, shape = r["object"].split(" ")
        others = [facts[p] for p, a in zip(r["image"], ORDINALS, strict=False) if a != r["answers"][0]]
        assert any(colour in im["colours"] for im in others), r["id"]  # colour alone does not find it
        assert any(shape in im["shapes"] for im in others), r["id"]  # nor shape alone


def test_other_files_stay_byte_identical(tmp_path):
    for world_name, module, n_eval in (("shapes", synth, 12), ("scenes", scenes, 30)):
        out = module.generate(tmp_path / world_name, N, seed=0, n_eval=n_eval, progress=False)
        digests = {
            name: hashlib.sha256(out[name].read_bytes()).hexdigest()[:16] for name in GOLDEN[world_name]
        }
        assert digests == GOLDEN[world_name], world_name
        again = module.generate(tmp_path / f"{world_name}-again", N, seed=0, n_eval=n_eval, progress=False)
        other = module.generate(tmp_path / f"{world_name}-other", N, seed=1, n_eval=n_eval, progress=False)
        for name in ("multi_train", "multi_eval"):
            assert again[name].read_bytes() == out[name].read_bytes(), (world_name, name)
            assert other[name].read_bytes() != out[name].read_bytes(), (world_name, name)


def test_records_are_valid_load_and_manifest_counts_them(shapes, tmp_path):
    manifest = json.loads(shapes["manifest"].read_text())
    for name in ("multi_train", "multi_eval"):
        records = _read(shapes[name])
        assert manifest["files"][name]["records"] == len(records)
        assert all(validate_record(r, shapes["root"]) == [] for r in records), name
        assert len({r["id"] for r in records}) == len(records)
    assert manifest["multi_image"]["question_types"] == list(multi_image.WORLD_TYPES["shapes"])
    assert manifest["multi_image"]["answers"]["multi_find"] == list(ORDINALS)
    ds = load_llava_dataset(shapes["multi_eval"], cache_dir=tmp_path / "cache")
    four = next(row for row in ds if row["num_images"] == 4)
    assert len(four["images"]) == 4 and all(Path(p).is_file() for p in four["images"])


def test_data_check_refuses_a_num_images_that_lies(shapes):
    record = _read(shapes["multi_eval"])[0]
    assert validate_record(record) == []
    bad = dict(record, num_images=len(record["image"]) + 1)
    assert any(
        "'num_images' is" in p and f"{len(record['image'])} image(s)" in p for p in validate_record(bad)
    )
    assert validate_record(dict(record, num_images="2")) != []


def test_training_records_encode_and_fit_the_stage2_length(shapes, build):
    """multi_train renders through the training encoder: one placeholder run per image, within stage 2's
    max_length (256) at the tiny 32 px tower."""
    proc = build("clip", "llama", "mlp")[1]
    records = _read(shapes["multi_train"])
    rows = [dict(r, images=[str(shapes["root"] / p) for p in r["image"]]) for r in records]
    ds = SupervisedDataset(rows, proc, "chatml", max_length=256)
    assert len(ds) == len(records)
    four = next(i for i, r in enumerate(records) if len(r["image"]) == 4)
    item = ds[four]
    assert item["pixel_values"].shape[0] == 4
    assert int((item["input_ids"] == proc.image_token_id).sum()) == 4 * proc.num_image_tokens


# -- the scenes world ------------------------------------------------------------------------------------------


def test_scenes_world_answers_and_heldout_pairs(world):
    evals = _check_against_scenes(world)
    assert {r["question_type"] for r in evals} == set(multi_image.WORLD_TYPES["scenes"])
    heldout = {p.replace(":", " ") for p in json.loads(world["manifest"].read_text())["heldout_pairs"]}
    facts = _scene_facts(world)
    for r in evals:
        named = {r["object"]} if "object" in r else set().union(*(facts[p]["pairs"] for p in r["image"]))
        assert r["pair"] == ("heldout" if named & heldout else "seen"), r["id"]
    assert {r["pair"] for r in evals if "object" in r} == {"heldout", "seen"}
    for r in _read(world["multi_train"]):  # held out means absent from training text too
        assert not any(p in r["conversations"][0]["value"] for p in heldout), r["id"]


# -- eval ------------------------------------------------------------------------------------------------------


def test_vlm_eval_reports_multi_image_slices(tmp_path, capsys):
    """`vlm eval --task vqa --data multi_eval.jsonl` with the transformers engine: the processor refuses a prompt
    whose <image> markers outnumber its images, so a report at all means every image reached the model."""
    out = synth.generate(tmp_path / "data", 2, seed=0, n_eval=16, progress=False)
    records = _read(out["multi_eval"])
    ckpt = str(tiny_checkpoint("clip", "llama", "mlp"))
    report_path, page = tmp_path / "multi.json", tmp_path / "multi.html"
    args = ["eval", ckpt, "--engine", "hf", "--quiet", "--task", "vqa", "--data", str(out["multi_eval"])]
    assert main([*args, "--out", str(report_path), "--html", str(page), "--max-new-tokens", "4"]) == 0
    report = json.loads(report_path.read_text())
    assert report["n"] == len(records) == 16
    slices = report["slices"]
    for qt in multi_image.WORLD_TYPES["shapes"]:
        assert slices[f"question_type={qt}"]["n"] == 4
    assert slices["num_images=2"]["n"] == slices["num_images=4"]["n"] == 8
    for row, r in zip(report["predictions"], records, strict=True):
        assert row["slices"] == {"question_type": r["question_type"], "num_images": str(r["num_images"])}
        assert row["image"] == ", ".join(r["image"])
    assert "num_images=4" in capsys.readouterr().out
    cards = re.findall(r"<div class=\"card .*?</div></div>", page.read_text(), flags=re.S)
    assert sorted(c.count("<img") for c in cards) == sorted(r["num_images"] for r in records)  # every image
