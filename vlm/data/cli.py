"""`vlm data synth`, `vlm data check` and `vlm data pope`. Wired into vlm/cli.py with `add_parser(subparsers)`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import fine_detail, pope, records, scene_check, scene_graph, scenes, synth

WORLDS = ("shapes", "scenes")


def _sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in value.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not sizes:
        raise argparse.ArgumentTypeError("expected at least one image size")
    return sizes


def _generate(args: argparse.Namespace) -> dict[str, Path]:
    common = {"seed": args.seed, "n_eval": args.n_eval, "progress": not args.quiet}
    if args.world == "shapes":
        if args.heldout_pairs is not None or args.texture or args.noise:
            raise ValueError("--heldout-pairs, --texture and --noise belong to --world scenes")
        return synth.generate(args.out, args.n, image_sizes=args.sizes or synth.DEFAULT_IMAGE_SIZES, **common)
    pairs = scene_graph.DEFAULT_HELDOUT_PAIRS
    if args.heldout_pairs is not None:
        pairs = scene_graph.parse_pairs(args.heldout_pairs)
    sizes = args.sizes or (scene_graph.DEFAULT_CANVAS,)
    return scenes.generate(
        args.out,
        args.n,
        image_sizes=sizes,
        heldout_pairs=pairs,
        texture=args.texture,
        noise=args.noise,
        **common,
    )


def cmd_synth(args: argparse.Namespace) -> int:
    try:
        paths = _generate(args)
        if args.fine_detail:
            paths.update(
                fine_detail.generate(
                    paths["root"],
                    args.fine_detail,
                    args.seed,
                    size=args.fine_detail_size,
                    noise=args.fine_detail_noise,
                    progress=not args.quiet,
                )
            )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = json.loads(paths["manifest"].read_text(encoding="utf-8"))
    print(f"wrote synthetic data to {paths['root']}")
    print(
        f"  images: {manifest['n_train_images']} train, {manifest['n_eval_images']} eval (seed {args.seed})"
    )
    for name, info in manifest["files"].items():
        print(f"  {paths[name]}: {info['records']} records")
    print(f"  {paths['manifest']}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    all_ok = True
    for file in args.files:
        if not Path(file).is_file():
            print(f"{file}: no such file", file=sys.stderr)
            all_ok = False
            continue
        report = records.check_file(file, image_root=args.image_root, verify_images=not args.no_images)
        try:
            scene_check.extend_report(report, Path(args.image_root or Path(file).parent))
        except ValueError as e:  # a broken scenes file: no answer can be recomputed from it
            report.problems.append((0, None, f"cannot check answers against the scene graphs: {e}"))
        shown = report.problems if args.max_errors <= 0 else report.problems[: args.max_errors]
        for problem in shown:
            print(report.format_problem(problem))
        if len(shown) < len(report.problems):
            print(f"... {len(report.problems) - len(shown)} more problem(s) not shown (--max-errors)")
        print(report.summary())
        all_ok &= report.ok
    return 0 if all_ok else 1


def cmd_pope(args: argparse.Namespace) -> int:
    if not args.scenes.is_file():
        print(f"error: scenes file not found: {args.scenes}", file=sys.stderr)
        return 2
    scenes = [
        json.loads(line) for line in args.scenes.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    out = args.out or args.scenes.with_name("pope_eval.jsonl")
    try:
        if scenes and "objects" in scenes[0]:  # the scenes world: statistics come from the training scenes
            train = args.scenes.with_name("scenes_train.jsonl")
            if not train.is_file():
                print(
                    f"error: {train} not found: scene POPE counts objects over the training scenes",
                    file=sys.stderr,
                )
                return 2
            train_scenes = [
                json.loads(line) for line in train.read_text(encoding="utf-8").splitlines() if line.strip()
            ]
            manifest = args.scenes.with_name("manifest.json")
            pairs = json.loads(manifest.read_text())["heldout_pairs"] if manifest.is_file() else []
            heldout = {p.replace(":", " ") for p in pairs}
            pope_records = pope.scene_pope_records(scenes, train_scenes, seed=args.seed, heldout=heldout)
        else:
            pope_records = pope.pope_records(scenes, seed=args.seed)
    except KeyError as e:
        print(f"error: {args.scenes}: a scene lacks the field {e}", file=sys.stderr)
        return 2
    synth._write_jsonl(out, pope_records)
    print(f"wrote {len(pope_records)} POPE questions ({len(scenes)} scenes x 3 splits, yes and no) to {out}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `data` with its `synth` and `check` subcommands; each sets `func(args) -> int`."""
    data = subparsers.add_parser("data", help="generate synthetic data, check LLaVA record files")
    sub = data.add_subparsers(dest="data_command", metavar="{synth,check,pope}")
    sub.required = True

    p = sub.add_parser("synth", help="write a synthetic dataset (images + LLaVA JSONL)")
    p.add_argument("--out", required=True, type=Path, help="output directory (the image root)")
    p.add_argument(
        "--world",
        choices=WORLDS,
        default="shapes",
        help="shapes: copies of one coloured shape (default); scenes: CLEVR-style scenes of 1-6 objects with "
        "question families and held-out colour-shape pairs",
    )
    p.add_argument("--n", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-eval", type=int, default=None, help="held-out images (default max(n // 10, 50))")
    p.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        help="comma-separated image sides in px, one drawn per image (default: shapes 32,48,64; scenes 64)",
    )
    pairs = ",".join(f"{c}:{s}" for c, s in scene_graph.DEFAULT_HELDOUT_PAIRS)
    p.add_argument(
        "--heldout-pairs",
        default=None,
        help=f"scenes: colour:shape pairs kept out of training scenes, comma-separated, '' for none (default {pairs})",
    )
    p.add_argument("--texture", action="store_true", help="scenes: textured backgrounds (grid, stripes)")
    p.add_argument(
        "--noise", type=float, default=0.0, help="scenes: Gaussian pixel noise, std in 0-255 units"
    )
    p.add_argument(
        "--fine-detail",
        type=int,
        default=0,
        metavar="N",
        help="also write the fine-detail task: N training images of one tiny 5x7 px digit on a large canvas "
        "(detail_train/detail_eval.jsonl, N // 5 held out; detail_small_train.jsonl: N // 2 at 32 px, a "
        "curriculum); readable only with anyres tiling (default 0: off)",
    )
    p.add_argument(
        "--fine-detail-size",
        type=int,
        default=fine_detail.DEFAULT_SIZE,
        help=f"the fine-detail canvas side in px (default {fine_detail.DEFAULT_SIZE}: a 4x4 grid of 32 px tiles)",
    )
    p.add_argument(
        "--fine-detail-noise",
        type=float,
        default=fine_detail.DEFAULT_NOISE,
        help=f"grey Gaussian pixel noise on the fine-detail canvases, std in 0-255 units (default "
        f"{fine_detail.DEFAULT_NOISE:g}: averaging 4x4 px buries the glyph, native tiles keep it)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("check", help="validate LLaVA conversation .jsonl/.json files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--image-root", type=Path, default=None, help="image root (default: the file's directory)")
    p.add_argument(
        "--max-errors", type=int, default=50, help="problems printed per file; 0 = all (default 50)"
    )
    p.add_argument("--no-images", action="store_true", help="skip image existence/readability checks")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "pope", help="write the POPE-style yes/no probe for a scenes file (synth writes it too)"
    )
    p.add_argument("--scenes", type=Path, default=Path("data/synth/scenes_eval.jsonl"), help="scene metadata")
    p.add_argument("--out", type=Path, default=None, help="output JSONL (default: pope_eval.jsonl beside it)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_pope)
    return data


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: `python -m vlm.data.cli data check FILE`."""
    parser = argparse.ArgumentParser(prog="vlm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
