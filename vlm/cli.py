"""The `vlm` command line. Each subcommand lives in the module that does the work; this file only wires them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from .logs import setup_logging
from .presets import LLM_PRESETS, TOWER_PRESETS


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs with YAML-typed values (`depth=3` -> 3, `bias=false` -> False)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: expected key=value, got {pair!r}")
        options[key] = yaml.safe_load(value)
    return options


def connector_arg(value: str) -> str | dict[str, Any]:
    """A registered connector name, or a YAML preset file such as connectors/qformer.yaml."""
    path = Path(value)
    if path.suffix in {".yaml", ".yml"}:
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"connector preset {value} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if not isinstance(loaded, dict):
            raise argparse.ArgumentTypeError(f"connector preset {value} must be a YAML mapping")
        return loaded
    return value


def grids_arg(value: str) -> list[list[int]]:
    """`1x2,2x1,2x2`: (rows x cols) tile grids for the anyres policy."""
    grids = []
    for item in value.split(","):
        rows, sep, cols = item.strip().lower().partition("x")
        if not (sep and rows.isdigit() and cols.isdigit() and int(rows) >= 1 and int(cols) >= 1):
            raise argparse.ArgumentTypeError(
                f"--grids: {item.strip()!r} is not ROWSxCOLS with two integers >= 1 (e.g. 1x2,2x1,2x2)"
            )
        grids.append([int(rows), int(cols)])
    return grids


def image_policy_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The `image_policy` section `vlm init`'s --image-policy, --grids and --pool describe."""
    policy: dict[str, Any] = {"type": args.image_policy, "pool": args.pool}
    if args.grids is not None:
        if args.image_policy != "anyres":
            raise ValueError(f"--grids applies to --image-policy anyres, not {args.image_policy!r}")
        policy["grids"] = args.grids
    return policy


