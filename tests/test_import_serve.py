"""Imported llava-hf checkpoints through `vlm serve` (vLLM): the stock model's greedy answers, and the whole
bring-your-own-LLaVA path: import, stage 2 LoRA, merge, serve, eval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llava_helpers import imported, stock
from vllm_helpers import Server, data_url, noise_image, png_bytes

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [("what colour is the shape?", 1), ("compare the two pictures.", 2)]


def _content(question: str, urls: list[str]) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [
        {"type": "text", "text": question}
    ]


def _hf_greedy(model_cls, ckpt: Path, question: str, images, max_new_tokens: int) -> list[int]:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(ckpt)
    model = model_cls.from_pretrained(ckpt).eval()
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    batch = processor(text=[prompt], images=images, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, batch["input_ids"].shape[1] :].tolist()


def _served_greedy(server: Server, question: str, images, max_tokens: int) -> list[int]:
    client = server.client()
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": _content(question, [data_url(png_bytes(i)) for i in images])}],
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body={"return_token_ids": True},
    )
    return reply.choices[0].model_extra["token_ids"]


def _serving(ckpt: Path, logs: Path):
    server = Server(ckpt.name, ckpt, ["--enforce-eager", "--max-images", "2"], logs)
    server.wait_ready()
    return server


def test_vlm_serve_of_an_import_answers_as_the_stock_llava(tmp_path):
    from transformers import LlavaForConditionalGeneration

    server = _serving(imported("clip-default"), tmp_path)
    try:
        answers = []
        for k, (question, n) in enumerate(QUESTIONS):
            images = [noise_image(20 + 2 * k + i) for i in range(n)]
            expected = _hf_greedy(LlavaForConditionalGeneration, stock("clip-default"), question, images, 12)
            assert _served_greedy(server, question, images, 12) == expected, question
            answers.append(expected)
        assert answers[0] != answers[1] and all(answers)
    finally:
        server.stop()


def _vlm(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    run = subprocess.run(
        [sys.executable, "-m", "vlm.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert run.returncode == 0, f"vlm {args[0]} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


@pytest.mark.deepspeed
def test_imported_llava_tunes_with_lora_merges_serves_and_evaluates(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from vlm.data.synth import generate

    data = generate(tmp_path / "data", n=32, seed=0, n_eval=8, progress=False)
    base = tmp_path / "imported"
    _vlm("import", "--from", "llava-hf", str(stock("clip-default")), "--out", str(base))
    run = tmp_path / "lora"
    _vlm(
        "train",
        "stages/stage2_lora.yaml",
        f"model={base}",
        f"output_dir={run}",
        f"data=[{data['vqa_train']}]",
        "micro_batch_size=8",
        "global_batch_size=8",
        "max_steps=2",
        "lora.r=4",
        "lora.alpha=8",
        "--num-gpus",
        "1",
    )
    # template: auto picked the imported checkpoint's llava template, and the LoRA update changed the LLM.
    merged = tmp_path / "merged"
    _vlm("export", str(run / "adapter"), "--merge-lora", "--out", str(merged))
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(
        load_file(merged / "model.safetensors")[q], load_file(base / "model.safetensors")[q]
    )
    assert (merged / "chat_template.jinja").read_text() == (base / "chat_template.jinja").read_text()

    server = _serving(merged, tmp_path)
    try:
        images = [noise_image(40)]
        expected = _hf_greedy(AutoModelForImageTextToText, merged, "what colour is the shape?", images, 8)
        assert _served_greedy(server, "what colour is the shape?", images, 8) == expected
    finally:
        server.stop()

    report = tmp_path / "vqa.json"
    cmd = ["eval", str(merged), "--engine", "hf", "--quiet", "--limit", "4"]
    _vlm(*cmd, "--task", "vqa", "--data", str(data["vqa_eval"]), "--out", str(report))
    result = json.loads(report.read_text())
    assert result["n"] == 4 and len(result["predictions"]) == 4
