"""The analysis report: one self-contained HTML file.

Figures are embedded as base64 PNG data URIs and the style sheet is inline, so the file can be
mailed, archived or opened offline and looks the same everywhere: no external URL, no script.
Every piece of text from run directories is escaped.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mnist_jax.files import write_bytes_atomic

# A run's status as `mnist_jax.record.load_run` reports it. `stale` is a run whose summary still
# says running but whose writer is gone (killed): stopped like `interrupted`, in a darker shade.
STATUS_COLORS = {
    "completed": "#1b7f3b",
    "running": "#1f5fbf",
    "interrupted": "#c26a00",
    "stale": "#8a4b08",
    "failed": "#b00020",
}
_UNKNOWN_COLOR = "#666666"


@dataclasses.dataclass(frozen=True)
class Figure:
    """One embedded figure."""

    title: str
    png: bytes
    caption: str = ""
    half: bool = False  # laid out two to a row


@dataclasses.dataclass(frozen=True)
class Table:
    """A table of already formatted cells; `classes` optionally names a CSS class per column."""

    headers: Sequence[str]
    rows: Sequence[Sequence[Any]]
    classes: Sequence[str] = ()


@dataclasses.dataclass(frozen=True)
class DatasetSection:
    name: str
    tables: Sequence[tuple[str, Table]]
    figures: Sequence[Figure]
    snippet: str = ""


@dataclasses.dataclass(frozen=True)
class RunSection:
    name: str
    slug: str
    path: str
    status: str
    message: str
    problems: Sequence[str]
    facts: Sequence[tuple[str, str]]
    figures: Sequence[Figure]
    notes: Sequence[str] = ()


@dataclasses.dataclass(frozen=True)
class SweepSection:
    name: str
    slug: str
    path: str
    swept: Sequence[str]
    problems: Sequence[str]
    tables: Sequence[tuple[str, Table]]
    figures: Sequence[Figure]
    notes: Sequence[str] = ()


@dataclasses.dataclass(frozen=True)
class Report:
    title: str
    generated: str
    dataset: DatasetSection | None
    dataset_note: str
    runs: Sequence[RunSection]
    comparison: Table | None
    comparison_figures: Sequence[Figure]
    runs_note: str
    sweeps: Sequence[SweepSection] = ()


class _Markup(str):
    """Text that is already HTML (made here, never from a run directory)."""


def render(report: Report) -> str:
    """The whole report as one HTML document."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(report.title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<header><h1>{_e(report.title)}</h1>",
        f'<p class="muted">Generated {_e(report.generated)}</p>',
        _contents(report),
        "</header>",
        _dataset_html(report),
        _sweeps_html(report),
        _runs_html(report),
        "</body></html>",
    ]
    return "\n".join(parts)


def write(report: Report, path: Path) -> Path:
    """Writes the report to `path` (atomically, UTF-8) and returns it."""
    write_bytes_atomic(path, render(report).encode("utf-8"))
    return path


