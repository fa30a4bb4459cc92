"""Training data: label masks per template, refused samples, images, mixing, samplers, collators, packing."""

from __future__ import annotations

import functools
import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.constants import IGNORE_INDEX
from vlm.data import samples as samples_mod
from vlm.data.collate import Collator, PackingCollator, model_inputs, pack_samples, padding_fraction
from vlm.data.records import load_llava_dataset
from vlm.data.samples import (
    SampleError,
    SkippedSample,
    SupervisedDataset,
    encode_conversation,
    load_images,
    mix_datasets,
)
from vlm.data.sampling import DistributedShuffleSampler, LengthGroupedSampler
from vlm.templates import ChatTemplate

COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 160, 0), "black": (0, 0, 0)}


@pytest.fixture(scope="module")
def proc(build):
    return build("clip", "llama", "mlp")[1]


@pytest.fixture
def imgs(tmp_path):
    paths = {}
    for name, rgb in COLOURS.items():
        paths[name] = str(tmp_path / f"{name}.png")
        Image.new("RGB", (32, 32), rgb).save(paths[name])
    paths["corrupt"] = str(tmp_path / "corrupt.png")
    with open(paths["corrupt"], "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    paths["missing"] = str(tmp_path / "nowhere.png")
    return paths


def rec(rid, images, *turns):
    """turns: alternating human, gpt values."""
    roles = (["human", "gpt"] * len(turns))[: len(turns)]
    return {
        "id": rid,
        "images": list(images),
        "conversations": [{"from": r, "value": v} for r, v in zip(roles, turns, strict=True)],
    }


def supervised_runs(tokenizer, sample) -> list[str]:
    """Decoded contiguous runs of supervised tokens."""
    runs, cur = [], []
    for tok, lab in zip(sample.input_ids, sample.labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == tok
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


# -- labels per template -------------------------------------------------------------------------------------


def test_chatml_supervises_every_answer_and_its_end_only(proc, imgs):
    r = rec("q1", [imgs["red"]], "<image>\nWhich shape?", "square", "Which colour?", "red")
    s = encode_conversation(r, proc, "chatml", max_length=512)
    tok = proc.tokenizer
    assert supervised_runs(tok, s) == ["square<|im_end|>", "red<|im_end|>"]
    n = proc.num_image_tokens
    placeholder = [i for i, t in enumerate(s.input_ids) if t == proc.image_token_id]
    assert len(placeholder) == n and placeholder == list(range(placeholder[0], placeholder[0] + n))
    assert all(s.labels[i] == IGNORE_INDEX for i in placeholder)
    assert s.n_tokens == len(s.input_ids) == len(s.labels)
    assert tok.decode(s.input_ids) == (
        "<|im_start|>user\n"
        + "<image>" * n
        + "\nWhich shape?<|im_end|>\n<|im_start|>assistant\nsquare<|im_end|>\n"
        "<|im_start|>user\nWhich colour?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
    )
    assert s.image_paths == [imgs["red"]] and s.id == "q1"


def test_plain_supervises_caption_and_eos_and_drops_the_instruction(proc, imgs):
    r = rec("c1", [imgs["red"]], "<image>\nWrite a short caption for this image.", "two red circles.")
    s = encode_conversation(r, proc, "plain", max_length=512)
    tok = proc.tokenizer
    assert tok.decode(s.input_ids) == "<image>" * proc.num_image_tokens + "two red circles.</s>"
    assert supervised_runs(tok, s) == ["two red circles.</s>"]
    assert s.labels[: proc.num_image_tokens] == [IGNORE_INDEX] * proc.num_image_tokens


def test_text_only_sample(proc):
    ds = SupervisedDataset([rec("t1", [], "Say red.", "red")], proc, "chatml")
    item = ds[0]
    assert item["pixel_values"].shape == (0, 3, 32, 32)
    assert proc.image_token_id not in item["input_ids"].tolist()
    assert Collator(proc.tokenizer.pad_token_id)([item])["pixel_values"].shape == (0, 3, 32, 32)


# -- refused samples -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record,reason",
    [
        (
            {"id": "only-human", "images": [], "conversations": [{"from": "human", "value": "hi"}]},
            "no_assistant_turn",
        ),
        (rec("empty-gpt", [], "hi", ""), "empty_answer"),
        (rec("two-markers", ["x.png"], "<image><image>\nhi", "red"), "image_count_mismatch"),
        (rec("no-marker", ["x.png", "y.png"], "<image>\nhi", "red"), "image_count_mismatch"),
        (
            {"id": "bad-role", "images": [], "conversations": [{"from": "narrator", "value": "x"}]},
            "bad_record",
        ),
    ],
)
@pytest.mark.parametrize("template", ["chatml", "plain"])
def test_bad_samples_raise_naming_the_id(proc, record, reason, template):
    with pytest.raises(SampleError, match=f"sample '{record['id']}': {reason}") as e:
        encode_conversation(record, proc, template, max_length=512)
    assert e.value.sample_id == record["id"] and e.value.reason == reason


def _patch_template(monkeypatch, jinja):
    monkeypatch.setattr(
        samples_mod, "get_template", lambda name: ChatTemplate(name, jinja, ("</s>",), "test")
    )


def test_empty_template_mask_is_an_error(proc, monkeypatch):
    # A template without {% generation %} gives an all-zero mask: LLaVA would train on nothing, silently.
    _patch_template(monkeypatch, "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(SampleError, match="sample 'r1': empty_mask"):
        encode_conversation(rec("r1", [], "hi", "red"), proc, "x", max_length=None)


def test_span_cutting_through_a_token_is_misaligned(proc, monkeypatch):
    # The span starts inside the token "red": HF's mask would include the whole token; we refuse.
    assert len(proc.tokenizer("red")["input_ids"]) == 1
    _patch_template(
        monkeypatch,
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'][:1] }}"
        "{% generation %}{{ m['content'][1:] }}{% endgeneration %}{% endif %}{% endfor %}",
    )
    with pytest.raises(SampleError, match="sample 'r1': misaligned_mask: token .* straddles"):
        encode_conversation(rec("r1", [], "hi", "red"), proc, "x", max_length=None)


def test_too_long_is_refused_never_truncated(proc, imgs):
    good = rec("short", [imgs["red"]], "<image>\nhi", "red")
    long = rec("long", [imgs["red"]], "<image>\nhi", "red " * 40)
    limit = encode_conversation(good, proc, "chatml", None).n_tokens
    with pytest.raises(SampleError, match=f"sample 'long': too_long: .* > max_length {limit}"):
        SupervisedDataset([good, long], proc, "chatml", max_length=limit)
    ds = SupervisedDataset([good, long], proc, "chatml", max_length=limit, on_error="skip")
    assert ds.ids == ["short"] and ds.lengths == [limit]
    assert ds.skipped == Counter(too_long=1) and ds.skipped_ids == {"too_long": ["long"]}
    assert ds.skip_report() == {"too_long": 1}


# -- images --------------------------------------------------------------------------------------------------


def test_load_images(proc, imgs):
    pv = load_images([imgs["red"], imgs["blue"]], proc.image_processor, "r")
    assert pv.shape == (2, 3, 32, 32) and pv.dtype == torch.float32
    assert not torch.equal(pv[0], pv[1])
    with pytest.raises(
        SampleError, match=f"sample 'r': missing_image: image file not found: {imgs['missing']}"
    ):
        load_images([imgs["red"], imgs["missing"]], proc.image_processor, "r")
    with pytest.raises(SampleError, match=f"sample 'r': corrupt_image: cannot decode {imgs['corrupt']}"):
        load_images([imgs["corrupt"]], proc.image_processor, "r")


def test_missing_image_at_construction_raises_or_counts(proc, imgs):
    records = [
        rec("ok", [imgs["red"]], "<image>\nhi", "red"),
        rec("gone", [imgs["missing"]], "<image>\nhi", "red"),
    ]
    with pytest.raises(SampleError, match=f"sample 'gone': missing_image: .*{imgs['missing']}"):
        SupervisedDataset(records, proc, "chatml")
    ds = SupervisedDataset(records, proc, "chatml", on_error="skip")
    assert ds.ids == ["ok"] and ds.skipped_ids == {"missing_image": ["gone"]}


@pytest.mark.parametrize("bad", ["missing", "corrupt"])
def test_bad_image_at_load_time_raises_or_is_dropped_and_counted(proc, imgs, bad):
    records = [rec("ok", [imgs["red"]], "<image>\nhi", "red"), rec("bad", [imgs[bad]], "<image>\nhi", "red")]
    reason = f"{bad}_image"
    strict = SupervisedDataset(records, proc, "chatml", check_images=False)
    with pytest.raises(SampleError, match=f"sample 'bad': {reason}: .*{imgs[bad]}"):
        strict[1]
    lenient = SupervisedDataset(records, proc, "chatml", on_error="skip", check_images=False)
    items = [lenient[0], lenient[1]]
    assert items[1] == SkippedSample("bad", reason, items[1].detail) and imgs[bad] in items[1].detail
    for collate in (Collator(0), PackingCollator(0, max_length=512)):
        batch = collate(items)
        assert batch["ids"] == ["ok"] and batch["skipped"] == [("bad", reason)]
        assert batch["input_ids"].shape[0] == 1 and batch["pixel_values"].shape[0] == 1
        assert collate([items[1], None]) is None
    assert lenient.load_skipped == Counter({reason: 1}) and lenient.skip_report() == {reason: 1}


def test_skips_reach_the_trainer_through_worker_processes(proc, imgs):
    records = [rec(f"ok{i}", [imgs["red"]], "<image>\nhi", "red") for i in range(3)]
    records.insert(1, rec("bad", [imgs["corrupt"]], "<image>\nhi", "red"))
    ds = SupervisedDataset(records, proc, "chatml", on_error="skip")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=Collator(0))
    batches = list(loader)
    assert [b["ids"] for b in batches] == [["ok0"], ["ok1", "ok2"]]
    assert [s for b in batches for s in b["skipped"]] == [("bad", "corrupt_image")]
    assert ds.load_skipped == Counter()  # the worker's copy counted it, not this one
    assert set(model_inputs(batches[0])) == {"input_ids", "attention_mask", "labels", "pixel_values"}


def test_llava_jsonl_through_datasets(proc, tmp_path, imgs):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (16, 16), "red").save(tmp_path / "sub" / "a.png")
    lines = [
        {
            "id": 7,
            "image": "sub/a.png",
            "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "red"}],
        },
        {"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    ds = SupervisedDataset(load_llava_dataset(path), proc, "chatml", max_length=128)
    assert ds.ids == ["7", "t"]
    assert ds[0]["pixel_values"].shape[0] == 1 and ds[1]["pixel_values"].shape[0] == 0


def test_encoding_is_deterministic_and_lengths_match(proc, imgs):
    records = [rec(f"r{i}", [imgs["red"]], "<image>\nhi", "red " * i + "end") for i in range(1, 6)]
    a = SupervisedDataset(records, proc, "chatml")
    b = SupervisedDataset(records, proc, "chatml")
    for i in range(len(a)):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"]) and torch.equal(
            a[i]["labels"], b[i]["labels"]
        )
        assert a.lengths[i] == len(a[i]["input_ids"])


# -- mixing --------------------------------------------------------------------------------------------------


class _Sized(torch.utils.data.Dataset):
    def __init__(self, name, n):
        self.name, self.lengths = name, list(range(1, n + 1))

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return (self.name, i)


def test_mix_weights_give_exact_proportions_deterministically():
    a, b, c = _Sized("a", 10), _Sized("b", 100), _Sized("c", 7)
    mixed = mix_datasets([a, b, c], [2.0, 1.0, 1.0], seed=3, total=400)
    names = Counter(mixed[k][0] for k in range(len(mixed)))
    assert len(mixed) == 400 and names == {"a": 200, "b": 100, "c": 100}
    per_sample = Counter(mixed[k] for k in range(len(mixed)) if mixed[k][0] == "a")
    assert set(per_sample.values()) == {20}  # 200 picks of 10 samples: exactly 20 each
    per_sample = Counter(mixed[k] for k in range(len(mixed)) if mixed[k][0] == "c")
    assert set(per_sample.values()) <= {14, 15}  # floor/ceil of 100 / 7
    again = mix_datasets([a, b, c], [2.0, 1.0, 1.0], seed=3, total=400)
    assert [again[k] for k in range(400)] == [mixed[k] for k in range(400)]
    other = mix_datasets([a, b, c], [2.0, 1.0, 1.0], seed=4, total=400)
    assert [other[k] for k in range(400)] != [mixed[k] for k in range(400)]
    assert mixed.lengths == [
        mixed.datasets[s].lengths[j] for s, j in zip(mixed.sources, mixed.indices, strict=True)
    ]
    assert len(mix_datasets([a, b], [1, 1], seed=0)) == 110  # default total: the summed sizes
    with pytest.raises(ValueError, match="empty dataset"):
        mix_datasets([a, _Sized("e", 0)], [1, 1], seed=0)


# -- samplers ------------------------------------------------------------------------------------------------

LENGTHS = [int(x) for x in np.random.default_rng(0).integers(5, 200, size=103)]


def _samplers(kind, world_size=1, rank=0, batch_size=4, seed=1):
    if kind == "grouped":
        return LengthGroupedSampler(LENGTHS, batch_size, seed, world_size, rank, megabatch_mult=4)
    return DistributedShuffleSampler(len(LENGTHS), batch_size, seed, world_size, rank)


@pytest.mark.parametrize("kind", ["grouped", "shuffle"])
def test_sampler_is_deterministic_per_seed_and_epoch(kind):
    s = _samplers(kind)
    first = list(s)
    assert first == list(_samplers(kind)) and sorted(set(first)) == list(range(len(LENGTHS)))
    s.set_epoch(1)
    assert list(s) != first and sorted(set(s)) == list(range(len(LENGTHS)))
    assert list(_samplers(kind, seed=2)) != first


@pytest.mark.parametrize("kind", ["grouped", "shuffle"])
def test_sampler_resume_continues_the_uninterrupted_sequence(kind):
    full = _samplers(kind)
    full.set_epoch(2)
    expected = list(full)
    run = _samplers(kind)
    run.set_epoch(2)
    it = iter(run)
    consumed = [next(it) for _ in range(37)]
    state = run.state_dict()
    assert state["position"] == 37 and consumed == expected[:37]

    resumed = _samplers(kind)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    resumed.set_epoch(2)  # the trainer's usual call keeps the loaded position
    assert len(resumed) == len(expected) - 37
    assert list(resumed) == expected[37:]
    assert list(resumed) == expected  # the resume offset applies once
    skipping = _samplers(kind)
    skipping.set_epoch(2)
    skipping.skip(37)
    assert list(skipping) == expected[37:]
    with pytest.raises(ValueError, match="world_size: saved 1, now 2"):
        _samplers(kind, world_size=2).load_state_dict(state)


@pytest.mark.parametrize("kind", ["grouped", "shuffle"])
def test_rank_shards_are_equal_disjoint_and_complete(kind):
    shards = [list(_samplers(kind, world_size=3, rank=r)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # equal step counts on every rank
    union = Counter(i for s in shards for i in s)
    assert set(union) == set(range(len(LENGTHS)))
    assert sum(union.values()) - len(LENGTHS) < 3 * 4  # only wrap-around padding repeats
    even = [list(_samplers(kind, world_size=2, rank=r, batch_size=4)) for r in range(2)]
    even_n = 96  # a multiple of the global batch: no padding, so the shards are disjoint and complete
    trimmed = [DistributedShuffleSampler(even_n, 4, 1, 2, r) for r in range(2)]
    a, b = (list(t) for t in trimmed)
    assert not set(a) & set(b) and sorted(a + b) == list(range(even_n))
    # Same global batches for 1 x 8 and 2 x 4: data parallelism sees the data a single process would.
    single = list(_samplers(kind, world_size=1, batch_size=8))
    for g in range(len(single) // 8):
        assert sorted(single[8 * g : 8 * g + 8]) == sorted(
            even[0][4 * g : 4 * g + 4] + even[1][4 * g : 4 * g + 4]
        )


def test_length_grouping_reduces_padding():
    grouped = [LENGTHS[i] for i in _samplers("grouped")]
    shuffled = [LENGTHS[i] for i in _samplers("shuffle")]
    assert padding_fraction(grouped, 4, False, 256) < 0.5 * padding_fraction(shuffled, 4, False, 256)
    assert max(grouped[:4]) == max(LENGTHS)  # the longest batch goes first


# -- collators and packing -----------------------------------------------------------------------------------


def _fake(sid, ids, labels, n_images=0):
    return {
        "id": sid,
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "pixel_values": torch.full((n_images, 3, 2, 2), float(len(ids))),
    }


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_either_side(side):
    a, b = _fake("a", [5, 6, 7], [-100, 6, 7], 1), _fake("b", [8], [8], 2)
    batch = Collator(pad_token_id=0, padding_side=side, pad_to_multiple_of=4)([a, b])
    if side == "right":
        assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
        assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    else:
        assert batch["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
        assert batch["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 8]]
        assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [3, 1, 1] and batch["ids"] == ["a", "b"]


def test_pack_layout_positions_mask_and_boundary_labels():
    a, b, c = (
        _fake("a", [1, 2, 3], [1, 2, 3], 1),
        _fake("b", [4, 5], [4, 5], 1),
        _fake("c", [6, 7, 8, 9], [6, 7, 8, 9]),
    )
    assert pack_samples([3, 2, 4], 6) == [[2, 1], [0]]
    batch = PackingCollator(pad_token_id=0, max_length=6)([a, b, c])
    assert batch["ids"] == ["c", "b", "a"] and batch["n_samples"] == 3
    assert batch["input_ids"].tolist() == [[6, 7, 8, 9, 4, 5], [1, 2, 3, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    # each sample's first label is ignored, so no token is trained to predict across a boundary
    assert batch["labels"].tolist() == [[-100, 7, 8, 9, -100, 5], [-100, 2, 3, -100, -100, -100]]
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    assert not mask[0, 0, 4:, :4].any() and mask[0, 0, 5, 4] and not mask[0, 0, 4, 5]
    assert mask[1, 0].diagonal().all()  # padding rows attend to themselves: no all-masked row
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [2, 3]  # b's image, then a's: placeholder order
    f = PackingCollator(0, 6, mask="float")([a, b, c])["attention_mask"]
    assert f.dtype == torch.float32 and torch.equal(f == 0, mask)
    assert "attention_mask" not in PackingCollator(0, 6, mask="none")([a, b, c])


def test_padding_fraction_matches_the_collators():
    lengths = [3, 2, 4, 5, 1, 6, 2]
    items = [_fake(str(i), list(range(1, n + 1)), list(range(1, n + 1))) for i, n in enumerate(lengths)]
    for pack, collate in ((False, Collator(0)), (True, PackingCollator(0, 8))):
        real = padded = 0
        for s in range(0, len(items), 3):
            batch = collate(items[s : s + 3])
            real += sum(lengths[s : s + 3])
            padded += batch["input_ids"].numel()
        assert padding_fraction(lengths, 3, pack, 8) == pytest.approx(1 - real / padded)
    assert padding_fraction(lengths, 3, True, 8) < padding_fraction(lengths, 3, False, 8)


@pytest.mark.parametrize("llm", ["llama", "qwen2"])
def test_packed_loss_equals_unpacked_loss(build, imgs, llm):
    model, proc = build("clip", llm, "mlp")
    records = [
        rec("a", [imgs["red"]], "<image>\nWhich colour?", "red", "Which shape?", "circle"),
        rec("b", [imgs["blue"]], "<image>\nCaption this image.", "a large blue square at the top left."),
        rec("c", [], "Say green.", "green"),
        rec("d", [imgs["green"]], "<image>\nCount the shapes.", "2"),
        rec("e", [imgs["black"]], "<image>\nWhat is shown?", "a small black triangle at the bottom right."),
    ]
    ds = SupervisedDataset(records, proc, "chatml")
    items = [ds[i] for i in range(len(ds))]
    pad = proc.tokenizer.pad_token_id
    unpacked = Collator(pad)(items)
    with torch.no_grad():
        ref = model(
            **{k: unpacked[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
        ).loss
        # The reference is the mean over supervised tokens of each sample on its own, too.
        total = count = 0.0
        for item in items:
            one = Collator(pad)([item])
            out = model(**{k: one[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")})
            n = int((one["labels"][:, 1:] != IGNORE_INDEX).sum())
            total, count = total + float(out.loss) * n, count + n
        assert float(ref) == pytest.approx(total / count, abs=1e-5)

        max_length = 2 * max(ds.lengths)
        keys = ("input_ids", "attention_mask", "position_ids", "labels", "pixel_values")
        packed = PackingCollator(pad, max_length)(items)
        assert packed["input_ids"].shape[0] < len(items)  # really packed
        loss = model(**{k: packed[k] for k in keys}).loss
        assert float(loss) == pytest.approx(float(ref), abs=1e-5)
        # position_ids alone (flash-attention style): transformers derives the same mask, with use_cache off
        none = PackingCollator(pad, max_length, mask="none")(items)
        loss = model(**{k: none[k] for k in keys if k in none}, use_cache=False).loss
        assert float(loss) == pytest.approx(float(ref), abs=1e-5)
        # the eager path needs the additive mask
        lm_config = model.language_model.config
        saved = lm_config._attn_implementation
        try:
            lm_config._attn_implementation = "eager"
            additive = PackingCollator(pad, max_length, mask="float")(items)
            loss = model(**{k: additive[k] for k in keys}).loss
            assert float(loss) == pytest.approx(float(ref), abs=1e-5)
            # eager adds the mask to the scores: a bool mask there is silently wrong (proves eager is live)
            assert abs(float(model(**{k: packed[k] for k in keys}).loss) - float(ref)) > 1e-4
        finally:
            lm_config._attn_implementation = saved
        # sanity: a plain causal mask over the packed row leaks across samples and changes the loss
        leaky = dict(packed, attention_mask=torch.ones_like(packed["input_ids"]))
        assert abs(float(model(**{k: leaky[k] for k in keys}).loss) - float(ref)) > 1e-3


@functools.cache
def _anyres_model():
    from vlm.build import build_base_model

    model, processor = build_base_model("clip", "llama", "mlp", image_policy={"type": "anyres", "pool": 1})
    return model.eval(), processor


def _noise(path, size, seed) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("policy", ["single", "anyres"])
def test_packing_multi_image_samples_keeps_each_image_with_its_sample(build, tmp_path, policy):
    """Samples with 4, 2, 1 and no images packed together: each sample's placeholder runs lie in its own segment,
    one per image with that image's count; pixel_values (and under anyres image_sizes) follow the placeholder
    order; nothing attends across samples; and the packed loss is the unpacked one. Exchanging the images of two
    samples changes the loss, so that check would see an image feeding another sample's placeholders."""
    model, proc = build("clip", "llama", "mlp") if policy == "single" else _anyres_model()
    sizes = [(64, 64), (40, 30), (32, 96), (48, 64)]  # mixed: under anyres each lays out another grid
    seed = iter(range(100))

    def images(*picks):  # every image its own noise, so no two samples share a picture
        return [_noise(tmp_path / f"{n}.png", sizes[k], n) for k, n in zip(picks, seed, strict=False)]

    four = "<image>\n" * 4 + "Which image has the most shapes?"
    records = [
        rec("four", images(0, 1, 2, 3), four, "third"),
        rec("two", images(1, 2), "<image>\n<image>\nAre the shapes in both images the same colour?", "no"),
        rec("one", images(3), "<image>\nWhat colour is shown?", "red"),
        rec("text", [], "Say green.", "green"),
        rec("two-b", images(1, 2), "<image>\n<image>\nWhich image shows a red circle?", "second"),
    ]
    ds = SupervisedDataset(records, proc, "chatml", max_length=2048)
    items = [ds[i] for i in range(len(ds))]
    pad, image_id = proc.tokenizer.pad_token_id, proc.image_token_id
    max_length = 2 * max(ds.lengths)
    packed = PackingCollator(pad, max_length)(items)
    rows = pack_samples([len(i["input_ids"]) for i in items], max_length)
    assert len(rows) < len(items) and any(len(r) >= 3 for r in rows)  # really packed, multi-image rows mixed

    order = [i for row in rows for i in row]
    assert packed["ids"] == [records[i]["id"] for i in order]
    runs_seen = []
    for r, row in enumerate(rows):
        at, segment = 0, torch.full((packed["input_ids"].shape[1],), -1)
        for i in row:
            k = len(items[i]["input_ids"])
            span = packed["input_ids"][r, at : at + k]
            assert torch.equal(
                span, items[i]["input_ids"]
            )  # the sample's tokens, placeholders included, in place
            flags = (span == image_id).int().tolist()
            runs = [sum(1 for _ in g) for v, g in itertools.groupby(flags) if v]  # placeholder run lengths
            counts = [proc.image_token_count(*Image.open(p).size) for p in records[i]["images"]]
            assert runs == counts, records[i]["id"]  # one run per image, in the record's image order
            runs_seen += runs
            segment[at : at + k] = i
            at += k
        mask = packed["attention_mask"][r, 0]
        real = segment >= 0
        cross = (segment[:, None] != segment[None, :]) & real[:, None] & real[None, :]
        assert not mask[cross].any()  # no query of one sample sees a key of another
        assert mask[(segment[:, None] == segment[None, :]) & real[:, None]].sum() > 0
    assert sum(runs_seen) == int((packed["input_ids"] == image_id).sum())

    # Pixels follow the placeholders: the packed order of the samples, each sample's images in record order.
    expected = [proc.process_images([Image.open(p).convert("RGB") for p in records[i]["images"]], return_tensors="pt")
                for i in order if records[i]["images"]]  # fmt: skip
    assert torch.equal(packed["pixel_values"], torch.cat([e["pixel_values"].float() for e in expected]))
    if policy == "anyres":
        hw = [[h, w] for i in order for w, h in (Image.open(p).size for p in records[i]["images"])]
        assert packed["image_sizes"].tolist() == hw

    with torch.no_grad():
        total = count = 0.0
        for item in items:
            one = Collator(pad)([item])
            n = int((one["labels"][:, 1:] != IGNORE_INDEX).sum())
            total, count = total + float(model(**model_inputs(one), use_cache=False).loss) * n, count + n
        loss = float(model(**model_inputs(packed), use_cache=False).loss)
        assert loss == pytest.approx(total / count, abs=1e-5)
        # "two" and "two-b" have images of the same sizes: exchanging them keeps the layout valid, not the loss.
        a, b = (dict(items[i]) for i in (1, 4))
        a["pixel_values"], b["pixel_values"] = items[4]["pixel_values"], items[1]["pixel_values"]
        swapped = PackingCollator(pad, max_length)([items[0], a, items[2], items[3], b])
        assert abs(float(model(**model_inputs(swapped), use_cache=False).loss) - loss) > 1e-4


@pytest.mark.parametrize("pack", [False, True])
def test_per_source_losses_come_from_the_batch_and_average_to_the_loss(build, imgs, pack):
    """Each sample's source travels mixed dataset -> collate (token_sources) -> the per-source token means,
    which are each source's loss on its own and, weighted by tokens, the training loss."""
    from vlm.train.source_loss import source_means, source_token_sums

    model, proc = build("clip", "llama", "mlp")
    vqa = SupervisedDataset(
        [
            rec("q1", [imgs["red"]], "<image>\nWhich colour?", "red"),
            rec("q2", [imgs["blue"]], "<image>\nCount the shapes.", "2"),
        ],
        proc,
        "chatml",
    )
    caps = SupervisedDataset(
        [rec("c1", [imgs["green"]], "<image>\nCaption this image.", "a large green square at the top left.")],
        proc,
        "chatml",
    )
    mixed = mix_datasets([vqa, caps], [1.0, 1.0], seed=0, total=4)
    items = [mixed[k] for k in range(len(mixed))]
    assert [i["source"] for i in items] == list(mixed.sources)
    pad = proc.tokenizer.pad_token_id
    collate = PackingCollator(pad, 2 * max(mixed.lengths)) if pack else Collator(pad)
    batch = collate(items)
    assert "token_sources" not in model_inputs(batch)
    assert set(batch["token_sources"].unique().tolist()) - {-1} == {0, 1}  # -1: padding
    with torch.no_grad():
        out = model(**model_inputs(batch), use_cache=False)
        sums = source_token_sums(out, batch["labels"], batch["token_sources"], 2)
        means = source_means(sums, ["vqa", "caption"])
        assert float(sums[0].sum() / sums[1].sum()) == pytest.approx(float(out.loss), abs=1e-5)
        for s, name in enumerate(["vqa", "caption"]):
            alone = Collator(pad)([i for i in items if i["source"] == s])
            assert means[name] == pytest.approx(float(model(**model_inputs(alone)).loss), abs=1e-5)
    assert source_means(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), ["a", "b"]) == {"a": 0.5}


def test_source_ema_starts_at_the_first_value_and_skips_absent_sources():
    from vlm.train.source_loss import SourceEMA

    ema = SourceEMA(decay=0.5)
    assert ema.update({"a": 4.0}) == {"a": 4.0}
    assert ema.update({"a": 2.0, "b": 1.0}) == {"a": 3.0, "b": 1.0}
    assert ema.update({"b": 3.0}) == {"a": 3.0, "b": 2.0}
