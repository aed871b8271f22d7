"""A single-page HTML report of an evaluation: summary numbers, a per-class table, curves and example images.

The page has inline CSS and no scripts; images are referenced by relative links, so the report folder can be
copied or zipped as a whole. Every piece of user text (title, captions, class names, metric keys) is escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

__all__ = ["write_html_report"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #222; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0; }
th, td { border: 1px solid #ddd; padding: 0.3rem 0.7rem; text-align: right; }
th { background: #f4f4f4; } td.name { text-align: left; }
.bar { display: inline-block; height: 0.7rem; background: #4a7fd6; vertical-align: middle; margin-right: 0.4rem; }
figure { display: inline-block; margin: 0.5rem; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ccc; image-rendering: pixelated; }
figcaption { font-size: 0.85rem; color: #555; max-width: 480px; }
.na { color: #999; }
"""

# per-class lists shown in the table (in this order) when present in ``metrics``
_PER_CLASS = (("iou", "IoU"), ("dice", "Dice"), ("precision", "Precision"), ("recall", "Recall"))


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return '<span class="na">n/a</span>'
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    return html.escape(str(v))


def _summary_rows(metrics: dict[str, Any]) -> list[str]:
    rows = []
    for key, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            rows.append(f'<tr><td class="name">{html.escape(str(key))}</td><td>{_fmt(v)}</td></tr>')
        elif isinstance(v, str):
            rows.append(f'<tr><td class="name">{html.escape(str(key))}</td><td>{html.escape(v)}</td></tr>')
    return rows


def _per_class_table(metrics: dict[str, Any]) -> str:
    cols = [(key, label) for key, label in _PER_CLASS if isinstance(metrics.get(key), (list, tuple))]
    if not cols:
        return ""
    k = len(metrics[cols[0][0]])
    names = metrics.get("class_names")
    names = [str(n) for n in names] if names is not None and len(names) == k else [str(i) for i in range(k)]
    head = "<tr><th>#</th><th>class</th>" + "".join(f"<th>{label}</th>" for _, label in cols) + "</tr>"
    body = []
    for i in range(k):
        cells = []
        for key, _ in cols:
            values = metrics[key]
            v = values[i] if i < len(values) else math.nan
            v = float(v) if isinstance(v, (int, float)) else math.nan
            bar = "" if key != "iou" or math.isnan(v) else f'<span class="bar" style="width:{60 * v:.0f}px"></span>'
            cells.append(f"<td>{bar}{_fmt(v)}</td>")
        body.append(f'<tr><td>{i}</td><td class="name">{html.escape(names[i])}</td>{"".join(cells)}</tr>')
    return "<h2>Per-class results</h2>\n<table>\n" + head + "\n" + "\n".join(body) + "\n</table>"


def _figure(src: str, caption: str) -> str:
    src_attr = html.escape(str(src).replace("\\", "/"), quote=True)
    cap = html.escape(str(caption))
    return f'<figure><a href="{src_attr}"><img src="{src_attr}" alt="{cap}"></a><figcaption>{cap}</figcaption></figure>'


def write_html_report(
    path: str | PathLike,
    title: str,
    metrics: dict[str, Any],
    images: Sequence[tuple[str, str]] = (),
    curves_png: str | None = None,
    per_class_table: bool = True,
) -> Path:
    """Write a simple self-contained HTML page summarising an evaluation.

    Args:
        path: output ``.html`` file (parent folders are created).
        title: page title.
        metrics: results, e.g. ``ConfusionMatrix.compute()``. Scalar numbers and strings go into the summary
            table; the per-class lists ``iou`` / ``dice`` / ``precision`` / ``recall`` with ``class_names`` form
            the per-class table; other values (lists, dicts) are not shown.
        images: ``(caption, png path relative to the report)`` pairs.
        curves_png: training-curve image path relative to the report, or ``None``.
        per_class_table: include the per-class table when the per-class lists are present.

    Returns:
        The written path.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{html.escape(str(title))}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(str(title))}</h1>",
    ]
    summary = _summary_rows(metrics)
    if summary:
        parts += ["<h2>Summary</h2>", "<table>", "<tr><th>metric</th><th>value</th></tr>", *summary, "</table>"]
    if per_class_table:
        table = _per_class_table(metrics)
        if table:
            parts.append(table)
    if curves_png:
        parts += ["<h2>Training curves</h2>", _figure(curves_png, "training curves")]
    if images:
        parts.append("<h2>Images</h2>")
        parts += [_figure(src, caption) for caption, src in images]
    parts += ["</body>", "</html>", ""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
