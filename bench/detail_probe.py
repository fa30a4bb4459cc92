"""Can the frozen tower see the fine-detail digit? Probes of its features, per canvas size and pixel noise (issue 19).

    .venv/bin/python bench/detail_probe.py [--tower runs/stage0/final] [--cases 128:20,128:0,96:0] [--n 4000]

For each case (canvas side : noise std) it draws n digits as `vlm data synth --fine-detail` does, and reads the
tower's selected features (layer -2, as `vlm init` feeds the connector) two ways:
  single  the whole canvas through the tower's image processor (the `single` policy's resize to its input);
  native  the one tower-sized tile that holds the glyph, at native resolution (what `anyres` shows).
It then fits a linear probe (and, for single, a 256-wide MLP) on 80% and prints held-out accuracy (chance 0.10).
A probe bounds what a connector can learn from the frozen features: a task that `single` should fail needs its
probe near chance, and one that tiling should pass needs the native probe near 1.
"""

from __future__ import annotations

import argparse
import random
import sys

import torch

from vlm.data import fine_detail
from vlm.towers import load_tower, select_features, tower_spec


def features(tower, processor, images, has_cls: bool) -> torch.Tensor:
    out = []
    for i in range(0, len(images), 256):
        pixels = processor(images[i : i + 256], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        out.append(select_features(hidden, -2, "default", has_cls).flatten(1))
    return torch.cat(out)


def _standardise(x: torch.Tensor, n_train: int) -> torch.Tensor:
    return (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)


def probe(x: torch.Tensor, y: torch.Tensor, n_train: int, hidden: int = 0) -> float:
    """Held-out accuracy of a linear (hidden=0) or one-hidden-layer probe trained full-batch on the first n_train."""
    torch.manual_seed(0)
    x = _standardise(x, n_train)
    if hidden:
        net = torch.nn.Sequential(
            torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 10)
        )
        opt, steps = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2), 400
    else:
        net = torch.nn.Linear(x.shape[1], 10)
        opt, steps = torch.optim.Adam(net.parameters(), lr=1e-2), 600
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x[:n_train]), y[:n_train])
        if not hidden:
            loss = loss + 1e-3 * (net.weight**2).sum()  # a little L2: the features outnumber the samples
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (net(x[n_train:]).argmax(1) == y[n_train:]).float().mean().item()


def digits(side: int, noise: float, n: int, tile: int):
    """n (canvas, glyph tile, label) triples drawn as the generator draws them."""
    rng = random.Random(f"detail-probe/{side}/{noise}")
    canvases, tiles, labels = [], [], []
    for _ in range(n):
        digit = rng.choice(fine_detail.DIGITS)
        image, (x, y) = fine_detail.draw_digit(digit, side, rng, noise)
        tx, ty = x // tile * tile, y // tile * tile
        canvases.append(image)
        tiles.append(image.crop((tx, ty, tx + tile, ty + tile)))
        labels.append(int(digit))
    return canvases, tiles, torch.tensor(labels)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tower", default="runs/stage0/final", help="a tower checkpoint (make stage0) or hub id")
    ap.add_argument(
        "--cases", default="96:0,128:0,128:10,128:20,128:40", help="side:noise pairs, comma-separated"
    )
    ap.add_argument("--n", type=int, default=4000, help="digits per case, 80%% to fit (default 4000)")
    args = ap.parse_args()
    try:
        cases = [(int(s), float(v)) for s, v in (c.split(":") for c in args.cases.split(","))]
    except ValueError:
        ap.error(f"--cases must be side:noise pairs such as 128:20, got {args.cases!r}")
    tower = load_tower(args.tower).eval()
    spec, side_in = tower_spec(tower.config), tower.config.image_size
    processor = spec.image_processor(side_in)
    n_train = int(args.n * 0.8)
    print(f"tower {args.tower} ({side_in} px input); {args.n} digits per case, {args.n - n_train} held out\n")
    print("| canvas | noise std | single: linear | single: MLP | native tile: linear |")
    print("|---|---|---|---|---|")
    for side, noise in cases:
        canvases, tiles, y = digits(side, noise, args.n, side_in)
        single = features(tower, processor, canvases, spec.has_cls_token)
        native = features(tower, processor, tiles, spec.has_cls_token)
        accs = probe(single, y, n_train), probe(single, y, n_train, hidden=256), probe(native, y, n_train)
        print(f"| {side} px | {noise:g} | " + " | ".join(f"{a:.3f}" for a in accs) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