def cmd_init(args: argparse.Namespace) -> int:
    from .build import build_base_model, describe, save_checkpoint

    model, processor = build_base_model(
        tower=args.tower,
        llm=args.llm,
        connector=args.connector,
        seed=args.seed,
        connector_options=parse_options(args.connector_opt),
        vision_feature_layer=args.feature_layer,
        vision_feature_select_strategy=args.select_strategy,
        image_policy=image_policy_from_args(args),
    )
    out = save_checkpoint(model, processor, args.out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(json.dumps({"checkpoint": str(out), "bytes": size, **describe(model)}, indent=2))
    return 0


def image_size_arg(value: str) -> tuple[int, int]:
    """`WxH` or `N` (a square), in pixels."""
    from .budget import parse_image_size

    try:
        return parse_image_size(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def tokens_policy(args: argparse.Namespace) -> dict[str, Any] | None:
    """The image policy `vlm tokens` was asked for (init's defaults fill what is not given), None if no flag was."""
    if args.image_policy is None and args.grids is None and args.pool is None:
        return None
    given = argparse.Namespace(
        image_policy=args.image_policy or "single",
        grids=args.grids,
        pool=1 if args.pool is None else args.pool,
    )
    return image_policy_from_args(given)


def cmd_tokens(args: argparse.Namespace) -> int:
    from .budget import budget_rows, format_budget

    if args.measure:
        return tokens_measured(args)
    tower = args.tower or "clip-vit-l-14-336"
    llm = args.llm or ("llama" if TOWER_PRESETS[tower].tiny else "llama-7b")
    width, height = args.image_size or (None, None)
    connectors = None if args.connector in (None, "all") else args.connector.split(",")
    rows = budget_rows(
        tower,
        llm,
        connectors,
        width,
        height,
        policy=tokens_policy(args),
        text_tokens=args.text_tokens,
        dtype=args.dtype,
        context=args.context,
        tower_size=args.tower_size,
    )
    size = args.tower_size or TOWER_PRESETS[tower].params["image_size"]
    print(format_budget(rows, f"visual token budget: tower {tower} ({size} px tiles), LLM {llm}"))
    return 0


def tokens_measured(args: argparse.Namespace) -> int:
    """`vlm tokens --measure CKPT`: the checkpoint's own row with times measured here, then the same policy and
    connector at real shapes."""
    from .budget import (
        REAL_LLM,
        REAL_TOWER,
        format_budget,
        measure,
        measured_columns,
        policy_conflict,
        real_shape_row,
    )
    from .config import VLMConfig

    from_checkpoint = {
        "--tower": args.tower,
        "--llm": args.llm,
        "--connector": args.connector,
        "--tower-size": args.tower_size,
        "--context": args.context,
    }
    given = [flag for flag, value in from_checkpoint.items() if value is not None]
    if given:
        raise ValueError(
            f"--measure reads the tower, LLM, connector and context from the checkpoint; drop {', '.join(given)}"
        )
    config = VLMConfig.from_pretrained(args.measure)
    note = policy_conflict(tokens_policy(args), config.image_policy)
    if note:
        print(f"note: {note}", file=sys.stderr)
    width, height = args.image_size or (None, None)
    m = measure(
        args.measure,
        width,
        height,
        text_tokens=args.text_tokens,
        dtype=args.dtype,
        kv_budget_gib=args.kv_budget_gib,
        repeats=args.repeats,
        threads=args.threads,
    )
    title = (
        f"measured: {m.checkpoint} ({config.image_size} px tiles, {config.text_config.model_type} LLM), "
        f"{args.dtype}, median of {m.repeats} after {m.warmup} warm-up, {m.threads} torch threads"
    )
    print(format_budget([m.row], title, measured_columns(m)))
    print(f"fit {m.kv_budget_gib:g} GiB: requests whose KV cache ({m.kv_mib:.3g} MiB each) fits the budget")
    try:
        real, (w, h) = real_shape_row(config, m.width, m.height, m.row.text_tokens, args.dtype)
    except ValueError as err:
        print(f"\nat real shapes ({REAL_TOWER} + {REAL_LLM}): not shown, {err}")
        return 0
    print()
    print(format_budget([real], f"the same policy and connector at real shapes: {REAL_TOWER} + {REAL_LLM}"))
    if config.policy.tiled and (w, h) != (m.width, m.height):
        print(f"(the image scaled by the tile ratio to {w}x{h} px, so the policy picks the same grid)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import VLMForConditionalGeneration, VLMProcessor
    from .build import save_checkpoint
    from .export import export_llava_hf, merge_lora

    if args.merge_lora:
        model, processor = merge_lora(args.checkpoint)
    else:
        model = VLMForConditionalGeneration.from_pretrained(args.checkpoint)
        processor = VLMProcessor.from_pretrained(args.checkpoint)
    if args.to == "llava-hf":
        out = export_llava_hf(model, processor, args.out)
    else:
        out = save_checkpoint(model, processor, args.out)
    print(f"wrote a {args.to} checkpoint to {out}")
    return 0


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="merge a LoRA adapter and/or convert a checkpoint to another format")
    p.add_argument(
        "checkpoint", help="our checkpoint directory, or a LoRA adapter directory with --merge-lora"
    )
    p.add_argument(
        "--to",
        choices=["vlm", "llava-hf"],
        default="vlm",
        help="vlm: our format (default); llava-hf: stock LlavaForConditionalGeneration (mlp connector)",
    )
    p.add_argument("--merge-lora", action="store_true", help="merge the adapter into its base checkpoint")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)


def cmd_import(args: argparse.Namespace) -> int:
    from .build import describe, save_checkpoint
    from .importer import import_checkpoint

    model, processor = import_checkpoint(args.source_format, args.source)
    out = save_checkpoint(model, processor, args.out)
    print(json.dumps({"checkpoint": str(out), "imported_from": args.source, **describe(model)}, indent=2))
    return 0


def add_import_parser(sub) -> None:
    from .importer import available_importers

    p = sub.add_parser("import", help="convert another format's checkpoint (llava-hf) into a vlm checkpoint")
    p.add_argument(
        "--from",
        dest="source_format",
        required=True,
        choices=available_importers(),
        help="llava-hf: a stock LlavaForConditionalGeneration checkpoint (LLaVA-1.5 layout)",
    )
    p.add_argument("source", metavar="SRC", help="hub id or local directory")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.set_defaults(func=cmd_import)


def add_image_policy_arguments(p: argparse.ArgumentParser, *flags: str) -> None:
    """--image-policy (under the names `flags`), --grids and --pool, read by image_policy_from_args."""
    from .policies import available_image_policies

    p.add_argument(
        *flags,
        dest="image_policy",
        choices=available_image_policies(),
        default="single",
        help="single: one crop per image (default); anyres: a thumbnail plus a grid of tiles (LLaVA-NeXT)",
    )
    p.add_argument(
        "--grids",
        type=grids_arg,
        default=None,
        metavar="RxC,...",
        help="anyres tile grids to choose from, rows x cols (default 1x2,2x1,2x2,1x3,3x1)",
    )
    p.add_argument(
        "--pool",
        type=int,
        default=1,
        help="average-pool each crop's patch grid N x N before the connector (1: off; 2 quarters mlp/linear tokens)",
    )


def add_init_parser(sub) -> None:
    p = sub.add_parser("init", help="build a random-init base checkpoint from presets or pretrained parts")
    p.add_argument(
        "--tower", default="clip", help=f"preset ({', '.join(TOWER_PRESETS)}) or hub id / local path"
    )
    p.add_argument("--llm", default="llama", help=f"preset ({', '.join(LLM_PRESETS)}) or hub id / local path")
    p.add_argument(
        "--connector", type=connector_arg, default="mlp", help="connector name or YAML preset file"
    )
    p.add_argument(
        "--connector-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a connector parameter",
    )
    p.add_argument("--feature-layer", type=int, default=-2, help="tower hidden state feeding the connector")
    p.add_argument(
        "--select-strategy",
        choices=["default", "full"],
        default=None,
        help="default: drop CLS (tower default)",
    )
    add_image_policy_arguments(p, "--image-policy")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init)


