"""bench/high_res.py's table: one line per arm and seed, and a mean / range line per arm trained on several seeds."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("high_res", Path(__file__).parents[1] / "bench/high_res.py")
high_res = importlib.util.module_from_spec(spec)
spec.loader.exec_module(high_res)


def _row(arm: str, seed: int, vqa: float) -> dict:
    acc = {"accuracy": vqa}
    return {
        "arm": arm,
        "seed": seed,
        "times": {"stage1": 1.0, "stage2": 2.0},
        "detail": {"overall": {"accuracy": 0.5}, "phrasing=heldout": {"accuracy": 0.4}},
        "vqa": {"overall": acc, **{f"question_type={q}": acc for q in high_res.VQA_SLICES}},
        "multi": {"num_images=2": {"accuracy": 0.6}, "num_images=4": {"accuracy": 0.3}},
        **{f"detail_{k}": 1 for k in ("tokens", "kv_mib", "encoder_ms", "prefill_ms", "requests")},
        "scene_tokens": 16,
        "vqa_by_phrasing": {f"{q}/{ph}": vqa for q in high_res.VQA_SLICES for ph in ("seen", "heldout")},
    }


def test_several_seeds_add_a_mean_and_range_line():
    rows = [_row("single-mlp", 0, 0.9), _row("single-mlp", 1, 0.7), _row("anyres-mlp", 0, 0.8)]
    lines = high_res.table(rows, 128).splitlines()
    assert len(lines) == 2 + 4  # head, rule, three runs, one mean line (anyres has one seed)
    mean = lines[4]
    assert mean.startswith("| **single-mlp** | mean of 2 |")
    assert "0.800 (0.700-0.900)" in mean  # VQA overall over the two seeds
    assert "0.600 (0.600-0.600) / 0.300 (0.300-0.300)" in mean
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert lines[5].startswith("| anyres-mlp | 0 |")


def test_by_phrasing_splits_each_question_type():
    preds = [
        {"slices": {"question_type": "shape", "phrasing": "seen"}, "score": 1.0},
        {"slices": {"question_type": "shape", "phrasing": "heldout"}, "score": 0.0},
        {"slices": {"question_type": "shape", "phrasing": "heldout"}, "score": 1.0},
    ]
    assert high_res.by_phrasing(preds) == {"shape/seen": 1.0, "shape/heldout": 0.5}


def test_phrasing_table_has_a_mean_line_and_names_missing_cells():
    rows = [_row("single-mlp", 0, 0.9), _row("single-mlp", 1, 0.7), _row("anyres-mlp", 0, 0.8)]
    del rows[2]["vqa_by_phrasing"]["count/heldout"]
    lines = high_res.phrasing_table(rows).splitlines()
    assert lines[0].startswith("| arm | seed | colour, seen | colour, heldout | shape, seen |")
    assert len(lines) == 2 + 4
    assert lines[4].startswith("| **single-mlp** | mean of 2 | 0.800 (0.700-0.900) |")
    assert "nan" in lines[5]  # a question type / phrasing with no records shows as nan, not as a fake score
    assert all(line.count("|") == lines[0].count("|") for line in lines)
