"""The CLEVR-style scene world (`vlm data synth --world scenes`): determinism, occlusion, question families
checked against an independent oracle, held-out pairs, POPE from training statistics, `vlm data check`, slices."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

from vlm.data import pope, scene_graph, scenes, synth
from vlm.data import scene_questions as sq
from vlm.data.cli import main as data_main
from vlm.data.records import validate_record
from vlm.data.samples import encode_conversation
from vlm.eval.report import build_report
from vlm.eval.tasks import VQAScorer, load_examples

N, N_EVAL = 40, 30
HELDOUT = {"red triangle", "blue circle", "green square"}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> dict[str, Path]:
    return scenes.generate(tmp_path_factory.mktemp("scenes"), N, seed=0, n_eval=N_EVAL, progress=False)


@pytest.fixture(scope="module")
def data(out) -> dict[str, list[dict]]:
    return {name: _read(out[name]) for name in synth.FILES}


def test_same_seed_is_byte_identical_and_other_seed_differs(out, tmp_path):
    ref = _tree(out["root"])
    assert len(ref) == N + N_EVAL + len(synth.FILES) + 1
    assert _tree(scenes.generate(tmp_path / "a", N, seed=0, n_eval=N_EVAL, progress=False)["root"]) == ref
    other = _tree(scenes.generate(tmp_path / "b", N, seed=1, n_eval=N_EVAL, progress=False)["root"])
    assert other.keys() == ref.keys()
    assert sum(other[k] != ref[k] for k in ref if k.endswith(".png")) > (N + N_EVAL) // 2


def test_layout_matches_the_shapes_world_and_records_are_valid(out, data):
    manifest = json.loads(out["manifest"].read_text())
    assert manifest["world"] == "scenes" and manifest["families"] == list(sq.FAMILIES)
    assert {k: v["records"] for k, v in manifest["files"].items()} == {k: len(v) for k, v in data.items()}
    assert len(data["scenes_train"]) == len(data["caption_train"]) == N
    assert N < len(data["vqa_train"]) <= 2 * N  # up to six questions per scene, three per record
    for name in synth.FILES:
        if name.startswith("scenes_"):
            continue
        ids = [r["id"] for r in data[name]]
        assert len(ids) == len(set(ids)), name
        for r in data[name]:
            assert validate_record(r, out["root"]) == [], (name, r)
    for name in ("caption_eval", "describe_eval"):
        assert all(len(r["answers"]) == 5 and len(set(r["answers"])) >= 2 for r in data[name]), name


def test_scenes_have_one_to_six_objects_and_no_full_occlusion(out, data):
    graphs = data["scenes_train"] + data["scenes_eval"]
    assert {g["count"] for g in graphs} >= {1, 6} and all(1 <= g["count"] <= 6 for g in graphs)
    for g in graphs:
        assert g["count"] == len(g["objects"])
        shares = scene_graph.visible_shares(g["objects"], g["width"])
        assert min(shares) >= scene_graph.MIN_VISIBLE, g["id"]
        for a, b in itertools.combinations(g["objects"], 2):
            if a["colour"] == b["colour"]:  # apart by at least one background pixel: no merged blobs
                assert (
                    a["box"][2] + 1 < b["box"][0]
                    or b["box"][2] + 1 < a["box"][0]
                    or a["box"][3] + 1 < b["box"][1]
                    or b["box"][3] + 1 < a["box"][1]
                ), (g["id"], a, b)
        img = Image.open(out["root"] / g["image"]).convert("RGB")
        for obj in g["objects"]:  # every object shows pixels of its own colour inside its box
            x0, y0, x1, y1 = obj["box"]
            colour = synth.COLOURS[obj["colour"]]
            seen = sum(img.getpixel((x, y)) == colour for x in range(x0, x1 + 1) for y in range(y0, y1 + 1))
            assert seen >= scene_graph.MIN_VISIBLE * 0.5 * (x1 - x0) * (y1 - y0), (g["id"], obj)


# ---- an oracle written apart from scene_questions, to check every answer against the graph ----------------


def _oracle_select(objects, f):
    return [i for i, o in enumerate(objects) if all(o[k] == v for k, v in f.items())]


def _oracle_left(a, b, rel, side):
    axis = 0 if rel in ("left", "right") else 1
    sign = -1 if rel in ("left", "above") else 1
    d = (a["centre"][axis] - b["centre"][axis]) * sign
    assert abs(d) >= scene_graph.RELATION_GAP * side, "a generated question relies on an unclear relation"
    return d > 0


def _oracle_one(g, desc):
    found = _oracle_select(g["objects"], desc["filter"])
    if "relate" in desc:
        (anchor,) = _oracle_select(g["objects"], desc["anchor"])
        found = [
            i
            for i in found
            if i != anchor and _oracle_left(g["objects"][i], g["objects"][anchor], desc["relate"], g["width"])
        ]
    (index,) = found
    return g["objects"][index]


def _oracle(g, family, p) -> str:
    objs = g["objects"]
    yes = {True: "yes", False: "no"}
    if family == "exist":
        return yes[len(_oracle_select(objs, p["filter"])) > 0]
    if family == "count":
        return str(len(_oracle_select(objs, p["filter"])))
    if family == "query_attribute":
        return _oracle_one(g, p["target"])[p["attribute"]]
    if family == "compare_attribute":
        return yes[_oracle_one(g, p["a"])[p["attribute"]] == _oracle_one(g, p["b"])[p["attribute"]]]
    if family == "compare_count":
        a, b = len(_oracle_select(objs, p["a"])), len(_oracle_select(objs, p["b"]))
        return yes[{"more": a > b, "fewer": a < b, "equal": a == b}[p["compare"]]]
    return yes[_oracle_left(_oracle_one(g, p["a"]), _oracle_one(g, p["b"]), p["relate"], g["width"])]


def test_every_family_answer_matches_the_graph(data):
    graphs = {g["id"]: g for g in data["scenes_eval"]}
    families = Counter()
    for r in data["vqa_eval"]:
        family, answer = r["family"], r["answers"][0]
        families[family] += 1
        assert answer in sq.ANSWERS[family] and r["conversations"][1]["value"] == answer
        assert _oracle(graphs[r["scene_id"]], family, r["program"]) == answer, r
        assert sq.question_text(family, r["program"]) in r["conversations"][0]["value"]
    assert set(families) == set(sq.FAMILIES)
    relational = [r for r in data["vqa_eval"] if "relate" in r["program"].get("target", {})]
    assert relational, "query_attribute should sometimes describe an object by a relation"


def test_yes_no_families_are_balanced(tmp_path):
    out = scenes.generate(tmp_path, 10, n_eval=200, progress=False)
    answers = Counter((r["family"], r["answers"][0]) for r in _read(out["vqa_eval"]))
    for family in ("exist", "compare_attribute", "compare_count", "spatial"):
        yes, no = answers[(family, "yes")], answers[(family, "no")]
        assert 0.35 < yes / (yes + no) < 0.65, (family, yes, no)


def test_heldout_pairs_never_in_training_but_in_eval(data):
    def pairs(graphs):
        return {scene_graph.pair_of(o) for g in graphs for o in g["objects"]}

    assert not pairs(data["scenes_train"]) & HELDOUT
    assert pairs(data["scenes_eval"]) & HELDOUT
    marked = [r for r in data["vqa_eval"] if r["pair"] == "heldout"]
    assert marked and {r["pair"] for r in data["vqa_eval"]} == {"heldout", "seen"}
    graphs = {g["id"]: g for g in data["scenes_eval"]}
    for r in data["vqa_eval"]:
        g = graphs[r["scene_id"]]
        about = {scene_graph.pair_of(g["objects"][i]) for i in sq.touched(g, r["family"], r["program"])}
        named = {
            f"{f['colour']} {f['shape']}"
            for f in sq.mentioned_filters(r["family"], r["program"])
            if len(f) > 1 and "shape" in f and "colour" in f
        }
        assert (r["pair"] == "heldout") == bool((about | named) & HELDOUT), r
    assert {r["pair"] for r in data["pope_eval"] if r["object"] in HELDOUT} == {"heldout"}


def test_training_text_never_names_a_heldout_pair(data):
    """Held out from training images and text alike: no question, caption or yes/no negative names one."""
    patterns = [
        re.compile(rf"\b{c} (small |large |little |big )?{s}s?\b|\b{s}s? in {c}\b")
        for c, s in (p.split() for p in HELDOUT)
    ]
    for name in (*synth.STAGE2_SOURCES, "lm_train"):
        for r in data[name]:
            for turn in r["conversations"]:
                assert not any(p.search(turn["value"]) for p in patterns), (name, r["id"], turn["value"])
    assert any(p.search(r["conversations"][0]["value"]) for r in data["vqa_eval"] for p in patterns)


def test_pope_negatives_follow_training_statistics():
    def scene(i, *pairs):
        objs = [{"colour": p.split()[0], "shape": p.split()[1]} for p in pairs]
        return {"id": f"s{i}", "image": f"s{i}.png", "objects": objs, "count": len(objs), "width": 64}

    train = [
        scene(0, "red circle", "blue square"),
        scene(1, "red circle", "blue square"),
        scene(2, "green circle"),
    ]
    train += [scene(3, "green circle", "yellow square"), scene(4, "green circle")]
    evals = [scene(9, "red circle")]
    recs = pope.scene_pope_records(evals, train, seed=0, heldout={"green circle"})
    by_split = {s: [r for r in recs if r["pope_split"] == s] for s in pope.SPLITS}
    for split, rs in by_split.items():
        assert [r["answers"][0] for r in rs] == ["yes", "no"], split
        assert rs[0]["object"] == "red circle" and rs[1]["object"] != "red circle"
    assert by_split["popular"][1]["object"] == "green circle"  # the most frequent absent object in training
    assert by_split["popular"][1]["pair"] == "heldout"
    assert by_split["adversarial"][1]["object"] == "blue square"  # co-occurs with red circle in training


# ---- vlm data check ------------------------------------------------------------------------------------


def _check(path: Path, capsys) -> tuple[int, str]:
    rc = data_main(["data", "check", str(path), "--no-images"])
    return rc, capsys.readouterr().out


def test_check_passes_generated_files(out, capsys):
    for name in ("vqa_eval", "pope_eval", "vqa_train", "caption_eval"):
        rc, text = _check(out[name], capsys)
        assert rc == 0, text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(family="counting"), "unknown question family 'counting'"),
        (lambda r: r.update(answers=["many"]), "answer 'many' is not in the"),
        (lambda r: r.pop("program"), "'program'"),
        (lambda r: r.update(scene_id="eval-999999"), "scene_id 'eval-999999' is not in the scenes files"),
    ],
)
def test_check_names_each_bad_record(out, tmp_path, capsys, change, message):
    records = _read(out["vqa_eval"])
    change(records[3])
    bad = out["root"] / f"bad_{tmp_path.name}.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    rc, text = _check(bad, capsys)
    bad.unlink()
    assert rc == 1 and f"{bad}:4 [{records[3]['id']}]: " in text and message in text, text
    assert "1 problem(s)" in text


def test_check_recomputes_the_answer_from_the_graph(out, capsys):
    records = _read(out["vqa_eval"])
    i = next(k for k, r in enumerate(records) if r["family"] == "count")
    wrong = str((int(records[i]["answers"][0]) + 1) % 7)
    records[i]["answers"] = [wrong]
    records[i]["conversations"][1]["value"] = wrong
    bad = out["root"] / "wrong_answer.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    rc, text = _check(bad, capsys)
    bad.unlink()
    assert rc == 1 and f":{i + 1} [{records[i]['id']}]: scene graph" in text and f"says '{wrong}'" in text, (
        text
    )


def test_check_without_or_with_broken_scene_files_says_so(out, tmp_path, capsys):
    (tmp_path / "vqa_eval.jsonl").write_bytes(out["vqa_eval"].read_bytes())
    rc, text = _check(tmp_path / "vqa_eval.jsonl", capsys)
    assert rc == 1 and "no scene graphs" in text
    (tmp_path / "scenes_eval.jsonl").write_text(out["scenes_eval"].read_text() + "{not json\n")
    rc, text = _check(tmp_path / "vqa_eval.jsonl", capsys)
    assert rc == 1 and f"{tmp_path / 'scenes_eval.jsonl'}:{N_EVAL + 1}: not a scene graph" in text, text


# ---- CLI and eval ----------------------------------------------------------------------------------------


def test_cli_world_scenes_options(tmp_path, capsys):
    args = ["data", "synth", "--world", "scenes", "--out", str(tmp_path / "s"), "--n", "4", "--n-eval", "3"]
    assert data_main([*args, "--quiet", "--heldout-pairs", "", "--texture", "--noise", "6"]) == 0
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["heldout_pairs"] == [] and manifest["texture"] and manifest["noise"] == 6
    assert data_main([*args, "--quiet", "--heldout-pairs", "pink:circle"]) == 2
    assert "held-out pair 'pink:circle'" in capsys.readouterr().err
    shapes = ["data", "synth", "--out", str(tmp_path / "x"), "--n", "4", "--quiet", "--texture"]
    assert data_main(shapes) == 2 and "--world scenes" in capsys.readouterr().err


def test_texture_and_noise_change_pixels_not_the_graph():
    plain = next(scenes.iter_graphs(1, seed=3, split="train"))
    noisy = next(scenes.iter_graphs(1, seed=3, split="train", texture=True, noise=8.0))
    assert noisy["objects"] == plain["objects"]
    a, b = scene_graph.draw_graph(plain), scene_graph.draw_graph(noisy)
    assert a.tobytes() != b.tobytes() and b.tobytes() == scene_graph.draw_graph(noisy).tobytes()


def test_eval_report_has_a_slice_per_family_and_pair(out):
    examples = load_examples(out["vqa_eval"], "vqa")
    predictions = [e.references[0] if e.slices["family"] != "count" else "7" for e in examples]
    report = build_report(
        "vqa", examples, VQAScorer(examples, predictions), checkpoint="fake", data=str(out["vqa_eval"]),
        image_root=str(out["root"]), engine="none", elapsed_s=0.0,
    )  # fmt: skip
    slices = report["slices"]
    for family in sq.FAMILIES:
        assert f"family={family}" in slices
    assert slices["family=count"]["accuracy"] == 0.0 and slices["family=exist"]["accuracy"] == 1.0
    assert "pair=heldout" in slices and "pair=seen" in slices


def test_training_records_fit_the_stage2_recipes_at_a_64_px_tower(data, build):
    """The stage 2 recipes run on --out data/scenes: every training record fits max_length even with the 64
    visual tokens a 64 px tower gives (the tiny test tower gives 16); stage 1 needs the documented override."""
    proc = build("clip", "llama", "mlp")[1]
    max_length = min(
        yaml.safe_load(Path(f"stages/{n}.yaml").read_text())["max_length"]
        for n in ("stage2", "stage2_lora", "stage2_qlora")
    )
    extra, longest = 64 - proc.num_image_tokens, {}
    for name in synth.STAGE2_SOURCES:
        for r in data[name]:
            n_images = len(r.get("image", "") and [r["image"]])
            n_tokens = encode_conversation(r, proc, "chatml", max_length=None).n_tokens + extra * n_images
            longest[name] = max(longest.get(name, 0), n_tokens)
    assert max(longest.values()) <= max_length == scenes.MAX_LENGTH["stage2"], sorted(longest.items())
    assert longest["caption_train"] <= scenes.MAX_LENGTH["stage1"]


def test_corpus_texts_cover_every_word_of_another_seed(data):
    """scenes.corpus_texts is the text a tokenizer for this world learns from."""
    words = {w for t in scenes.corpus_texts(n=200, seed=5) for w in re.findall(r"[a-z]+|\d", t.lower())}
    for name in synth.FILES:
        if name.startswith("scenes_"):
            continue
        for r in data[name]:
            for turn in r["conversations"]:
                missing = set(re.findall(r"[a-z]+|\d", turn["value"].lower().replace("<image>", ""))) - words
                assert not missing, (name, r["id"], missing)


def test_data_pope_rebuilds_scene_probes_with_training_statistics(out, tmp_path, capsys):
    target = tmp_path / "pope.jsonl"
    args = ["data", "pope", "--scenes", str(out["scenes_eval"]), "--out", str(target), "--seed", "0"]
    assert data_main(args) == 0, capsys.readouterr()
    assert target.read_bytes() == out["pope_eval"].read_bytes()
