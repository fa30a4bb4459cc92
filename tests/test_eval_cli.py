"""`vlm eval` end to end on a tiny random checkpoint with the transformers engine: reports, bars, errors, HTML."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from eval_helpers import read_json, tiny_eval_data
from vllm_helpers import tiny_checkpoint

from vlm.cli import main

REPORT_KEYS = {"id", "image", "question", "prediction", "references", "score", "correct", "slices"}


@pytest.fixture(scope="module")
def ckpt():
    return str(tiny_checkpoint("clip", "llama", "mlp"))


@pytest.fixture(scope="module")
def data():
    return tiny_eval_data()


def _eval(ckpt, *args):
    return main(["eval", ckpt, "--engine", "hf", "--quiet", *map(str, args)])


def test_vqa_report_traces_every_prediction(ckpt, data, tmp_path, capsys):
    out = tmp_path / "vqa.json"
    assert _eval(ckpt, "--task", "vqa", "--data", data["vqa_eval"], "--out", out) == 0
    report = read_json(out)
    records = [json.loads(line) for line in data["vqa_eval"].read_text().splitlines()]
    assert report["n"] == len(records) and report["engine"] == "hf" and report["primary_metric"] == "accuracy"
    assert [p["id"] for p in report["predictions"]] == [r["id"] for r in records]
    for p, r in zip(report["predictions"], records, strict=True):
        assert set(p) == REPORT_KEYS and p["references"] == r["answers"] and p["image"] == r["image"]
        assert p["slices"] == {
            k: str(r[k]) for k in ("question_type", "phrasing", "num_objects", "image_size")
        }
    scores = [p["score"] for p in report["predictions"]]
    assert report["metrics"]["accuracy"] == pytest.approx(sum(scores) / len(scores))
    colour = [p["score"] for p in report["predictions"] if p["slices"]["question_type"] == "colour"]
    assert report["slices"]["question_type=colour"]["n"] == len(colour)
    table = capsys.readouterr().out
    assert "question_type=colour" in table and "num_objects=" in table and "image_size=" in table
    assert "phrasing=seen" in table and "phrasing=heldout" in table  # the held-out wordings' slice


@pytest.mark.slow
def test_bars_above_the_score_exit_nonzero(ckpt, data, tmp_path, capsys):
    # A random model answers neither yes nor no, which POPE counts as yes: F1 2/3 on a balanced set.
    bars = tmp_path / "bars.yaml"
    bars.write_text(
        "pope:\n  overall: 0.9\n  pope_split=adversarial: {accuracy: 0.75}\nvqa:\n  overall: 0.0\n"
    )
    args = ["--task", "pope", "--data", data["pope_eval"], "--task", "vqa", "--data", data["vqa_eval"]]
    assert _eval(ckpt, *args, "--bars", bars, "--out", tmp_path / "{task}.json") == 1
    err = capsys.readouterr().err
    assert "pope: 2 bar(s)" in err and "overall: f1 0.6667 < 0.9" in err and "pope_split=adversarial" in err
    assert read_json(tmp_path / "pope.json")["bars"]["passed"] is False
    assert read_json(tmp_path / "vqa.json")["bars"]["passed"] is True
    bars.write_text("pope:\n  overall: 0.6\n")
    assert _eval(ckpt, "--task", "pope", "--data", data["pope_eval"], "--bars", bars) == 0


def test_caption_report_names_its_tokenizer_and_the_human_ceiling(ckpt, data, tmp_path, capsys):
    out, page = tmp_path / "{task}.json", tmp_path / "{task}.html"
    files = (
        "--task",
        "caption",
        "--data",
        data["caption_eval"],
        "--task",
        "describe",
        "--data",
        data["describe_eval"],
    )
    assert _eval(ckpt, *files, "--out", out, "--html", page, "--no-java") == 0
    table = capsys.readouterr().out
    for task in ("caption", "describe"):
        report = read_json(tmp_path / f"{task}.json")
        assert report["tokenizer"].startswith("fallback")
        assert set(report["metrics"]) == {"cider_d", "bleu4", "human_cider_d", "cider_d_ratio"}
        assert any("IDF" in note for note in report["notes"])
        assert all(len(p["references"]) == 5 for p in report["predictions"])
        # 5 distinct true wordings agree partly: a ceiling well above 0 and below a perfect match's
        human = report["metrics"]["human_cider_d"]
        assert 0.5 < human < 10, human
        assert report["metrics"]["cider_d_ratio"] == pytest.approx(report["metrics"]["cider_d"] / human)
        assert "human_cider_d" in (tmp_path / f"{task}.html").read_text()
    assert table.count("human_cider_d") == 2 and "describe" in table


def test_bad_input_fails_before_the_model_loads_with_clear_errors(ckpt, data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = json.loads(data["vqa_eval"].read_text().splitlines()[0])
    good["image"] = str(data["root"] / good["image"])
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({**good, "id": "no-image", "image": "missing.png"}),
        json.dumps({**good, "id": "no-answer", "conversations": good["conversations"][:1]}),
        json.dumps({**good, "id": "bad-answers", "answers": "red"}),
    ]
    bad.write_text("\n".join(lines) + "\n")
    assert _eval(ckpt, "--task", "vqa", "--data", bad) == 2
    err = capsys.readouterr().err
    assert "4 malformed eval record(s)" in err
    for line_no, what in [(2, "invalid JSON"), (3, "image not found"), (4, "gpt"), (5, "'answers'")]:
        assert f"{bad}:{line_no}: " in err and what in err
    assert _eval(ckpt, "--task", "vqa", "--data", tmp_path / "nope.jsonl") == 2
    assert "eval data not found" in capsys.readouterr().err
    assert _eval(str(tmp_path), "--task", "vqa", "--data", data["vqa_eval"]) == 2
    assert "no config.json" in capsys.readouterr().err
    two = ["--task", "vqa", "--data", data["vqa_eval"], "--task", "pope", "--data", data["pope_eval"]]
    assert _eval(ckpt, *two, "--out", tmp_path / "r.json", "--limit", "2") == 2
    assert "{task}" in capsys.readouterr().err


def _chromium() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (.ci/run installs it)")
def test_html_report_renders_in_headless_chromium(ckpt, data, tmp_path):
    page = tmp_path / "vqa.html"
    assert _eval(ckpt, "--task", "vqa", "--data", data["vqa_eval"], "--html", page, "--gallery", "5") == 0
    html = page.read_text()
    assert '<table id="metrics"' in html and '<svg id="slice-chart"' in html and 'src="data:image/png' in html
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
    ]
    flags += ["--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    cmd = [_chromium(), *flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    # The page's own load script checks every image decoded and the table and chart exist.
    assert "<title>vlm-eval-report: ok: 5 images</title>" in dom, dom[:500]
