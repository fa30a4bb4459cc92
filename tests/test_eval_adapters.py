"""Benchmark-suite adapters: VLMEvalKit's BaseModel interface and lmms-eval's model registry, on a tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_helpers import tiny_eval_data
from vllm_helpers import tiny_checkpoint

from vlm.eval.engines import HFEngine

QUESTION = "What colour is shown?"


@pytest.fixture(scope="module")
def ckpt():
    return str(tiny_checkpoint("clip", "llama", "mlp"))


@pytest.fixture(scope="module")
def engine(ckpt):
    return HFEngine(ckpt)


@pytest.fixture(scope="module")
def data():
    return tiny_eval_data()


def _image(data) -> str:
    return str(next(iter(sorted(data["images_eval"].glob("*.png")))))


def test_vlmevalkit_generate_inner_matches_the_engine(ckpt, engine, data):
    from vlm.eval.adapters.vlmevalkit import VLMEvalKitModel

    model = VLMEvalKitModel(model_path=ckpt, engine="hf", max_new_tokens=12)
    image = _image(data)
    message = [{"type": "image", "value": image}, {"type": "text", "value": QUESTION}]
    expected = engine.generate([([image], QUESTION)], max_new_tokens=12)[0]
    assert model.generate(message, dataset="vlm_synth") == expected  # BaseModel.generate -> generate_inner
    assert model.generate_inner(message, "vlm_synth") == expected
    assert model.batch_generate([message, message]) == [expected, expected]
    assert isinstance(model.generate(QUESTION), str)  # a bare string is a text-only message
    with pytest.raises((AssertionError, ValueError)):
        model.generate([{"type": "video", "value": "clip.mp4"}])


def test_lmms_eval_truncates_at_stop_strings():
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (make eval-suites)")
    from vlm.eval.adapters.lmms_eval import truncate_at

    assert truncate_at("red\nblue", ["\n"]) == "red"
    assert truncate_at("red. blue\n", ["\n", "."]) == "red"
    assert truncate_at("red", []) == "red"


@pytest.mark.slow
def test_lmms_eval_discovers_the_model_and_runs_an_in_repo_task_offline(
    ckpt, engine, data, tmp_path, monkeypatch
):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (make eval-suites)")
    from lmms_eval import models
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vlm.eval.adapters.lmms_eval import VLMLmms

    assert models.get_model("vlm") is VLMLmms  # found through our `lmms_eval.models` entry point
    shipped = Path(__file__).parents[1] / "vlm/eval/adapters/lmms_tasks"
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    yaml = (shipped / "vlm_synth_vqa.yaml").read_text()
    yaml = yaml.replace(
        "test: data/synth/vqa_eval.jsonl", f"test: {data['vqa_eval']}\n  cache_dir: {tmp_path}"
    )
    (task_dir / "vlm_synth_vqa.yaml").write_text(yaml)
    (task_dir / "utils.py").write_text((shipped / "utils.py").read_text())
    monkeypatch.setenv("VLM_SYNTH_DIR", str(data["root"]))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    out = simple_evaluate(
        model="vlm", model_args=f"pretrained={ckpt},engine=hf", tasks=["vlm_synth_vqa"],
        task_manager=TaskManager(include_path=str(task_dir)), limit=4, batch_size=4,
    )  # fmt: skip
    assert "vqa_accuracy,none" in out["results"]["vlm_synth_vqa"]
    samples = sorted(out["samples"]["vlm_synth_vqa"], key=lambda s: s["doc_id"])
    root = data["root"]
    for s in samples:
        doc = s["doc"]
        question = doc["conversations"][0]["value"].replace("<image>", "").strip()
        expected = engine.generate([([str(root / doc["image"])], question)], max_new_tokens=16)[0]
        assert s["resps"][0][0] == expected.split("\n")[0]
