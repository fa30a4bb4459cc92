"""A self-contained HTML page for one JSON report: metrics table, per-slice bar chart (inline SVG), and a gallery
of examples (thumbnails inlined as base64 PNG), wrong answers first.

A small page script checks on load that every image decoded and that the table and chart exist, and writes the
outcome into the title ("vlm-eval-report: ok" or "... broken: why"), so a headless browser can verify the page.
"""

from __future__ import annotations

import base64
import functools
import html
import io
from pathlib import Path
from typing import Any

from .report import METRIC_ORDER

THUMB_PX = 128
_CHECK_SCRIPT = """
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const bad = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;
  const problems = [];
  if (!document.querySelector('table#metrics')) problems.push('no metrics table');
  if (!document.querySelector('svg#slice-chart rect')) problems.push('no bar chart');
  if (bad) problems.push(bad + ' broken images');
  document.title = problems.length ? 'vlm-eval-report: broken: ' + problems.join(', ')
                                   : 'vlm-eval-report: ok: ' + imgs.length + ' images';
});
"""
_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}
.gallery{display:flex;flex-wrap:wrap;gap:.8em}.card{border:2px solid #ccc;padding:.5em;width:260px;font-size:.85em}
.card.wrong{border-color:#c0392b}.card.right{border-color:#27ae60}.mark{font-weight:bold}
.wrong .mark{color:#c0392b}.right .mark{color:#27ae60}
.card img{width:128px;image-rendering:pixelated;display:block;margin-bottom:.3em;border:1px solid #ddd}
.card img.multi{width:60px;display:inline-block;margin-right:.2em}
"""


@functools.cache
def thumbnail_data_url(path: str) -> str:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def metrics_table(slices: dict[str, dict[str, float]]) -> str:
    metrics = [m for m in METRIC_ORDER if m in slices["overall"]]
    head = "<tr><th>slice</th><th>n</th>" + "".join(f"<th>{m}</th>" for m in metrics) + "</tr>"
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{v['n']}</td>" + "".join(f"<td>{v[m]:.4f}</td>" for m in metrics)
        + "</tr>"
        for name, v in slices.items()
    )  # fmt: skip
    return f'<table id="metrics">{head}{rows}</table>'


def bar_chart(slices: dict[str, dict[str, float]], metric: str) -> str:
    """Horizontal bars of one metric per slice; the axis runs to 1 (or to the largest value above it)."""
    label_w, bar_w, row_h = 190, 360, 22
    top = max([1.0] + [v[metric] for v in slices.values()])
    parts = []
    for i, (name, v) in enumerate(slices.items()):
        y, w = i * row_h, bar_w * v[metric] / top
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end" font-size="12">{html.escape(name)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="#3b7dd8">'
            f"<title>{html.escape(name)}: {v[metric]:.4f}</title></rect>"
            f'<text x="{label_w + w + 4:.1f}" y="{y + 15}" font-size="11">{v[metric]:.3f}</text>'
        )
    height, width = row_h * len(slices) + 20, label_w + bar_w + 60
    axis = f'<text x="{label_w}" y="{height - 4}" font-size="11">{metric} (axis 0 to {top:g})</text>'
    return (
        f'<svg id="slice-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
        + "".join(parts) + axis + "</svg>"
    )  # fmt: skip


def _card(row: dict[str, Any], image_root: Path) -> str:
    # Every image of the example, in order: a multi-image question ("which image ...") needs them all.
    paths = [Path(p) if Path(p).is_absolute() else image_root / p for p in row["image"].split(", ") if p]
    size = ' class="multi"' if len(paths) > 1 else ""
    img = "".join(
        f'<img{size} src="{thumbnail_data_url(str(p))}" alt="{html.escape(row["id"])} image {k + 1}">'
        for k, p in enumerate(paths)
    )
    verdict = "right" if row["correct"] else "wrong"
    esc = html.escape
    return (
        f'<div class="card {verdict}">{img}<div class="mark">{"✓ right" if row["correct"] else "✗ wrong"}'
        f" &middot; score {row['score']:.3f}</div><div><b>{esc(row['id'])}</b></div>"
        f"<div>Q: {esc(row['question'])}</div><div>prediction: <i>{esc(row['prediction']) or '(empty)'}</i></div>"
        f"<div>references: {esc(' | '.join(row['references']))}</div></div>"
    )


def render_html(report: dict[str, Any], gallery: int = 60) -> str:
    rows = sorted(report["predictions"], key=lambda r: (r["correct"], r["score"]))[:gallery]
    root = Path(report["image_root"])
    n_wrong = sum(not r["correct"] for r in report["predictions"])
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report["notes"])
    bars = report.get("bars")
    bar_html = ""
    if bars:
        items = "".join(f"<li>{html.escape(f)}</li>" for f in bars["failures"]) or "<li>all met</li>"
        bar_html = f"<h2>Bars ({html.escape(bars['file'])})</h2><ul>{items}</ul>"
    title = f"{report['task']} - {report['checkpoint']}"
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style><script>{_CHECK_SCRIPT}</script></head><body>"
        f"<h1>{html.escape(report['task'])} evaluation</h1>"
        f"<p>checkpoint <code>{html.escape(report['checkpoint'])}</code> &middot; data "
        f"<code>{html.escape(report['data'])}</code> &middot; engine {html.escape(report['engine'])} &middot; "
        f"{report['n']} examples &middot; {html.escape(report['date'])}</p>"
        f"<h2>Metrics</h2>{metrics_table(report['slices'])}"
        f"<h2>{html.escape(report['primary_metric'])} per slice</h2>"
        f"{bar_chart(report['slices'], report['primary_metric'])}{bar_html}<h2>Notes</h2><ul>{notes}</ul>"
        f"<h2>Examples ({len(rows)} shown of {report['n']}; {n_wrong} wrong, wrong first)</h2>"
        f"<div class='gallery'>{''.join(_card(r, root) for r in rows)}</div></body></html>"
    )


def write_html(report: dict[str, Any], path: str | Path, gallery: int = 60) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report, gallery), encoding="utf-8")
    return path
