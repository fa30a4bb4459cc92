"""Stage 0: the two contrastive losses against their formulas, the rank gather, the dual-encoder checkpoint as a
`vlm init --tower`, zero-shot ensembling/abstention, FAISS retrieval, bad input, the embeddings server and one
short run through the deepspeed launcher."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlm.contrastive.embed import Encoder
from vlm.contrastive.losses import MAX_LOGIT_SCALE, contrastive_loss, infonce_loss, sigmoid_loss
from vlm.contrastive.model import ContrastiveMeta, build_dual_encoder, save_dual_encoder
from vlm.contrastive.retrieval import build_index, modality_gap, recall_at_k, search
from vlm.contrastive.zeroshot import Abstention, class_embeddings, classify, predict, read_lines

ROOT = Path(__file__).resolve().parents[1]


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(
        torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1
    )


# -- losses -------------------------------------------------------------------------------------------------
def infonce_reference(img, txt, log_scale):
    t = math.exp(min(log_scale, math.log(100)))
    sims = (img @ txt.T).tolist()
    n = len(sims)
    i2t = (
        -sum(t * sims[i][i] - math.log(sum(math.exp(t * sims[i][j]) for j in range(n))) for i in range(n)) / n
    )
    t2i = (
        -sum(t * sims[j][j] - math.log(sum(math.exp(t * sims[i][j]) for i in range(n))) for j in range(n)) / n
    )
    return (i2t + t2i) / 2


@pytest.mark.parametrize("log_scale", [math.log(1 / 0.07), 1.0, 10.0])  # 10 > ln 100: clamped
def test_infonce_matches_its_formula(log_scale):
    img, txt = unit(5, 8, 0), unit(5, 8, 1)
    got = infonce_loss(img, txt, torch.tensor(log_scale, dtype=torch.float64))
    assert got.item() == pytest.approx(infonce_reference(img, txt, log_scale), rel=1e-10)


def test_infonce_temperature_clamp_stops_the_gradient():
    img, txt = unit(4, 8, 2), unit(4, 8, 3)
    above = torch.tensor(MAX_LOGIT_SCALE + 0.5, dtype=torch.float64, requires_grad=True)
    infonce_loss(img, txt, above).backward()
    assert above.grad.item() == 0.0
    below = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    infonce_loss(img, txt, below).backward()
    assert below.grad.item() != 0.0
    # the cap is exactly a multiplier of 100
    same = infonce_loss(img, txt, torch.tensor(math.log(100.0), dtype=torch.float64))
    assert infonce_loss(img, txt, torch.tensor(7.0, dtype=torch.float64)).item() == pytest.approx(same.item())


def test_sigmoid_loss_matches_its_formula():
    img, txt = unit(6, 8, 4), unit(6, 8, 5)
    t, b = math.log(10.0), -10.0
    sims = (img @ txt.T).tolist()
    ref = 0.0
    for i in range(6):
        for j in range(6):
            z = 1.0 if i == j else -1.0
            ref -= math.log(1 / (1 + math.exp(-z * (math.exp(t) * sims[i][j] + b))))
    got = sigmoid_loss(
        img, txt, torch.tensor([t], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    )
    assert got.item() == pytest.approx(ref / 6, rel=1e-10)


def test_loss_kind_errors():
    img = unit(2, 4, 6)
    with pytest.raises(ValueError, match="logit_bias"):
        contrastive_loss("sigmoid", img, img, torch.tensor(0.0))
    with pytest.raises(ValueError, match="unknown contrastive loss"):
        contrastive_loss("triplet", img, img, torch.tensor(0.0))
    with pytest.raises(ValueError, match="siglip"):
        ContrastiveMeta("clip", "sigmoid")


def _grads(kind: str, rank: int = 0, world: int = 1) -> tuple[float, list]:
    """Loss and parameter gradients of a linear "tower" on this rank's half of an 8-pair batch."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(6, 4).double()
    scale, bias = (
        torch.nn.Parameter(torch.tensor([1.5]).double()),
        torch.nn.Parameter(torch.tensor([-2.0]).double()),
    )
    x, y = unit(8, 6, 7), unit(8, 6, 8)
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    loss = contrastive_loss(
        kind, F.normalize(proj(x[rows]), dim=-1), F.normalize(proj(y[rows]), dim=-1), scale, bias
    )
    loss.backward()
    return loss.item(), [
        torch.zeros_like(p) if p.grad is None else p.grad for p in (*proj.parameters(), scale, bias)
    ]


