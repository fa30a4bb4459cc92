"""Run logging on rank 0: a progress bar (loss, lr, samples/s, tokens/s, ETA), `metrics.jsonl`, TensorBoard
scalars under `tb/`, and at the end `loss.png` (loss and lr curves) and `train_report.json`."""

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

    def step(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        writer = self._writer()
        for key, value in values.items():
            writer.add_scalar(f"train/{key}", value, step)
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{values['loss']:.4f}",
                lr=f"{values['lr']:.2e}",
                samples_s=f"{values['samples_per_s']:.1f}",
                tokens_s=f"{values['tokens_per_s']:.0f}",
                refresh=False,
            )

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


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in rows])
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_lr.plot(steps, [r["lr"] for r in rows], color="tab:orange")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
