"""`vlm eval CKPT --task vqa|caption|describe|pope --data FILE [--task ... --data ...]`: score a checkpoint on eval records.

Several --task/--data pairs share one engine start (vLLM takes ~20 s to start on a small CPU). With several,
--out and --html must contain "{task}". Exit status: 0, 1 when a --bars minimum is missed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .engines import ENGINES, make_engine
from .report import evaluate, format_table, write_json
from .slices import check_bars, load_bars
from .tasks import TASKS, load_examples

log = logging.getLogger(__name__)


def _output_path(template: str | None, task: str, n_tasks: int, flag: str) -> Path | None:
    if template is None:
        return None
    if n_tasks > 1 and "{task}" not in template:
        raise ValueError(f"{flag} {template}: with several tasks the path must contain {{task}}")
    return Path(template.replace("{task}", task))


def _engine_options(args: argparse.Namespace, max_images: int) -> dict:
    options = {"dtype": args.dtype}
    if args.batch_size:
        options["batch_size"] = args.batch_size
    if args.engine == "vllm":
        options.update(
            max_images=max_images,
            enforce_eager=args.enforce_eager,
            max_model_len=args.max_model_len,
            verbose=getattr(args, "verbose", False),
        )
    return options


def _load(args: argparse.Namespace) -> list[tuple[str, str, list, dict | None]]:
    """(task, data, examples, bars) per pair, all read before the engine starts so bad input fails fast."""
    if len(args.task) != len(args.data):
        raise ValueError(f"give one --data per --task ({len(args.task)} tasks, {len(args.data)} data files)")
    jobs = []
    for task, data in zip(args.task, args.data, strict=True):
        examples = load_examples(data, task, args.image_root, args.limit)
        bars = load_bars(args.bars, task, list(TASKS)) if args.bars else None
        jobs.append((task, data, examples, bars))
        _output_path(args.out, task, len(args.task), "--out")  # a bad template fails before the model loads
        _output_path(args.html, task, len(args.task), "--html")
    return jobs


def run(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"not a checkpoint directory (no config.json): {checkpoint}")
    jobs = _load(args)
    max_images = max(len(e.images) for _, _, examples, _ in jobs for e in examples)
    engine = make_engine(args.engine, checkpoint, **_engine_options(args, max_images))
    failed = False
    for task, data, examples, bars in jobs:
        report = evaluate(
            engine, task, data, examples=examples, image_root=args.image_root, max_new_tokens=args.max_new_tokens,
            use_java=False if args.no_java else None, progress=not args.quiet,
        )  # fmt: skip
        if bars is not None:
            failures = check_bars(report["slices"], bars, TASKS[task].primary)
            report["bars"] = {"file": str(args.bars), "failures": failures, "passed": not failures}
        failed |= _emit(report, args, len(jobs))
    return 1 if failed else 0


def _emit(report: dict, args: argparse.Namespace, n_tasks: int) -> bool:
    """Print the table, write the files; True when a bar was missed."""
    task = report["task"]
    print(format_table(report) + "\n", flush=True)
    for note in report["notes"]:
        log.info("%s: %s", task, note)
    out = _output_path(args.out, task, n_tasks, "--out")
    if out:
        log.info("%s: report -> %s", task, write_json(report, out))
    page = _output_path(args.html, task, n_tasks, "--html")
    if page:
        from .report_html import write_html

        log.info("%s: html -> %s", task, write_html(report, page, args.gallery))
    bars = report.get("bars")
    if bars and bars["failures"]:
        lines = "\n  ".join(bars["failures"])
        print(
            f"{task}: {len(bars['failures'])} bar(s) in {bars['file']} not met:\n  {lines}", file=sys.stderr
        )
        return True
    return False


def add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a checkpoint: VQA accuracy, CIDEr-D/BLEU-4 captions and descriptions, POPE"
    )
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument(
        "--task", action="append", required=True, choices=list(TASKS), help="repeatable, with --data"
    )
    p.add_argument(
        "--data", action="append", required=True, help="eval records (.jsonl/.json), one per --task"
    )
    p.add_argument("--engine", choices=ENGINES, default="vllm", help="vllm (default) or hf (transformers)")
    p.add_argument("--out", help="JSON report with every prediction ({task} is replaced by the task)")
    p.add_argument("--html", help="self-contained HTML report ({task} is replaced by the task)")
    p.add_argument("--bars", help="YAML of minimum scores per slice; exit 1 when any is missed")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N records of each file")
    p.add_argument(
        "--image-root", default=None, help="where image paths resolve (default: the data file's dir)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="requests per engine call")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="default per task: vqa 16, caption 48, describe 128, pope 8",
    )
    p.add_argument("--gallery", type=int, default=60, help="examples shown in the HTML report")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enforce-eager", action="store_true", help="vllm: skip torch.compile (faster start)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-java", action="store_true", help="caption: use the fallback tokenizer, not PTB")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    # As `vlm -v eval`; SUPPRESS keeps the subcommand's default from resetting a global -v.
    p.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="vLLM's INFO logs too"
    )
    p.set_defaults(func=run)