def _rank_worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        out = {}
        for kind in ("infonce", "sigmoid"):
            loss, grads = _grads(kind, rank, 2)
            for g in grads:  # what DeepSpeed does with data-parallel gradients: the mean over ranks
                dist.all_reduce(g)
                g /= 2
            out[kind] = (loss, [g.tolist() for g in grads])
        dist.destroy_process_group()
    except Exception as err:  # report instead of leaving the parent waiting
        out = f"rank {rank}: {type(err).__name__}: {err}"
    if rank == 0 or isinstance(out, str):
        queue.put(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_compute_the_global_batch_loss_and_gradient():
    # spawn, not fork: forking a process whose earlier tests started OpenMP/gloo threads can deadlock the child.
    ctx = torch.multiprocessing.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_rank_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        two = queue.get(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert not isinstance(two, str), two
    for kind in ("infonce", "sigmoid"):
        loss, grads = _grads(kind)  # one process, the whole batch
        assert two[kind][0] == pytest.approx(loss, rel=1e-12)
        for g2, g1 in zip(two[kind][1], grads, strict=True):
            np.testing.assert_allclose(g2, g1.numpy(), rtol=1e-10, atol=1e-14)


# -- checkpoints, zero-shot, retrieval ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage0") / "clip"
    model, tokenizer, processor = build_dual_encoder("clip", "infonce", seed=0)
    return save_dual_encoder(model, tokenizer, processor, out)


@pytest.fixture(scope="module")
def encoder(ckpt):
    return Encoder(ckpt)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    colours = [(255, 0, 0), (0, 0, 255), (0, 200, 0)]
    paths = []
    for i, c in enumerate(colours):
        paths.append(root / f"{i}.png")
        Image.new("RGB", (32 + 16 * i, 32 + 16 * i), c).save(paths[-1])
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    return root, paths


def test_trained_vision_half_is_a_vlm_init_tower(ckpt):
    from vlm.build import build_base_model

    vlm, processor = build_base_model(str(ckpt), "llama", "mlp")
    dual = Encoder(ckpt).model.hf.vision_model.state_dict()
    tower = vlm.vision_tower.state_dict()
    tower = {k.removeprefix("vision_model."): v for k, v in tower.items()}
    assert dual.keys() <= tower.keys()
    for k, v in dual.items():
        torch.testing.assert_close(tower[k], v, rtol=0, atol=0)
    assert vlm.config.vision_config.model_type == "clip_vision_model"


def test_sigmoid_siglip_checkpoint_round_trip(tmp_path):
    model, tokenizer, processor = build_dual_encoder("siglip", "sigmoid", seed=1)
    assert model.hf.logit_bias.item() == -10.0 and model.hf.logit_scale.item() == pytest.approx(math.log(10))
    enc = Encoder(save_dual_encoder(model, tokenizer, processor, tmp_path / "s"))
    assert (
        enc.logit_bias == -10.0
        and enc.fingerprint
        == json.loads((tmp_path / "s/config.json").read_text())["contrastive"]["tower_fingerprint"]
    )


def test_prompt_ensemble_is_the_renormalised_mean(encoder):
    templates = ["a {}.", "a small {}."]
    got = class_embeddings(encoder, ["red circle", "blue square"], templates)
    for row, label in zip(got, ["red circle", "blue square"], strict=True):
        each = encoder.embed_texts([t.format(label) for t in templates])
        torch.testing.assert_close(row, F.normalize(each.mean(0), dim=0))
    assert torch.allclose(got.norm(dim=-1), torch.ones(2))


def test_abstention_on_score_and_margin(encoder):
    classes = torch.eye(3)
    labels = ["a", "b", "c"]
    images = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.99, 0.0]]), dim=-1)
    confident, close = predict(encoder, images, classes, labels, 2, Abstention(min_margin=0.2))
    assert confident["label"] == "a" and not confident["abstained"]
    assert close["label"] == "unknown" and close["abstained"] and close["top_k"][0]["label"] == "a"
    probs = torch.softmax(encoder.logit_scale * images[0] @ classes.T, dim=-1)
    assert confident["top_k"][0]["prob"] == pytest.approx(float(probs[0]), abs=1e-6)
    high = predict(encoder, images, classes, labels, 2, Abstention(min_score=1.01))
    assert all(r["abstained"] for r in high)


