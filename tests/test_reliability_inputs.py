"""Data and config input fuzzing (hypothesis): every LLaVA record is accepted or refused with a message naming
it, nothing is dropped silently on the way to training samples, and every recipe is loaded or refused with a
RecipeError (never a KeyError/AttributeError/YAML traceback).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm.data.records import load_llava_dataset, validate_record
from vlm.data.samples import SampleError, SupervisedDataset
from vlm.train.recipe import Recipe, RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))

# -- records -------------------------------------------------------------------------------------------------

roles = st.sampled_from(["human", "gpt", "user", "assistant", "system", "bot", "", "GPT"]) | st.integers()
texts = st.sampled_from(["<image>\nWhat colour is it?", "red", "<image><image>", "", "  ", "a <image> b"])
values = texts | st.text(max_size=30) | st.integers() | st.none() | st.lists(st.text(max_size=3), max_size=2)
turns = st.fixed_dictionaries({"from": roles, "value": values}) | st.dictionaries(
    st.sampled_from(["from", "value", "extra"]), values, max_size=3
)
any_turn = turns | st.text(max_size=5) | st.none() | st.integers()
images = (
    st.none()
    | st.sampled_from(["ok.png", "missing.png", "corrupt.png", "", "sub/../ok.png"])
    | st.lists(st.sampled_from(["ok.png", "missing.png", "corrupt.png", ""]), max_size=3)
    | st.integers()
)
ids = st.none() | st.text(max_size=8) | st.integers()


def good_record(rid: int, n_turns: int, image: bool) -> dict:
    convs = []
    for t in range(n_turns):
        question = ("<image>\n" if image and t == 0 else "") + f"question {t}"
        convs += [{"from": "human", "value": question}, {"from": "gpt", "value": f"answer {t}"}]
    return {"id": f"good-{rid}", **({"image": "ok.png"} if image else {}), "conversations": convs}


records = st.one_of(
    st.builds(good_record, st.integers(0, 10**6), st.integers(1, 3), st.booleans()),
    st.fixed_dictionaries(
        {"id": ids, "image": images, "conversations": st.lists(any_turn, max_size=5) | values},
        optional={"extra": values},
    ),
    st.dictionaries(st.sampled_from(["id", "image", "conversations"]), values, max_size=3),
    values,
)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (32, 32), (255, 0, 0)).save(root / "ok.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (root / "sub").mkdir()
    return root


@pytest.fixture(scope="module")
def processor(build):
    return build("clip", "llama", "mlp")[1]


@FAST
@given(records, st.integers(1, 10_000))
def test_every_record_is_accepted_or_refused_with_messages_naming_it(image_root, record, line_no):
    problems = validate_record(record, image_root, line_no=line_no)
    rid = record.get("id") if isinstance(record, dict) else None
    name = f"record {rid!r}" if rid not in (None, "") else f"record at line {line_no}"
    assert all(p.startswith(name + ": ") for p in problems), problems


def _accounted(dataset_rows, processor) -> tuple[list, dict]:
    """Encode rows one by one in raise mode: (ids encoded, {id: SampleError message})."""
    encoded, refused = [], {}
    for row in dataset_rows:
        try:
            SupervisedDataset([row], processor, "chatml", max_length=256, on_error="raise")
            encoded.append(row["id"])
        except SampleError as err:
            assert err.sample_id == row["id"] and str(row["id"]) in str(err)
            refused[row["id"]] = str(err)
    return encoded, refused


@SLOW
@given(st.lists(records, min_size=1, max_size=8))
@example(
    [{"id": None, "image": -9223372036854775809, "conversations": None}]
)  # ujson's limit (found by fuzzing)
def test_no_record_is_dropped_silently_on_the_way_to_samples(image_root, processor, tmp_path_factory, recs):
    """File -> datasets -> encoded samples: each record is a sample, or an error that names it."""
    recs = [r if not isinstance(r, dict) else {**r, "id": f"r{i}"} for i, r in enumerate(recs)]
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    try:
        rows = list(load_llava_dataset(path, image_root=image_root))
    except ValueError as err:  # a record datasets cannot take as a conversation: named in the error
        bad = [r for r in recs if not _normalisable(r)]
        assert bad and any(_named(r, i, str(err)) for i, r in enumerate(recs) if r in bad), str(err)
        return
    assert len(rows) == len(recs)  # one row per line, none dropped
    encoded, refused = _accounted(rows, processor)
    assert len(encoded) + len(refused) == len(rows)
    skip = SupervisedDataset(rows, processor, "chatml", max_length=256, on_error="skip")
    assert skip.ids == encoded and sum(skip.skipped.values()) == len(refused)


def _normalisable(record) -> bool:
    convs = record.get("conversations") if isinstance(record, dict) else None
    turns_ok = isinstance(convs, list) and all(
        isinstance(t, dict) and {"from", "value"} <= t.keys() for t in convs
    )
    return turns_ok and isinstance(record.get("image"), (str, list, type(None)))


def _named(record, index: int, message: str) -> bool:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"record {rid!r}" in message or f".jsonl:{index + 1}:" in message


# -- recipes -------------------------------------------------------------------------------------------------

FIELDS = [f for f in Recipe.__dataclass_fields__]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(
        ["1e-3", "nan", "inf", "-1", "cosine", "bf16", "skip", "connector", "stages/zero2.json"]
    )
)
yaml_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
)
keys = st.sampled_from(FIELDS + ["lora.r", "lora.alpha", "lora.dropout", "lora.bogus", "data.path", "lr.x"])


def base_values(tmp) -> dict:
    return yaml.safe_load((ROOT / "stages" / "stage2.yaml").read_text()) | {
        "model": str(tmp),
        "output_dir": str(tmp / "out"),
        "data": [str(tmp / "d.jsonl")],
    }


def _loads_or_refuses(path: Path, overrides: list[str]) -> None:
    try:
        recipe = load_recipe(path, overrides)
    except RecipeError as err:
        assert str(err).startswith(str(path)) or "override" in str(err), str(err)
        assert "Traceback" not in str(err)
        return
    assert isinstance(recipe, Recipe)


@FAST
@given(st.dictionaries(keys.filter(lambda k: "." not in k) | st.text(max_size=8), yaml_values, max_size=4))
def test_any_recipe_file_loads_or_gives_a_recipe_error(tmp_path_factory, changes):
    tmp = tmp_path_factory.mktemp("recipe")
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(base_values(tmp) | changes, allow_unicode=True))
    _loads_or_refuses(path, [])


@FAST
@given(st.lists(st.tuples(keys | st.text(max_size=8), st.text(max_size=20)), max_size=4))
def test_any_override_loads_or_gives_a_recipe_error(tmp_path_factory, pairs):
    tmp = tmp_path_factory.mktemp("recipe")
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(base_values(tmp)))
    _loads_or_refuses(path, [f"{k}={v}" for k, v in pairs])


@FAST
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_recipe_bytes_load_or_give_a_recipe_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_bytes(raw)
    _loads_or_refuses(path, [])


@pytest.mark.parametrize(
    "override, message",
    [
        ("lr=.nan", "lr: expected a finite number"),
        ("lr=nan", "lr: expected a finite number"),
        ("warmup_ratio=.inf", "warmup_ratio: expected a finite number"),
        ("gradient_clipping=-1", "gradient_clipping and weight_decay must be >= 0"),
        ("lr=[1", "override 'lr=[1': not valid YAML"),
        ("data=[{path: x, weight: .nan}]", "data[0].weight: expected a finite number"),
    ],
)
def test_out_of_range_and_malformed_values_are_named(tmp_path, override, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base_values(tmp_path)))
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_recipe(path, [override])
