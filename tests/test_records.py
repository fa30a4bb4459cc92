"""LLaVA record validation, file checks, the `data check` CLI, datasets loading and chat messages."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

from vlm.data.cli import add_parser
from vlm.data.records import check_file, conversation_to_messages, load_llava_dataset, validate_record


def _rec(rid="r1", image="img/a.png", human="<image>\nWhat colour is shown?", gpt="red", **extra):
    record = {"id": rid, "image": image, "conversations": [{"from": "human", "value": human}]}
    record["conversations"].append({"from": "gpt", "value": gpt})
    if image is None:
        del record["image"]
    return {**record, **extra}


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "img").mkdir()
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (8, 8), colour).save(tmp_path / "img" / name)
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return tmp_path


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _one_problem(record, root, **kw) -> str:
    problems = validate_record(record, root, **kw)
    assert len(problems) == 1, problems
    return problems[0]


def test_good_records_pass(root):
    assert validate_record(_rec(), root) == []
    assert (
        validate_record(_rec(answers=["red", "crimson"], phrasing="heldout", question_type="colour"), root)
        == []
    )
    text_only = _rec(image=None, human="What is the plural of circle?", gpt="circles")
    assert "image" not in text_only and validate_record(text_only, root) == []
    assert validate_record(_rec(image=None, human="Hello?"), root) == []  # text-only
    assert validate_record(_rec(image=[], human="Hello?"), root) == []
    two = _rec(image=["img/a.png", "img/b.png"], human="<image>\n<image>\nSame colour?", gpt="no")
    assert validate_record(two, root) == []
    system_first = _rec()
    system_first["conversations"].insert(0, {"from": "system", "value": "Answer in one word."})
    assert validate_record(system_first, root) == []
    aliases = _rec()
    aliases["conversations"] = [
        {"from": "user", "value": "<image>\nHi"},
        {"from": "assistant", "value": "Hi"},
    ]
    assert validate_record(aliases, root) == []
    assert validate_record(_rec(image="img/missing.png"), None) == []  # no image root: files unchecked


@pytest.mark.parametrize(
    "record, expected",
    [
        (_rec(image="img/missing.png"), "image file not found"),
        (_rec(image="img/corrupt.png"), "image file cannot be opened"),
        (_rec(image=None), "1 <image> token(s) but no 'image'"),
        (_rec(human="What colour is shown?"), "1 image(s) but no <image> token"),
        (_rec(image=["img/a.png", "img/b.png"]), "1 <image> tokens but 2 images"),
        (_rec(gpt="   "), "turn 1 (gpt) is empty"),
        (_rec(human="What colour?", gpt="<image> red"), "only human turns may carry images"),
        (_rec(image=42), "'image' must be"),
        ({"id": "r1", "image": "img/a.png"}, "missing 'conversations'"),
        ({"id": "r1", "conversations": []}, "'conversations' is empty"),
        ({"id": "r1", "conversations": "hi"}, "'conversations' must be a list"),
        (_rec(answers=[]), "'answers' must be a non-empty list"),
        (_rec(answers=["red", 3]), "'answers' must be a non-empty list"),
        (_rec(answers="red"), "'answers' must be a non-empty list"),
        (_rec(phrasing=None), "'phrasing' must be a non-empty string"),
        (_rec(question_type=""), "'question_type' must be a non-empty string"),
    ],
)
def test_bad_record_gives_clear_message_naming_it(root, record, expected):
    problem = _one_problem(record, root)
    assert problem.startswith("record 'r1': ") and expected in problem, problem


def test_turn_structure_problems(root):
    r = _rec()
    r["conversations"][1]["from"] = "bot"
    assert "unknown role 'bot'" in _one_problem(r, root)
    r = _rec()
    r["conversations"][1] = {"speaker": "gpt", "text": "red"}
    assert "turn 1 must be an object with 'from' and 'value'" in _one_problem(r, root)
    r = _rec()
    r["conversations"].reverse()
    r["conversations"][1]["value"] = "<image>\nWhat colour?"
    r["conversations"][0]["value"] = "red"
    assert "turn 0 is gpt, expected human" in _one_problem(r, root)
    r = _rec()
    r["conversations"].append({"from": "human", "value": "And the shape?"})
    assert "must end with a gpt turn" in _one_problem(r, root)
    r = _rec()
    r["conversations"].append({"from": "system", "value": "late"})
    assert "only the first turn may be system" in _one_problem(r, root)
    assert _one_problem([1, 2], root).endswith("not a JSON object (got list)")


def test_record_without_id_is_named_by_line(root):
    r = _rec(image=None)
    del r["id"]
    assert _one_problem(r, root, line_no=7).startswith("record at line 7: ")
    assert _one_problem(r, root).startswith("record without id: ")


def test_check_file_reports_lines_ids_and_bad_json(root):
    path = _write_jsonl(
        root / "train.jsonl",
        [
            _rec("ok1"),
            '{"id": "broken", "image": ',  # malformed JSON line: a problem, not a crash
            "",  # blank lines are skipped
            _rec("noimg", image="img/missing.png"),
            _rec("ok1", image="img/b.png"),  # duplicate id
            _rec("bad", image="img/corrupt.png"),
        ],
    )
    report = check_file(path)
    assert (report.n_records, report.n_ok) == (5, 1) and not report.ok
    by_line = {line: (rid, msg) for line, rid, msg in report.problems}
    assert by_line[2][0] is None and by_line[2][1].startswith("invalid JSON")
    assert by_line[4] == ("noimg", f"image file not found: {root / 'img/missing.png'}")
    assert by_line[5] == ("ok1", "duplicate id (first used at line 1)")
    assert by_line[6][0] == "bad" and "cannot be opened" in by_line[6][1]
    assert report.format_problem(report.problems[0]) == f"{path}:2: " + by_line[2][1]
    assert report.format_problem((4, "noimg", "x")) == f"{path}:4 [noimg]: x"
    assert "5 records, 1 OK" in report.summary()


def test_check_file_json_list_and_image_root(root, tmp_path):
    sub = tmp_path / "meta"
    sub.mkdir()
    path = sub / "set.json"
    path.write_text(json.dumps([_rec("a"), _rec("b", image="img/b.png")]))
    assert not check_file(path).ok  # default root is the file's own directory: images not there
    report = check_file(path, image_root=root)
    assert report.ok and (report.n_records, report.n_ok) == (2, 2)
    assert check_file(path, verify_images=False).ok
    path.write_text('[{"id": "a",\n oops]')
    (problem,) = check_file(path).problems
    assert problem[0] == 2 and problem[2].startswith("invalid JSON")


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_check_exit_codes_and_output(root, capsys):
    good = _write_jsonl(root / "good.jsonl", [_rec("a"), _rec("b", image="img/b.png")])
    bad = _write_jsonl(root / "bad.jsonl", [_rec("x", image=None), "not json", _rec("y", gpt="")])
    assert _cli(["data", "check", str(good)]) == 0
    assert "2 records, 2 OK, OK" in capsys.readouterr().out

    assert _cli(["data", "check", str(bad)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{bad}:1 [x]: has 1 <image> token(s) but no 'image'"
    assert lines[1].startswith(f"{bad}:2: invalid JSON")
    assert lines[2] == f"{bad}:3 [y]: turn 1 (gpt) is empty"
    assert lines[-1] == f"{bad}: 3 records, 0 OK, 3 problem(s)"

    assert _cli(["data", "check", str(bad), "--max-errors", "1"]) == 1
    out = capsys.readouterr().out
    assert "... 2 more problem(s) not shown" in out and f"{bad}:3" not in out
    assert _cli(["data", "check", str(good), str(bad)]) == 1  # any bad file fails the run
    assert _cli(["data", "check", str(root / "nope.jsonl")]) == 1

    elsewhere = root / "other"
    elsewhere.mkdir()
    moved = _write_jsonl(elsewhere / "good.jsonl", [_rec("a")])
    assert _cli(["data", "check", str(moved)]) == 1
    assert _cli(["data", "check", str(moved), "--image-root", str(root)]) == 0


def test_load_llava_dataset_mixed_image_and_id_types(root, tmp_path):
    # image as a string in one file, a list / absent in another; ids int and str: Arrow must not choke.
    a = _write_jsonl(root / "a.jsonl", [_rec("s1"), _rec("s2", image="img/b.png")])
    b = _write_jsonl(
        root / "b.jsonl",
        [
            _rec(7, image=["img/a.png", "img/b.png"], human="<image><image>\nSame?", answers=["no"]),
            _rec("t", image=None, human="Hi"),
        ],
    )
    for streaming in (False, True):
        ds = load_llava_dataset([a, b], streaming=streaming, cache_dir=tmp_path / "cache")
        rows = list(ds)
        assert [r["id"] for r in rows] == ["s1", "s2", "7", "t"]
        assert [len(r["images"]) for r in rows] == [1, 1, 2, 0]
        assert rows[0]["images"] == [str((root / "img/a.png").resolve())]
        assert rows[2]["answers"] == ["no"] and rows[0]["answers"] is None
        assert rows[3]["conversations"] == [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "red"}]
        assert "image" not in rows[0]
    other = tmp_path / "imgs"
    ds = load_llava_dataset(a, image_root=other, cache_dir=tmp_path / "cache")
    assert ds[0]["images"] == [str(other.resolve() / "img/a.png")]
    with pytest.raises(FileNotFoundError):
        load_llava_dataset(root / "missing.jsonl")


def test_conversation_to_messages():
    r = _rec()
    r["conversations"].insert(0, {"from": "system", "value": "Be brief."})
    assert conversation_to_messages(r) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat colour is shown?"},
        {"role": "assistant", "content": "red"},
    ]
    turns = [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]
    assert [m["role"] for m in conversation_to_messages(turns)] == ["user", "assistant"]
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        conversation_to_messages([{"from": "bot", "value": "x"}])


@pytest.mark.parametrize("big", [-(2**63) - 1, 2**64])
def test_an_integer_beyond_64_bits_is_named_by_line_not_lost_in_datasets(tmp_path, big):
    """Found by fuzzing: `datasets` (ujson/Arrow) cannot hold it and raised an error naming no record."""
    path = tmp_path / "data.jsonl"
    good = {"id": "ok", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    bad = {**good, "id": "big", "extra": {"n": [1, big]}}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=rf"data\.jsonl:2: the integer {big} is outside the 64-bit range"):
        load_llava_dataset(path)
    report = check_file(path)
    assert not report.ok and any("64-bit range" in m for _, _, m in report.problems), report.problems
