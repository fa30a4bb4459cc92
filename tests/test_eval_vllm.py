"""`vlm eval --engine vllm` end to end (offline vllm.LLM, one engine for two tasks) against the transformers engine."""

from __future__ import annotations

import subprocess
import sys

import pytest
import vllm  # noqa: F401  (an error, not a skip, without the serve extra: these tests are what it is for)
from eval_helpers import read_json, tiny_eval_data
from vllm_helpers import tiny_checkpoint, vllm_info_lines

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_vllm_engine_eval_matches_transformers_greedy(tmp_path):
    from vlm.eval.engines import HFEngine
    from vlm.eval.tasks import load_examples

    ckpt, data = str(tiny_checkpoint("clip", "llama", "mlp")), tiny_eval_data()
    cmd = [sys.executable, "-m", "vlm.cli", "eval", ckpt, "--engine", "vllm", "--limit", "8"]
    cmd += [
        "--task",
        "vqa",
        "--data",
        str(data["vqa_eval"]),
        "--task",
        "pope",
        "--data",
        str(data["pope_eval"]),
    ]
    cmd += ["--out", str(tmp_path / "{task}.json"), "--enforce-eager", "--dtype", "float32"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "vqa " in run.stdout and "pope " in run.stdout  # both tables
    assert "vllm generate" in run.stderr  # the progress bar
    assert not vllm_info_lines(run.stdout + run.stderr), "vLLM logs INFO lines by default"
    assert run.stdout.startswith("vqa "), "stdout holds the tables only (vLLM logs go to stderr)"
    vqa, pope = read_json(tmp_path / "vqa.json"), read_json(tmp_path / "pope.json")
    assert vqa["engine"] == "vllm" and vqa["n"] == 8 and pope["n"] == 8
    examples = load_examples(data["vqa_eval"], "vqa", limit=8)
    # Unbatched transformers greedy decoding gives the same tokens (as tests/test_engine_parity.py pins).
    hf = HFEngine(ckpt, batch_size=1).generate([(e.images, e.messages) for e in examples], max_new_tokens=16)
    # A random tiny model can stop inside a multi-byte character: vLLM's detokenizer drops that incomplete tail,
    # transformers' decode renders it as U+FFFD. The tokens are the same; compare the text without that tail.
    assert [p["prediction"].rstrip("\ufffd") for p in vqa["predictions"]] == [h.rstrip("\ufffd") for h in hf]


def test_vllm_engine_eval_on_multi_image_records_matches_transformers(tmp_path):
    """multi_eval.jsonl (2 and 4 images per question): the engine is started for the largest image count, every
    image reaches the prompt, and the answers are transformers' greedy ones, reported per num_images slice."""
    from vlm.data import synth
    from vlm.eval.engines import HFEngine
    from vlm.eval.tasks import load_examples

    ckpt = str(tiny_checkpoint("clip", "llama", "mlp"))
    data = synth.generate(tmp_path / "data", 2, seed=0, n_eval=16, progress=False)["multi_eval"]
    out = tmp_path / "multi.json"
    cmd = [
        sys.executable,
        "-m",
        "vlm.cli",
        "eval",
        ckpt,
        "--engine",
        "vllm",
        "--task",
        "vqa",
        "--data",
        str(data),
    ]
    cmd += ["--out", str(out), "--enforce-eager", "--dtype", "float32", "--quiet"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    report = read_json(out)
    assert report["slices"]["num_images=2"]["n"] == report["slices"]["num_images=4"]["n"] == 8
    examples = load_examples(data, "vqa")
    assert sorted({len(e.images) for e in examples}) == [2, 4]
    hf = HFEngine(ckpt, batch_size=1).generate([(e.images, e.messages) for e in examples], max_new_tokens=16)
    assert [p["prediction"].rstrip("\ufffd") for p in report["predictions"]] == [
        h.rstrip("\ufffd") for h in hf
    ]