def add_tokens_parser(sub) -> None:
    from .budget import DEFAULT_KV_BUDGET_GIB, DEFAULT_TEXT_TOKENS, DTYPES

    p = sub.add_parser(
        "tokens",
        help="per connector: visual tokens per image, KV cache and prefill FLOPs per request (--measure: timed here)",
    )
    p.add_argument("--tower", default=None, choices=list(TOWER_PRESETS), help="default clip-vit-l-14-336")
    p.add_argument(
        "--llm", default=None, choices=list(LLM_PRESETS), help="default llama (tiny tower) or llama-7b"
    )
    p.add_argument("--connector", default=None, help="connector name(s), comma-separated, or 'all' (default)")
    p.add_argument(
        "--image-size",
        type=image_size_arg,
        default=None,
        metavar="WxH",
        help="the image, WxH px or N (a square); default one tile",
    )
    add_image_policy_arguments(p, "--policy", "--image-policy")
    p.set_defaults(
        image_policy=None, pool=None
    )  # None: not given (--measure compares them with the checkpoint's)
    p.add_argument(
        "--text-tokens",
        type=int,
        default=DEFAULT_TEXT_TOKENS,
        help=f"text tokens per request besides the image (default {DEFAULT_TEXT_TOKENS})",
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="KV cache (and --measure) dtype")
    p.add_argument("--context", type=int, default=None, help="context length (default: the LLM's)")
    p.add_argument("--tower-size", type=int, default=None, help="override the tower's input resolution (px)")
    p.add_argument(
        "--measure",
        metavar="CKPT",
        default=None,
        help="time the checkpoint's encoder and prefill here, under its own image policy",
    )
    p.add_argument(
        "--kv-budget-gib",
        type=float,
        default=DEFAULT_KV_BUDGET_GIB,
        help=f"--measure: the KV memory requests share (default {DEFAULT_KV_BUDGET_GIB:g} GiB)",
    )
    p.add_argument("--repeats", type=int, default=5, help="--measure: timed repeats, the median reported")
    p.add_argument(
        "--threads", type=int, default=None, help="--measure: torch threads (default: torch's, one per core)"
    )
    p.set_defaults(func=cmd_tokens)


def build_parser() -> argparse.ArgumentParser:
    from .contrastive.cli import add_parser as add_contrastive_parser
    from .data.cli import add_parser as add_data_parser
    from .eval.cli import add_eval_parser
    from .serve.caption import add_caption_parser
    from .serve.server import add_serve_parser
    from .train.launch import add_train_parser

    parser = argparse.ArgumentParser(prog="vlm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_init_parser(sub)
    add_tokens_parser(sub)
    add_export_parser(sub)
    add_import_parser(sub)
    add_data_parser(sub)
    add_serve_parser(sub)
    add_caption_parser(sub)
    add_eval_parser(sub)
    add_train_parser(sub)
    add_contrastive_parser(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with a subcommand's `--config` preset (vlm serve) as its defaults.

    The preset becomes the subcommand's defaults and the command line is read again, so every flag given there
    overrides the preset wherever it stands.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) and getattr(args, "preset", None):
        subparser, load = args.preset
        subparser.set_defaults(**load(args.config, subparser))
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except (ValueError, OSError) as err:  # a bad preset: one clear line
        print(f"error: {err}", file=sys.stderr)
        return 2
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as err:  # user errors: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