def test_label_file_errors(tmp_path):
    (tmp_path / "empty").write_text("\n# only a comment\n")
    (tmp_path / "dup").write_text("circle\nsquare\nCircle\n")
    with pytest.raises(ValueError, match="empty"):
        read_lines(tmp_path / "empty", "labels")
    with pytest.raises(ValueError, match="duplicates: circle"):
        read_lines(tmp_path / "dup", "labels")
    with pytest.raises(FileNotFoundError, match="labels file not found"):
        read_lines(tmp_path / "missing", "labels")


def test_unreadable_image_is_named(encoder, pngs):
    root, paths = pngs
    with pytest.raises(ValueError, match="unreadable image .*broken.png"):
        classify(encoder, [paths[0], root / "broken.png"], ["red", "blue"])


def test_index_search_and_foreign_model(encoder, pngs, tmp_path):
    _, paths = pngs
    index = build_index(encoder, paths, "image", tmp_path / "idx")
    hits = search(index, encoder, images=[paths[1]], k=3)[0]["hits"]
    assert hits[0]["item"] == str(paths[1].resolve()) and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert len(search(index, encoder, texts=["a red square."], k=2)[0]["hits"]) == 2
    other = build_dual_encoder("clip", "infonce", seed=5)
    foreign = Encoder(save_dual_encoder(*other, tmp_path / "other"))
    with pytest.raises(ValueError, match="built with towers .* rebuild the index"):
        search(index, foreign, texts=["a red square."])


def test_recall_and_modality_gap_on_known_vectors():
    img = torch.eye(4)
    captions = ["a", "b", "c", "c"]
    text_of = {
        "a": torch.eye(4)[0],
        "b": torch.eye(4)[2],
        "c": torch.eye(4)[3],
    }  # "b" points at image 2 ("c")
    r = recall_at_k(img, captions, text_of, ks=(1, 2))
    assert r["t2i_R@1"] == pytest.approx(2 / 3) and r["i2t_R@1"] == pytest.approx(3 / 4)
    assert modality_gap(torch.eye(2), torch.eye(2).flip(0)) == 0.0
    assert modality_gap(torch.eye(2)[:1], torch.eye(2)[1:]) == pytest.approx(math.sqrt(2))


