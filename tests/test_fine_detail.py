"""The fine-detail task: one tiny digit on a large canvas, readable at native resolution only."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlm.cli import main as vlm_main
from vlm.data import fine_detail, records


def _read_glyph(image: Image.Image, box) -> str:
    """The digit whose bitmap is nearest (in pixels that differ) to the ink inside the record's glyph box.
    Each pixel is ink when it is nearer the box's darkest than its lightest level, so noise flips few."""
    x, y, w, h = box
    grey = image.convert("L")
    values = [[grey.getpixel((x + c, y + r)) for c in range(w)] for r in range(h)]
    lo, hi = min(map(min, values)), max(map(max, values))
    ink = ["".join("#" if v < (lo + hi) / 2 else "." for v in row) for row in values]

    def distance(bitmap):
        return sum(
            a != b for row, line in zip(ink, bitmap, strict=True) for a, b in zip(row, line, strict=True)
        )

    ranked = sorted(fine_detail._FONT, key=lambda d: distance(fine_detail._FONT[d]))
    assert distance(fine_detail._FONT[ranked[0]]) < distance(fine_detail._FONT[ranked[1]])
    return ranked[0]


@pytest.fixture(scope="module")
def detail_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("detail")
    assert vlm_main(["data", "synth", "--out", str(root), "--n", "8", "--fine-detail", "40", "--quiet"]) == 0
    return root


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    args = ["--n", "8", "--fine-detail", "20", "--fine-detail-noise", "0", "--quiet"]
    assert vlm_main(["data", "synth", "--out", str(root), *args]) == 0
    return root


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _side(name: str) -> int:
    return 32 if name == "detail_small_train" else 128  # the curriculum canvas is the tower's size


def test_every_answer_is_the_digit_drawn_in_a_centre_cell(detail_dir):
    for name in fine_detail.FILES:
        side = _side(name)
        for rec in _lines(detail_dir / f"{name}.jsonl"):
            image = Image.open(detail_dir / rec["image"])
            assert image.size == (side, side) and rec["image_size"] == side
            assert _read_glyph(image, rec["glyph_box"]) == rec["conversations"][-1]["value"]
            x, y, w, h = rec["glyph_box"]
            lo, hi = side // 2 - 8, side // 2 + 8  # the 2x2 cells around the centre
            assert lo <= x and x + w <= hi and lo <= y and y + h <= hi
            assert (x % 8, y % 8) == (1, 0)  # one place in its 8 px cell: one tower patch holds it


def test_the_noise_is_grey_of_the_asked_std_and_only_noise_differs(detail_dir, clean_dir):
    import numpy as np

    from vlm.data.scene_graph import add_noise

    flat = Image.new("RGB", (128, 128), (128,) * 3)
    noise = np.asarray(add_noise(flat, fine_detail.DEFAULT_NOISE, seed=0, grey=True), dtype=np.float32) - 128
    assert (noise[..., 0] == noise[..., 2]).all() and 19 <= noise.std() <= 21
    rec = _lines(detail_dir / "detail_train.jsonl")[0]
    noisy = np.asarray(Image.open(detail_dir / rec["image"]), dtype=np.float32)
    clean = np.asarray(Image.open(clean_dir / rec["image"]), dtype=np.float32)  # the same seed, noise 0
    assert (noisy[..., 0] == noisy[..., 1]).all() and (noisy[..., 1] == noisy[..., 2]).all()
    assert np.abs(noisy - clean).mean() > 5 and rec == _lines(clean_dir / "detail_train.jsonl")[0]
    manifest = json.loads((detail_dir / "manifest.json").read_text())
    assert manifest["fine_detail"]["noise"] == fine_detail.DEFAULT_NOISE == 20


def test_without_noise_the_glyph_is_the_only_thing_drawn(clean_dir):
    for name in fine_detail.FILES:
        side = _side(name)
        for rec in _lines(clean_dir / f"{name}.jsonl"):
            image = Image.open(clean_dir / rec["image"])
            assert _read_glyph(image, rec["glyph_box"]) == rec["conversations"][-1]["value"]
            x, y, w, h = rec["glyph_box"]
            outside = [
                image.getpixel((i, j))
                for i in range(side)
                for j in range(side)
                if not (x <= i < x + w and y <= j < y + h)
            ]
            assert len(set(outside)) == 1  # a plain background: the glyph is the only evidence


def test_at_the_towers_32_px_the_digits_blur_together():
    """Downscaled 4x as the single policy does, two different digits at one place differ by little ink."""
    import random

    def l1(a: Image.Image, b: Image.Image) -> int:
        return sum(
            abs(p - q) for p, q in zip(a.convert("L").tobytes(), b.convert("L").tobytes(), strict=True)
        )

    big = [fine_detail.draw_digit(d, 128, random.Random(1), noise=0)[0] for d in "18"]
    small = [im.resize((32, 32), Image.Resampling.BICUBIC) for im in big]
    assert l1(*small) < l1(*big) / 8


def test_records_are_valid_short_answer_vqa_with_slices(detail_dir):
    report = records.check_file(detail_dir / "detail_eval.jsonl", image_root=detail_dir)
    assert report.ok, report.problems
    evals = _lines(detail_dir / "detail_eval.jsonl")
    assert len(evals) == 8  # 40 // 5
    assert {r["question_type"] for r in evals} == {"digit"}
    assert {r["phrasing"] for r in evals} <= {"seen", "heldout"}
    for r in evals:
        question = r["conversations"][0]["value"]
        assert question.startswith("<image>\n") and question.endswith(
            "\nAnswer the question using a single word or phrase."
        )
        if r["phrasing"] == "heldout":
            assert any(q in question for q in fine_detail.HELDOUT_QUESTIONS)
    trains = _lines(detail_dir / "detail_train.jsonl")
    assert not any(q in r["conversations"][0]["value"] for r in trains for q in fine_detail.HELDOUT_QUESTIONS)
    assert {r["conversations"][-1]["value"] for r in trains} <= set(fine_detail.DIGITS)


def test_manifest_lists_the_files_and_output_is_deterministic(detail_dir, tmp_path):
    manifest = json.loads((detail_dir / "manifest.json").read_text())
    assert manifest["files"]["detail_train"]["records"] == 40
    assert manifest["files"]["detail_small_train"]["records"] == 20
    assert (manifest["fine_detail"]["canvas"], manifest["fine_detail"]["small_canvas"]) == (128, 32)
    assert (
        vlm_main(["data", "synth", "--out", str(tmp_path), "--n", "8", "--fine-detail", "40", "--quiet"]) == 0
    )
    for name in fine_detail.FILES:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (detail_dir / f"{name}.jsonl").read_bytes()
    first = _lines(detail_dir / "detail_train.jsonl")[0]["image"]
    assert (tmp_path / first).read_bytes() == (detail_dir / first).read_bytes()


@pytest.mark.parametrize(
    "args, match",
    [
        (["--fine-detail", "-3"], "--fine-detail must be a positive number of images, got -3"),
        (
            ["--fine-detail", "5", "--fine-detail-size", "12"],
            "--fine-detail-size must be an integer >= 16 px, got 12",
        ),
        (
            ["--fine-detail", "5", "--fine-detail-noise", "-1"],
            "--fine-detail-noise must be a pixel std in 0-255, got -1.0",
        ),
    ],
)
def test_bad_fine_detail_arguments_are_named(tmp_path, capsys, args, match):
    assert vlm_main(["data", "synth", "--out", str(tmp_path), "--n", "4", "--quiet", *args]) == 2
    assert match in capsys.readouterr().err