def slug(name: str) -> str:
    """A name made of characters safe in file names and fragment ids."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "run"


def badge(status: str) -> str:
    color = STATUS_COLORS.get(status, _UNKNOWN_COLOR)
    return f'<span class="badge" style="background:{color}">{_e(status)}</span>'


def _contents(report: Report) -> str:
    items = ['<li><a href="#dataset">Dataset</a></li>']
    if report.sweeps:
        items.append('<li><a href="#sweeps">Sweeps</a><ul>')
        items += [f'<li><a href="#sweep-{s.slug}">{_e(s.name)}</a></li>' for s in report.sweeps]
        items.append("</ul></li>")
    items.append('<li><a href="#runs">Runs</a><ul>')
    for run in report.runs:
        items.append(f'<li><a href="#run-{run.slug}">{_e(run.name)}</a> {badge(run.status)}</li>')
    items.append("</ul></li>")
    return '<nav><ul class="toc">' + "".join(items) + "</ul></nav>"


def _dataset_html(report: Report) -> str:
    out = ['<section id="dataset">']
    section = report.dataset
    if section is None:
        out.append("<h2>Dataset</h2>")
        out.append(f'<p class="notice">{_e(report.dataset_note)}</p>')
        return "\n".join(out + ["</section>"])
    out.append(f"<h2>Dataset: {_e(section.name)}</h2>")
    if report.dataset_note:
        out.append(f'<p class="muted">{_e(report.dataset_note)}</p>')
    out.append('<div class="tables">')
    for caption, table in section.tables:
        out.append(f"<div><h3>{_e(caption)}</h3>{_table_html(table)}</div>")
    out.append("</div>")
    if section.snippet:
        out.append(f"<pre><code>{_e(section.snippet)}</code></pre>")
    out.append(_figures_html(section.figures))
    return "\n".join(out + ["</section>"])


def _runs_html(report: Report) -> str:
    out = ['<section id="runs">', "<h2>Runs</h2>"]
    if report.runs_note:
        out.append(f'<p class="notice">{_e(report.runs_note)}</p>')
    if report.comparison is not None and report.runs:
        out.append("<h3>Comparison (sorted by test accuracy)</h3>")
        out.append(_table_html(report.comparison))
        out.append(_figures_html(report.comparison_figures))
    for run in report.runs:
        out.append(_run_html(run))
    return "\n".join(out + ["</section>"])


def _sweeps_html(report: Report) -> str:
    """The sweeps, before the runs: each sums up trials whose own sections follow."""
    if not report.sweeps:
        return ""
    out = ['<section id="sweeps">', "<h2>Sweeps</h2>"]
    for sweep in report.sweeps:
        swept = ", ".join(sweep.swept) or "nothing readable"
        out += [
            f'<article class="run" id="sweep-{sweep.slug}">',
            f"<h3>{_e(sweep.name)}</h3>",
            f'<p class="muted"><code>{_e(sweep.path)}</code>; swept: {_e(swept)}</p>',
        ]
        if sweep.problems:
            items = "".join(f"<li>{_e(p)}</li>" for p in sweep.problems)
            out.append(f'<div class="missing"><strong>Unreadable</strong><ul>{items}</ul></div>')
        out.append(_figures_html(sweep.figures))
        out.append('<div class="tables">')
        for caption, table in sweep.tables:
            out.append(f"<div><h4>{_e(caption)}</h4>{_table_html(table)}</div>")
        out.append("</div>")
        out += [f'<p class="notice">{_e(note)}</p>' for note in sweep.notes]
        out.append("</article>")
    return "\n".join(out + ["</section>"])


def _run_html(run: RunSection) -> str:
    out = [
        f'<article class="run" id="run-{run.slug}">',
        f"<h3>{_e(run.name)} {badge(run.status)}</h3>",
        f'<p class="muted"><code>{_e(run.path)}</code></p>',
    ]
    if run.message:
        out.append(f'<p class="notice">{_e(run.message)}</p>')
    if run.problems:
        items = "".join(f"<li>{_e(p)}</li>" for p in run.problems)
        out.append(
            f'<div class="missing"><strong>Missing or unreadable</strong><ul>{items}</ul></div>'
        )
    if run.facts:
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in run.facts)
        out.append(f'<table class="facts">{rows}</table>')
    for note in run.notes:
        out.append(f'<p class="notice">{_e(note)}</p>')
    out.append(_figures_html(run.figures))
    return "\n".join(out + ["</article>"])


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in table.headers)
    body = []
    for row in table.rows:
        cells = []
        for i, cell in enumerate(row):
            cls = table.classes[i] if i < len(table.classes) else ""
            text = cell if isinstance(cell, _Markup) else _e(cell)
            cells.append(f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )


def _figures_html(figures: Sequence[Figure]) -> str:
    blocks = []
    for fig in figures:
        data = base64.b64encode(fig.png).decode("ascii")
        opening = '<figure class="half">' if fig.half else "<figure>"
        image = f'<img alt="{_e(fig.title)}" src="data:image/png;base64,{data}">'
        caption = f"<figcaption>{_e(fig.caption)}</figcaption>" if fig.caption else ""
        blocks.append(f"{opening}{image}{caption}</figure>")
    return '<div class="figures">' + "".join(blocks) + "</div>"


def markup_badge(status: str) -> str:
    """A status badge usable as a table cell."""
    return _Markup(badge(status))


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


_CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif;
max-width:1280px;margin:0 auto;padding:1.5rem 2rem;color:#1d1d1f;background:#fff;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #ddd;padding-bottom:.3rem;margin-top:2.5rem}
h3{margin-top:1.8rem}
.muted{color:#666}.toc{font-size:.95rem}.toc ul{margin:.2rem 0}
.badge{color:#fff;border-radius:.8rem;padding:.1rem .6rem;font-size:.8rem;font-weight:600;
vertical-align:middle;white-space:nowrap}
.notice{background:#fff6e0;border-left:4px solid #c26a00;padding:.5rem .8rem}
.missing{background:#fdecee;border-left:4px solid #b00020;padding:.5rem .8rem;margin:.6rem 0}
.missing ul{margin:.3rem 0}
table.data{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
table.data th,table.data td{border:1px solid #ddd;padding:.3rem .6rem}
table.data th{background:#f3f3f3;text-align:left}
table.data td.num{text-align:right;font-variant-numeric:tabular-nums}
table.data tbody tr:nth-child(even){background:#fafafa}
table.facts{border-collapse:collapse;font-size:.9rem;margin:.5rem 0}
table.facts th{text-align:left;padding:.15rem 1rem .15rem 0;color:#555;font-weight:500}
table.facts td{padding:.15rem 0;font-variant-numeric:tabular-nums}
.tables{display:flex;flex-wrap:wrap;gap:0 2.5rem;align-items:flex-start}
pre{background:#f6f8fa;padding:.7rem 1rem;border-radius:4px;overflow-x:auto}
.figures{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
figure{margin:.5rem 0;max-width:100%}figure.half{max-width:calc(50% - .5rem)}
figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85rem;color:#555;max-width:60rem}
article.run{border-top:1px solid #eee;margin-top:1.5rem}
"""
