"""`make real-shapes`'s wiring (bench/real_shapes.py) at tiny scale: the same seven phases through the real
launchers and engines (data, init, stage 1, 2-rank ZeRO-3 LoRA stage 2 with a text-only rank, merge, vLLM serve
with concurrent chats, caption), each measured. The real-shape run itself is `make real-shapes` (BENCHMARKS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[1]
PHASES = ["data", "init", "stage1", "stage2", "merge", "serve", "caption"]


def test_real_shapes_script_runs_every_phase_at_tiny_scale(tmp_path):
    out = tmp_path / "table.md"
    cmd = [sys.executable, "bench/real_shapes.py", "--scale", "tiny", "--work", str(tmp_path / "work"),
           "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in out.read_text().splitlines()
        if line.startswith("| ")
    }
    for phase in PHASES:
        cells = [c.strip() for c in rows[phase].strip("|").split("|")]
        wall, tree_pss, tree_rss, ok = float(cells[2]), float(cells[3]), float(cells[4]), cells[7]
        assert ok == "yes" and wall > 0 and 0 < tree_pss <= tree_rss, rows[phase]
    for stage in ("stage1", "stage2"):
        assert len(rows[stage].split(" | ")[6].split("(")[0].split(",")) == 2  # seconds for each of 2 steps
    assert "steps with a text-only rank in the log: 2 of 2" in rows["stage2"]
    assert "2 captions written" in rows["caption"]
