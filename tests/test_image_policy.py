"""Image policies (vlm/policies): `single` stays as it was; `anyres` tiles, and its token count is one function
that the processor, the training sample encoder and the model's merge agree on, at five aspect ratios."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlm import VLMForConditionalGeneration, VLMProcessor
from vlm.build import build_base_model, save_checkpoint
from vlm.config import VLMConfig
from vlm.policies import get_image_policy, image_policy_config_from_dict, image_token_count, pool_patches
from vlm.policies.anyres import best_grid
from vlm.policies.base import Layout

# (width, height) at 1:1, 4:3, 3:4, 16:9 and 1:3; small and large enough to pick different grids on the
# 32 px tiny tower.
ASPECTS = {"1:1": (64, 64), "4:3": (40, 30), "3:4": (48, 64), "16:9": (112, 63), "1:3": (32, 96)}
TILE = 32  # the tiny presets' tower size


def noise(size, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@functools.cache
def anyres(connector: str = "mlp", pool: int = 1, tower: str = "clip"):
    model, processor = build_base_model(
        tower, "llama", connector, image_policy={"type": "anyres", "pool": pool}
    )
    return model.eval(), processor


def prompt(processor, n_images=1, question="what is in the picture?") -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


# -- the grid choice and the layout ----------------------------------------------------------------------------


def test_best_grid_prefers_effective_resolution_then_least_waste():
    grids = [[1, 2], [2, 1], [2, 2], [1, 3], [3, 1]]
    assert best_grid(64, 32, grids, TILE) == (1, 2)  # exactly a 1x2 canvas
    assert best_grid(32, 64, grids, TILE) == (2, 1)
    assert best_grid(96, 32, grids, TILE) == (1, 3)
    assert best_grid(32, 96, grids, TILE) == (3, 1)
    assert best_grid(64, 64, grids, TILE) == (2, 2)
    # 40x30 fits 1x2 and 2x2 at full resolution (1200 px shown); 1x2 wastes less.
    assert best_grid(40, 30, grids, TILE) == (1, 2)


def test_token_count_formula_per_layout():
    policy = get_image_policy({"type": "anyres"})
    for (width, height), (rows, cols) in {(64, 32): (1, 2), (32, 96): (3, 1), (64, 64): (2, 2)}.items():
        assert policy.layout(width, height, TILE) == Layout(rows, cols)
        expected = (1 + rows * cols) * 16 + rows  # base + tiles, one newline per row of tiles
        assert image_token_count({"type": "anyres"}, width, height, TILE, 16) == expected
    assert image_token_count(None, 999, 3, TILE, 16) == 16  # single: any size, one crop


def test_crops_are_base_then_tiles_row_major_padded_with_the_mean():
    policy = get_image_policy({"type": "anyres", "grids": [[1, 2]]})
    image = Image.new("RGB", (64, 16), (255, 0, 0))
    image.paste((0, 0, 255), (32, 0, 64, 16))  # right half blue
    base, left, right = policy.crops(image, TILE, fill=(7, 7, 7))
    assert base.size == left.size == right.size == (TILE, TILE)
    # The 64x16 image fills the 64x32 canvas's width, centred in height: mean-coloured bands above and below.
    assert left.getpixel((16, 0)) == (7, 7, 7) and right.getpixel((16, 31)) == (7, 7, 7)
    assert left.getpixel((16, 16)) == (255, 0, 0) and right.getpixel((16, 16)) == (0, 0, 255)


def test_assemble_puts_a_newline_after_each_row_of_tiles():
    policy = get_image_policy({"type": "anyres"})
    crops = torch.arange(5.0).reshape(5, 1, 1).expand(5, 2, 3)  # crop k's tokens are all k
    newline = torch.full((3,), -1.0)
    out = policy.assemble(crops, Layout(2, 2), newline)
    assert out[:, 0].tolist() == [0, 0, 1, 1, 2, 2, -1, 3, 3, 4, 4, -1]


def test_pool_patches_averages_2x2_blocks():
    features = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid, row-major
    pooled = pool_patches(features, 2)
    assert pooled[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]


# -- bad input: clear errors naming the field and value ----------------------------------------------------------


@pytest.mark.parametrize(
    "policy, match",
    [
        ({"type": "anyres", "grids": []}, r"grids must be a non-empty list .* got \[\]"),
        ({"type": "anyres", "grids": [[2]]}, r"grids\[0\] must be \[rows, cols\] .* got \[2\]"),
        ({"type": "anyres", "grids": [[1, 2], [0, 2]]}, r"grids\[1\] .* got \[0, 2\]"),
        ({"type": "anyres", "grids": "2x2"}, r"grids must be a non-empty list .* got '2x2'"),
        ({"type": "anyres", "grids": [[1, 2], [1, 2]]}, r"grids\[1\] \[1, 2\] is listed twice"),
        ({"type": "anyres", "pool": 0}, r"pool must be an integer >= 1, got 0"),
        ({"type": "anyres", "grid": [[1, 2]]}, r"unknown key 'grid' for image policy 'anyres'"),
        ({"type": "anyress"}, r"unknown image_policy type 'anyress'.*anyres"),
        ({"type": "single", "grids": [[1, 2]]}, r"unknown key 'grids' for image policy 'single'"),
    ],
)
def test_bad_policy_configs_are_refused_by_name(policy, match):
    with pytest.raises(ValueError, match=match):
        image_policy_config_from_dict(policy)


def test_pool_must_divide_the_patch_grid(build):
    model, _ = build("clip", "llama", "mlp")  # 4x4 patches
    values = {**model.config.to_dict(), "image_policy": {"type": "anyres", "pool": 3}}
    with pytest.raises(ValueError, match=r"pool 3 must divide the tower's patch grid side \(4 patches"):
        VLMConfig(**values)


def test_an_image_smaller_than_a_tile_is_refused():
    _, processor = anyres()
    with pytest.raises(ValueError, match=r"image 20x16 px is smaller than one 32 px tile"):
        processor(text=[prompt(processor)], images=[noise((20, 16))], return_tensors="pt")


# -- single: unchanged ---------------------------------------------------------------------------------------------


def test_single_is_the_default_and_an_old_checkpoint_loads_as_single(build, tmp_path):
    model, processor = build("clip", "llama", "mlp")
    assert model.config.image_policy == {"type": "single", "pool": 1}
    assert processor.image_policy == {"type": "single", "pool": 1}
    out = save_checkpoint(model, processor, tmp_path / "ckpt")
    for name in ("config.json", "processor_config.json"):  # as written before policies existed
        path = out / name
        values = json.loads(path.read_text())
        assert values.pop("image_policy") == {"type": "single", "pool": 1}
        path.write_text(json.dumps(values))
    old = VLMForConditionalGeneration.from_pretrained(out).eval()
    old_processor = VLMProcessor.from_pretrained(out)
    assert old.config.image_policy == {"type": "single", "pool": 1}
    batch = old_processor(text=[prompt(old_processor)], images=[noise((40, 36))], return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values"}  # no image_sizes under single
    expected = processor.image_processor(images=[noise((40, 36))], return_tensors="pt")["pixel_values"]
    assert torch.equal(batch["pixel_values"], expected)
    with torch.no_grad():
        got = old.generate(**batch, max_new_tokens=8, do_sample=False)
        want = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


# -- anyres: one count, everywhere ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "connector, pool", [("linear", 1), ("mlp", 1), ("mlp", 2), ("qformer", 1), ("perceiver", 1)]
)
def test_counts_agree_at_five_aspect_ratios(connector, pool):
    model, processor = anyres(connector, pool)
    config = model.config
    layouts = set()
    for k, (name, size) in enumerate(ASPECTS.items()):
        expected = image_token_count(config.image_policy, *size, config.image_size, config.num_image_tokens)
        layouts.add(config.policy.layout(*size, config.image_size))
        assert config.image_token_count(*size) == processor.image_token_count(*size) == expected, name
        batch = processor(text=[prompt(processor)], images=[noise(size, k)], return_tensors="pt")
        assert int((batch["input_ids"] == processor.image_token_id).sum()) == expected, name
        with torch.no_grad():
            (embeds,) = model.get_image_features(batch["pixel_values"], batch["image_sizes"])
            assert embeds.shape == (expected, config.text_config.hidden_size), name
            out = model(**batch)  # the merge checks placeholders against the features
        assert out.logits.shape[1] == batch["input_ids"].shape[1]
    assert len(layouts) >= 3  # the five ratios exercise several grids, not one
    assert config.max_image_tokens == max(
        config.policy.layout_tokens(lay, config.num_image_tokens) for lay in config.policy.layouts()
    )


def test_pooling_quarters_the_mlp_tokens_per_crop_and_not_the_qformers():
    assert anyres("mlp", 1)[0].config.num_image_tokens == 16
    assert anyres("mlp", 2)[0].config.num_image_tokens == 4
    assert anyres("qformer", 1)[0].config.num_image_tokens == 32  # its queries, per tile


def test_a_placeholder_count_off_by_one_is_refused():
    model, processor = anyres()
    batch = processor(text=[prompt(processor)], images=[noise(ASPECTS["16:9"])], return_tensors="pt")
    ids = batch["input_ids"]
    first = int((ids[0] == processor.image_token_id).nonzero()[0])
    short = torch.cat([ids[:, :first], ids[:, first + 1 :]], dim=1)
    with pytest.raises(ValueError, match=r"placeholder tokens but the 1 images take"):
        model(input_ids=short, pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    with pytest.raises(ValueError, match=r"needs image_sizes"):
        model(input_ids=ids, pixel_values=batch["pixel_values"])


def test_two_images_of_different_shapes_in_one_prompt():
    model, processor = anyres()
    images = [noise(ASPECTS["1:3"], 1), noise(ASPECTS["16:9"], 2)]
    batch = processor(text=[prompt(processor, n_images=2)], images=images, return_tensors="pt")
    expected = sum(processor.image_token_count(*im.size) for im in images)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == expected
    assert batch["image_sizes"].tolist() == [[96, 32], [63, 112]]
    with torch.no_grad():
        model(**batch)


def test_generate_is_deterministic_and_survives_a_save(tmp_path):
    model, processor = anyres()
    out = save_checkpoint(model, processor, tmp_path / "anyres")
    saved = json.loads((out / "config.json").read_text())["image_policy"]
    assert saved == json.loads((out / "processor_config.json").read_text())["image_policy"]
    assert saved["type"] == "anyres" and saved["grids"] == [[1, 2], [2, 1], [2, 2], [1, 3], [3, 1]]
    loaded = VLMForConditionalGeneration.from_pretrained(out).eval()
    loaded_processor = VLMProcessor.from_pretrained(out)
    answers = []
    for k, size in enumerate(ASPECTS.values()):
        batch = loaded_processor(
            text=[prompt(loaded_processor)], images=[noise(size, k)], return_tensors="pt"
        )
        with torch.no_grad():
            runs = [m.generate(**batch, max_new_tokens=8, do_sample=False) for m in (model, loaded, loaded)]
        assert torch.equal(runs[0], runs[1]) and torch.equal(runs[1], runs[2])
        answers.append(tuple(runs[0][0, batch["input_ids"].shape[1] :].tolist()))
    assert len(set(answers)) > 1  # the image path is live


# -- training: the sample encoder and the collator -----------------------------------------------------------------


def test_training_samples_count_each_image_by_its_size(tmp_path):
    from vlm.data.collate import Collator, PackingCollator
    from vlm.data.samples import SupervisedDataset, encode_conversation

    model, processor = anyres()
    records = []
    for k, (name, size) in enumerate(ASPECTS.items()):
        path = tmp_path / f"{k}.png"
        noise(size, k).save(path)
        records.append(
            {
                "id": name,
                "images": [str(path)],
                "conversations": [
                    {"from": "human", "value": "<image>\nwhat is it?"},
                    {"from": "gpt", "value": "a red circle."},
                ],
            }
        )
    records.append(
        {"id": "text", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes."}]}
    )
    ds = SupervisedDataset(records, processor, "chatml", max_length=512)
    image_id = processor.image_token_id
    for i, (name, size) in enumerate(ASPECTS.items()):
        item = ds[i]
        n = processor.image_token_count(*size)
        assert int((item["input_ids"] == image_id).sum()) == n, name
        assert (
            ds.lengths[i]
            == len(item["input_ids"])
            == encode_conversation(records[i], processor, "chatml", None).n_tokens
        )
        assert ds.encoded(i).input_ids == item["input_ids"].tolist()
        assert item["image_sizes"].tolist() == [[size[1], size[0]]]
    assert ds[len(ASPECTS)]["image_sizes"].shape == (0, 2)
    for collate in (
        Collator(processor.tokenizer.pad_token_id),
        PackingCollator(processor.tokenizer.pad_token_id, 1024),
    ):
        batch = collate([ds[i] for i in range(len(ds))])
        inputs = {k: batch[k] for k in ("input_ids", "labels", "pixel_values", "image_sizes") if k in batch}
        if "attention_mask" in batch:
            inputs["attention_mask"] = batch["attention_mask"]
        if "position_ids" in batch:
            inputs["position_ids"] = batch["position_ids"]
        loss = model(**inputs, use_cache=False).loss
        assert torch.isfinite(loss)


def test_too_long_names_each_images_count(tmp_path):
    from vlm.data.samples import SampleError, encode_conversation

    _, processor = anyres()
    path = tmp_path / "wide.png"
    noise((64, 64)).save(path)
    record = {
        "id": "r",
        "images": [str(path)],
        "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a."}],
    }
    with pytest.raises(
        SampleError, match=r"too_long: .* \(1 images taking \[82\] placeholders\) > max_length 40"
    ):
        encode_conversation(record, processor, "chatml", 40)


# -- vlm init ------------------------------------------------------------------------------------------------------


def test_vlm_init_writes_the_policy(tmp_path, capsys):
    from vlm.cli import main

    out = tmp_path / "ckpt"
    args = ["init", "--image-policy", "anyres", "--grids", "1x2,2x1,2x2", "--pool", "2", "--out", str(out)]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    policy = {"type": "anyres", "pool": 2, "grids": [[1, 2], [2, 1], [2, 2]]}
    assert printed["image_policy"] == policy and printed["max_image_tokens"] == 5 * 4 + 2
    assert json.loads((out / "config.json").read_text())["image_policy"] == policy
    assert json.loads((out / "processor_config.json").read_text())["image_policy"] == policy
    assert not (
        set(p.name for p in out.iterdir())
        - {
            "config.json",
            "processor_config.json",
            "model.safetensors",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        }
    )


@pytest.mark.parametrize(
    "args, match",
    [
        (["--image-policy", "anyres", "--grids", "2by2"], r"--grids: '2by2' is not ROWSxCOLS"),
        (["--image-policy", "anyres", "--grids", "1x2,0x3"], r"--grids: '0x3' is not ROWSxCOLS"),
        (["--image-policy", "tiles"], r"invalid choice: 'tiles'"),
        (["--grids", "1x2"], r"--grids applies to --image-policy anyres, not 'single'"),
        (["--image-policy", "anyres", "--pool", "3"], r"pool 3 must divide the tower's patch grid side"),
    ],
)
def test_vlm_init_bad_policy_options(tmp_path, capsys, args, match):
    from vlm.cli import main

    try:
        code = main(["init", *args, "--out", str(tmp_path / "x")])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    assert __import__("re").search(match, capsys.readouterr().err)


def test_llava_export_refuses_a_tiled_checkpoint(tmp_path):
    from vlm.export import export_llava_hf

    model, processor = anyres("mlp", 1)
    with pytest.raises(ValueError, match=r"llava-hf export needs image_policy single with pool 1"):
        export_llava_hf(model, processor, tmp_path / "llava")


def test_an_image_too_small_to_tile_is_a_counted_skip(tmp_path):
    from vlm.data.samples import SupervisedDataset

    _, processor = anyres()
    records = []
    for name, size in {"ok": (64, 32), "tiny": (20, 16)}.items():
        path = tmp_path / f"{name}.png"
        noise(size).save(path)
        conversation = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a."}]
        records.append({"id": name, "images": [str(path)], "conversations": conversation})
    ds = SupervisedDataset(records, processor, "chatml", on_error="skip")
    assert ds.ids == ["ok"] and ds.skipped_ids == {"bad_image_size": ["tiny"]}
    with pytest.raises(
        ValueError, match=r"sample 'tiny': bad_image_size: image 20x16 px is smaller than one 32 px"
    ):
        SupervisedDataset(records, processor, "chatml")


def test_a_stage1_connector_moves_with_its_newline_and_only_under_the_same_policy(tmp_path):
    from vlm.train.modeling import load_connector

    model, processor = anyres()
    stage1 = save_checkpoint(model, processor, tmp_path / "stage1")
    target, _ = build_base_model("clip", "llama", "mlp", seed=1, image_policy={"type": "anyres"})
    assert not torch.equal(target.connector.image_newline, model.connector.image_newline)
    load_connector(target, str(stage1))
    assert torch.equal(target.connector.image_newline, model.connector.image_newline)
    # Built here, not the session's cached model: other tests may set attributes on that one's configs.
    single, single_processor = build_base_model("clip", "llama", "mlp", seed=1)
    with pytest.raises(
        ValueError, match=r"image_policy is \{'type': 'single', 'pool': 1\}, but the model has"
    ):
        load_connector(target, str(save_checkpoint(single, single_processor, tmp_path / "single")))
