"""Performance features: the frozen-tower feature cache (same loss, invalidation, corruption, refusal, ranks),
the FLOP model behind tflops_per_s / MFU, and the padding report."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from vlm.data.collate import Collator, PackingCollator, model_inputs
from vlm.data.records import load_llava_dataset
from vlm.data.samples import SampleError, SkippedSample, SupervisedDataset
from vlm.data.synth import generate
from vlm.train import feature_cache
from vlm.train.feature_cache import (
    FeatureCacheError,
    build_feature_cache,
    fingerprint,
    setup_feature_cache,
)
from vlm.train.flops import FlopModel, batch_flops, peak_flops

ROOT = Path(__file__).resolve().parents[1]
MODES = ("raise", "skip")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    generate(root, n=24, seed=0, n_eval=4, progress=False)
    return root


@pytest.fixture(scope="module")
def mlp(build):
    return build("clip", "llama", "mlp")


def captions(proc, scenes, **kwargs):
    records = load_llava_dataset(str(scenes / "caption_train.jsonl"))
    return SupervisedDataset(records, proc, "plain", max_length=128, **kwargs)


def cache_for(model, proc, ds, root, on_error="raise"):
    return build_feature_cache(model, proc, ds, Path(root), 8, "cpu", 0, 1, on_error)


def loss_and_grads(model, batch):
    params = [p for p in model.connector.parameters()]
    loss = model(**model_inputs(batch)).loss
    return loss.detach(), torch.autograd.grad(loss, params)


# -- feature cache -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("connector", ["mlp", "perceiver"])
def test_cached_features_give_the_same_loss_and_gradients(build, scenes, tmp_path, connector):
    model, proc = build("clip", "llama", connector)
    ds = captions(proc, scenes)
    cached = cache_for(model, proc, ds, tmp_path)
    pad = proc.tokenizer.pad_token_id
    for collate in (Collator(pad), PackingCollator(pad, max_length=128)):
        items = list(range(0, 12))
        plain, fast = collate([ds[i] for i in items]), collate([cached[i] for i in items])
        assert (
            "pixel_values" not in fast
            and "image_features" in fast
            and fast["image_features"].shape[0] == plain["pixel_values"].shape[0]
        )
        ref_loss, ref_grads = loss_and_grads(model, plain)
        loss, grads = loss_and_grads(model, fast)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=0, atol=1e-6)


def test_second_build_reuses_every_entry_and_dedups_by_content(mlp, scenes, tmp_path, monkeypatch):
    model, proc = mlp
    ds = captions(proc, scenes)
    first = cache_for(model, proc, ds, tmp_path)
    shards = sorted(first.cache.dir.glob("shard-*.safetensors"))
    assert len(first.cache.index) == len(set(first.digests.values())) <= len(first.digests)
    calls = []
    monkeypatch.setattr(type(model), "get_tower_features", lambda *a: calls.append(a))
    second = cache_for(model, proc, ds, tmp_path)
    assert not calls and sorted(second.cache.dir.glob("shard-*.safetensors")) == shards


def test_image_digests_are_read_from_the_index_until_a_file_changes(mlp, scenes, tmp_path, monkeypatch):
    model, proc = mlp
    ds = captions(proc, scenes)
    first = cache_for(model, proc, ds, tmp_path)
    assert (tmp_path / feature_cache.DIGEST_INDEX).is_file()
    monkeypatch.setattr(feature_cache, "_DIGESTS", {})  # a new process: nothing memoised
    hashed = []
    real = feature_cache.file_digest
    monkeypatch.setattr(feature_cache, "file_digest", lambda p: hashed.append(p) or real(p))
    assert cache_for(model, proc, ds, tmp_path).digests == first.digests and hashed == []
    changed = sorted(first.digests)[0]
    original = Path(changed).read_bytes()
    try:
        Image.new("RGB", (20, 20), (1, 2, 3)).save(changed)  # new content, size and mtime
        second = cache_for(model, proc, ds, tmp_path)
    finally:
        Path(changed).write_bytes(original)  # the module's other tests share these scenes
    assert hashed == [changed] and second.digests[changed] != first.digests[changed]


def test_tower_or_preprocessing_change_gets_a_new_cache(mlp, scenes, tmp_path, caplog):
    model, proc = mlp
    base, _ = fingerprint(model, proc.image_processor)
    other_tower = copy.deepcopy(model)
    with torch.no_grad():
        next(other_tower.vision_tower.parameters()).add_(1e-3)
    other_proc = copy.deepcopy(proc.image_processor)
    other_proc.image_mean = [0.5, 0.5, 0.5]
    other_layer = copy.deepcopy(model)
    other_layer.config.vision_feature_layer = -1
    digests = {
        fingerprint(other_tower, proc.image_processor)[0],
        fingerprint(model, other_proc)[0],
        fingerprint(other_layer, proc.image_processor)[0],
    }
    assert base not in digests and len(digests) == 3

    ds = captions(proc, scenes)
    old = cache_for(model, proc, ds, tmp_path)
    with caplog.at_level(logging.INFO, logger="vlm.train"):
        new = cache_for(other_tower, proc, ds, tmp_path)
    assert new.cache.dir != old.cache.dir and "tower or preprocessing differs" in caplog.text
    a, b = old.cache.get(old.digests[ds.image_paths[0][0]]), new.cache.get(new.digests[ds.image_paths[0][0]])
    assert not torch.equal(a, b)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape"])
def test_corrupt_shard_is_moved_aside_and_rebuilt(mlp, scenes, tmp_path, damage, caplog):
    from safetensors.torch import save_file

    model, proc = mlp
    ds = captions(proc, scenes)
    good = cache_for(model, proc, ds, tmp_path)
    key = good.digests[ds.image_paths[0][0]]
    expected = good.cache.get(key).clone()
    (shard,) = good.cache.dir.glob("shard-*.safetensors")
    good.cache.close()
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "garbage":
        shard.write_bytes(b"\xff" * 64)
    else:
        save_file({key: torch.zeros(3, 3)}, str(shard), metadata={"fingerprint": good.cache.digest})
    with caplog.at_level(logging.WARNING, logger="vlm.train"):
        rebuilt = cache_for(model, proc, ds, tmp_path)
    assert "corrupt shard" in caplog.text and shard.with_suffix(".corrupt").exists()
    torch.testing.assert_close(rebuilt.cache.get(key), expected, rtol=0, atol=0)


def good_and_corrupt(tmp_path) -> list[dict]:
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(good)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    return [
        {
            "id": i,
            "images": [str(p)],
            "conversations": [
                {"from": "human", "value": "<image>\nCaption."},
                {"from": "gpt", "value": "a red square."},
            ],
        }
        for i, p in enumerate([good, bad])
    ]


def test_corrupt_image_raises_or_is_skipped_and_counted(mlp, tmp_path):
    model, proc = mlp
    records = good_and_corrupt(tmp_path)
    ds = SupervisedDataset(records, proc, "plain", max_length=128, on_error="skip")
    with pytest.raises(SampleError, match="corrupt_image"):
        cache_for(model, proc, ds, tmp_path / "raise")
    cached = cache_for(model, proc, ds, tmp_path / "skip", on_error="skip")
    assert "image_features" in cached[0]
    skipped = cached[1]
    assert isinstance(skipped, SkippedSample) and skipped.reason == "corrupt_image"
    assert cached.skip_report() == {"corrupt_image": 1}


def test_failures_cached_by_an_earlier_run_raise_or_skip_as_an_uncached_run(
    mlp, tmp_path, monkeypatch, caplog
):
    # A skip-mode run records the corrupt image in the cache; a raise-mode run on the same cache used to find
    # nothing missing and skip that sample silently.
    model, proc = mlp
    records = good_and_corrupt(tmp_path)
    plain = {mode: SupervisedDataset(records, proc, "plain", max_length=128, on_error=mode) for mode in MODES}
    with pytest.raises(SampleError) as uncached_error:
        plain["raise"][1]
    uncached_skip = plain["skip"][1]

    cache_for(model, proc, plain["skip"], tmp_path / "fc", on_error="skip")
    monkeypatch.setattr(type(model), "get_tower_features", lambda *a: pytest.fail("the tower ran again"))
    with pytest.raises(SampleError) as cached_error:
        cache_for(model, proc, plain["raise"], tmp_path / "fc")
    assert (
        str(cached_error.value) == str(uncached_error.value) and cached_error.value.reason == "corrupt_image"
    )

    again = cache_for(
        model, proc, SupervisedDataset(records, proc, "plain", 128, "skip"), tmp_path / "fc", "skip"
    )
    with caplog.at_level(logging.WARNING):
        assert again[1] == uncached_skip  # same id, reason and detail (the decoder's message)
    assert "skipping sample 1: corrupt_image" in caplog.text
    assert again.skip_report() == plain["skip"].skip_report() == {"corrupt_image": 1}
    assert again.load_skipped_ids == plain["skip"].load_skipped_ids == {"corrupt_image": [1]}
    batch = Collator(proc.tokenizer.pad_token_id)([again[0], again[1]])
    assert batch["skipped"] == [(1, "corrupt_image")] and batch["image_features"].shape[0] == 1


def test_refused_for_a_trained_or_random_tower_and_under_zero3(mlp, scenes, tmp_path):
    model, proc = mlp
    ds = captions(proc, scenes)
    trained = copy.deepcopy(model)
    trained.vision_tower.requires_grad_(True)
    with pytest.raises(FeatureCacheError, match="frozen vision tower"):
        cache_for(trained, proc, ds, tmp_path)
    noisy = copy.deepcopy(model)
    noisy.config.vision_config.attention_dropout = 0.1
    with pytest.raises(FeatureCacheError, match="dropout"):
        cache_for(noisy, proc, ds, tmp_path)
    data = SimpleNamespace(dataset=ds)
    recipe = SimpleNamespace(feature_cache=str(tmp_path), micro_batch_size=8, on_bad_sample="raise")
    with pytest.raises(FeatureCacheError, match="ZeRO-2"):
        setup_feature_cache(recipe, model, proc, data, 3, 0, 1, "cpu")
    recipe.feature_cache = "auto"
    assert setup_feature_cache(recipe, model, proc, data, 3, 0, 1, "cpu") is False and data.dataset is ds


def test_a_cache_that_would_not_fit_is_refused_or_auto_off(mlp, scenes, tmp_path, monkeypatch):
    import vlm.train.feature_cache as fc

    model, proc = mlp
    ds = captions(proc, scenes)
    data = SimpleNamespace(dataset=ds)
    recipe = SimpleNamespace(feature_cache=str(tmp_path), micro_batch_size=8, on_bad_sample="raise")
    monkeypatch.setattr(fc.shutil, "disk_usage", lambda _: SimpleNamespace(free=1000))
    with pytest.raises(FeatureCacheError, match="GiB free"):
        setup_feature_cache(recipe, model, proc, data, 2, 0, 1, "cpu")
    monkeypatch.setenv("VLM_FEATURE_CACHE", str(tmp_path))
    recipe.feature_cache = "auto"
    assert setup_feature_cache(recipe, model, proc, data, 2, 0, 1, "cpu") is False and data.dataset is ds
    monkeypatch.setattr(fc.shutil, "disk_usage", lambda _: SimpleNamespace(free=2**40))
    assert setup_feature_cache(recipe, model, proc, data, 2, 0, 1, "cpu") is True
    assert isinstance(data.dataset, fc.CachedFeatureDataset)


def _start(out: Path, data: Path, base: Path, *overrides: str, procs: int = 1):
    cmd = [sys.executable, "-m", "vlm.cli", "train", "stages/stage1.yaml", f"output_dir={out}"]
    cmd += [f"model={base}", f"data=[{data}]", "micro_batch_size=4", "global_batch_size=8", "log_every=1"]
    cmd += [*overrides, "--num-gpus", str(procs)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _metrics(proc: subprocess.Popen, out: Path) -> list[dict]:
    log_text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log_text[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.deepspeed
@pytest.mark.slow
def test_two_rank_cached_run_matches_an_uncached_run(mlp, scenes, tmp_path):
    from vlm.build import save_checkpoint

    model, proc = mlp
    save_checkpoint(model, proc, tmp_path / "base")
    data, base = scenes / "caption_train.jsonl", tmp_path / "base"
    common = ("epochs=2", "max_steps=4")  # 3 steps per epoch: the 4th step reads epoch 2 from the cache
    # Side by side: the launcher's start-up dominates both runs.
    plain = _start(tmp_path / "plain", data, base, "feature_cache=null", *common)
    cached = _start(tmp_path / "cached", data, base, f"feature_cache={tmp_path / 'fc'}", *common, procs=2)
    plain, cached = _metrics(plain, tmp_path / "plain"), _metrics(cached, tmp_path / "cached")
    assert [r["loss"] for r in cached] == pytest.approx([r["loss"] for r in plain], rel=0, abs=1e-5)
    assert len(list((tmp_path / "fc").glob("*/shard-r0001-*.safetensors"))) == 1  # rank 1 built its share
    assert all(r["tflops_per_s"] > 0 and r["input_tokens_per_s"] > 0 and "mfu" not in r for r in cached)


# -- FLOPs and MFU -------------------------------------------------------------------------------------------
def test_flop_model_matches_a_hand_count(mlp):
    model, _ = mlp
    vc, tc = model.config.vision_config, model.config.text_config
    # tower: patch conv + 4 attention projections and a 2-matrix MLP per layer on P + 1 tokens (CLS), plus the
    # attention scores and weighted sum (2 x 2·T²·d per layer); each multiply-add is 2 FLOPs.
    p, d, inter, layers = (
        (vc.image_size // vc.patch_size) ** 2,
        vc.hidden_size,
        vc.intermediate_size,
        vc.num_hidden_layers,
    )
    t = p + 1
    tower = 2 * 3 * vc.patch_size**2 * d * p + layers * (2 * t * (4 * d * d + 2 * d * inter) + 4 * t * t * d)
    # mlp connector: Dv -> D -> D on each patch
    D, ffn, V = tc.hidden_size, tc.intermediate_size, tc.vocab_size
    connector = 2 * p * (d * D + D * D)
    heads, kv, hd = tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim
    llm_linear = tc.num_hidden_layers * (2 * D * heads * hd + 2 * D * kv * hd + 3 * D * ffn) + D * V
    fm = FlopModel.for_model(model, llm_trains=False)
    assert (fm.tower_per_image, fm.connector_per_image, fm.llm_linear) == (tower, connector, llm_linear)
    assert fm.llm_attention == 4 * tc.num_hidden_layers * heads * hd

    lengths, n_images = [40, 25], 2
    llm_fwd = 2 * llm_linear * 65 + 4 * tc.num_hidden_layers * heads * hd * (40**2 + 25**2)
    stage1 = 2 * llm_fwd + 3 * connector * n_images + tower * n_images  # frozen LLM: fwd + input-grad bwd
    assert fm.step_flops(lengths, n_images, tower_ran=True) == stage1
    assert fm.step_flops(lengths, n_images, tower_ran=False) == stage1 - tower * n_images
    full = FlopModel.for_model(model, llm_trains=True)
    assert full.step_flops(lengths, n_images, tower_ran=True) == stage1 + llm_fwd
    batch = {"seq_lengths": lengths, "image_features": torch.zeros(n_images, p, d)}
    assert batch_flops(fm, batch) == stage1 - tower * n_images


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA L40S") == 362e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("Some Future GPU") is None and peak_flops(None) is None