# -- CLI, server, training ------------------------------------------------------------------------------------
def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`vlm ARGS` in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from vlm.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def vlm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "vlm.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if check and result.returncode:
        pytest.fail(f"vlm {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result


def test_cli_zeroshot_index_search_and_errors(ckpt, pngs, tmp_path, capsys):
    root, paths = pngs
    (tmp_path / "labels").write_text("red\nblue\ngreen\n")
    images = ["--images", *map(str, paths)]
    code, out, _ = cli(
        capsys, "zeroshot", str(ckpt), "--labels", str(tmp_path / "labels"), *images, "--top-k", "2"
    )
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 3 and all(len(r["top_k"]) == 2 for r in rows)
    assert cli(capsys, "index", str(ckpt), *images, "--out", str(tmp_path / "idx"))[0] == 0
    code, out, _ = cli(capsys, "search", str(tmp_path / "idx"), "--model", str(ckpt), "--text", "red")
    assert code == 0 and len(json.loads(out)["hits"]) == 3
    code, out, _ = cli(capsys, "embed", str(ckpt), "--text", "red", "--images", str(paths[0]))
    assert code == 0 and [json.loads(line)["modality"] for line in out.splitlines()] == ["text", "image"]
    (tmp_path / "dups").write_text("red\nred\n")
    code, _, err = cli(
        capsys, "zeroshot", str(ckpt), "--labels", str(tmp_path / "dups"), "--images", str(paths[0])
    )
    assert code == 2 and "duplicates: red" in err
    code, _, err = cli(capsys, "embed", str(ckpt), "--images", str(root / "broken.png"))
    assert code == 2 and "broken.png" in err


def test_embeddings_server(encoder, pngs):
    from starlette.testclient import TestClient

    from vlm.contrastive.server import build_app
    from vlm.serve.media import MediaPolicy

    _, paths = pngs
    client = TestClient(
        build_app(encoder, "tiny", ["k3y"], MediaPolicy(allowed_local_media_path=str(paths[0].parent)))
    )
    auth = {"Authorization": "Bearer k3y"}
    assert client.post("/v1/embeddings", json={"input": "x"}).status_code == 401
    image = {"type": "image_url", "image_url": {"url": paths[0].as_uri()}}
    r = client.post("/v1/embeddings", headers=auth, json={"model": "tiny", "input": ["a red circle.", image]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    torch.testing.assert_close(torch.tensor(data[1]["embedding"]), encoder.embed_images([paths[0]])[0])
    torch.testing.assert_close(torch.tensor(data[0]["embedding"]), encoder.embed_texts(["a red circle."])[0])
    broken = {"type": "image_url", "image_url": {"url": (paths[0].parent / "broken.png").as_uri()}}
    assert client.post("/v1/embeddings", headers=auth, json={"input": [broken]}).status_code == 400
    assert (
        client.post("/v1/embeddings", headers=auth, json={"model": "other", "input": "x"}).status_code == 404
    )
    private = {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}
    assert client.post("/v1/embeddings", headers=auth, json={"input": [private]}).status_code == 403


def test_stage0_recipe_validation():
    from vlm.train.recipe import RecipeError, load_recipe

    recipe = load_recipe(ROOT / "stages/stage0.yaml")
    assert recipe.stage == 0 and recipe.objective == "contrastive" and recipe.contrastive.loss == "infonce"
    with pytest.raises(RecipeError, match="stage 0 pretrains a part"):
        load_recipe(ROOT / "stages/stage0.yaml", ["objective=lm"])
    with pytest.raises(RecipeError, match="contrastive.loss"):
        load_recipe(ROOT / "stages/stage0.yaml", ["contrastive.loss=triplet"])


@pytest.mark.deepspeed
@pytest.mark.slow
def test_stage0_trains_through_the_deepspeed_launcher(tmp_path):
    from vlm.data.synth import generate

    generate(tmp_path / "data", n=64, seed=0, n_eval=50, progress=False)
    out = tmp_path / "run"
    vlm(
        "train", "stages/stage0.yaml", f"output_dir={out}", f"data=[{tmp_path / 'data/caption_train.jsonl'}]",
        "micro_batch_size=16", "global_batch_size=32", "epochs=2", "log_every=1", "--num-gpus", "1",
    )  # fmt: skip
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    enc = Encoder(out / "final")
    assert enc.model.meta.loss == "infonce" and enc.embed_texts(["a red circle."]).shape == (1, 64)
