"""Run logging on rank 0: a progress bar (loss, lr, samples/s, tokens/s, ETA), `metrics.jsonl`, TensorBoard
scalars under `tb/`, a log line every `log_every` steps, and at the end `loss.png` and `train_report.json`.

A metrics row is one optimizer step: flat numbers (loss, lr, throughput, ...) plus, when present, the mappings
`source_loss` / `source_loss_ema` (each data source's token-mean loss, raw and smoothed; vlm/train/source_loss.py)
and `eval` ({"vqa/accuracy": ...} from eval during training). TensorBoard gets `train/<key>`,
`train/source_loss_ema/<source>` and `eval/<task>/<metric>`. loss.png: the loss with each source's smoothed
curve, the eval scores when there are any, and the lr.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("vlm.train")


class MetricsLogger:
    def __init__(self, out: Path, enabled: bool):
        self.out, self.enabled = Path(out), enabled
        self.path = self.out / "metrics.jsonl"
        self._tb = None
        self._bar = None
        if enabled:
            self.out.mkdir(parents=True, exist_ok=True)

    def progress(self, total: int, initial: int = 0):
        self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", disable=not self.enabled)
        return self._bar

    def _writer(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tb"))
        return self._tb

    def step(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        self._last = {"step": step, **values}
        writer = self._writer()
        for key, value in values.items():
            if isinstance(value, dict):
                prefix = "eval" if key == "eval" else f"train/{key}"
                for name, v in value.items():
                    writer.add_scalar(f"{prefix}/{name}", v, step)
            else:
                writer.add_scalar(f"train/{key}", value, step)
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{values['loss']:.4f}",
                lr=f"{values['lr']:.2e}",
                samples_s=f"{values['samples_per_s']:.1f}",
                tokens_s=f"{values['tokens_per_s']:.0f}",
                refresh=False,
            )

    def log_line(self, step: int, total: int) -> None:
        """One line for the log: loss, each source's smoothed loss, and the eval scores of this step if any."""
        row = getattr(self, "_last", None)
        if not self.enabled or row is None or row["step"] != step:
            return
        line = f"step {step}/{total}  loss {row['loss']:.4f}  lr {row['lr']:.2e}"
        sources = row.get("source_loss_ema") or {}
        if len(sources) > 1:
            line += "  | source loss (EMA): " + ", ".join(f"{k} {v:.4f}" for k, v in sources.items())
        if row.get("eval"):
            line += "  | eval: " + ", ".join(f"{k} {v:.4f}" for k, v in row["eval"].items())
        log.info(line)

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so every step appears once."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def read(self) -> list[dict[str, Any]]:
        return (
            [json.loads(line) for line in self.path.read_text().splitlines() if line]
            if self.path.is_file()
            else []
        )

    def finish(self, report: dict[str, Any]) -> None:
        if self._tb is not None:
            self._tb.close()
        rows = self.read()
        if rows:
            report["final_loss"] = rows[-1]["loss"]
            evals = [r["eval"] for r in rows if r.get("eval")]
            if evals:
                report["final_eval"] = evals[-1]
            plot_curves(rows, self.out / "loss.png")
        (self.out / "train_report.json").write_text(json.dumps(report, indent=2))
        skipped = report.get("skipped_samples") or {}
        if skipped:
            log.warning("skipped samples: %s", skipped)


def _step_of(line: str) -> float:
    """A line's step; a line torn by a kill mid-write counts as after any checkpoint (it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


# Each task's headline numbers in loss.png (every metric is in metrics.jsonl and TensorBoard).
PLOTTED_EVAL_METRICS = ("vqa/accuracy", "caption/cider_d", "pope/f1", "pope/yes_ratio")


def _series(rows: list[dict[str, Any]], key: str) -> dict[str, list[tuple[int, float]]]:
    """{name: [(step, value), ...]} from the rows' `key` mappings."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for name, value in (row.get(key) or {}).items():
            out.setdefault(name, []).append((row["step"], value))
    return out


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    evals = [r for r in rows if r.get("eval")]
    fig, axes = plt.subplots(3 if evals else 2, 1, figsize=(7, 7.5 if evals else 5), sharex=True)
    ax_loss, ax_lr = axes[0], axes[-1]
    ax_loss.plot(steps, [r["loss"] for r in rows], label="loss", color="black", alpha=0.5)
    sources = _series(rows, "source_loss_ema")
    for name, points in sources.items() if len(sources) > 1 else ():
        ax_loss.plot(*zip(*points, strict=True), label=f"{name} (EMA)")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize="small")
    if evals:
        for name, points in _series(evals, "eval").items():
            if name in PLOTTED_EVAL_METRICS:
                axes[1].plot(*zip(*points, strict=True), marker="o", label=name)
        axes[1].set_ylabel("eval (held-out slice)")
        axes[1].legend(fontsize="small")
    ax_lr.plot(steps, [r["lr"] for r in rows], color="tab:orange")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
