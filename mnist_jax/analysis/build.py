"""`mnist-jax analyze`: reads the dataset, the runs and the sweeps, writes dataset_stats.json,
runs.csv, one sweep-NAME.csv and sweep-NAME-spread.csv per sweep, the figures and the HTML
report, and prints the tables to the console.

A dataset that cannot be loaded removes only the dataset section; a run that is partial or
damaged is shown with what is missing. Either alone is an error only when nothing is left.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnist_jax.analysis import report as report_lib
from mnist_jax.analysis import run_plots, sections, sweeps
from mnist_jax.analysis.compare import accuracy_order, comparison_row, write_runs_csv
from mnist_jax.analysis.dataset import dataset_stats
from mnist_jax.analysis.runs import Found, RunAnalysis, analyze_run, find_records
from mnist_jax.data import CLASS_NAMES
from mnist_jax.errors import UserError
from mnist_jax.files import write_text_atomic
from mnist_jax.record import Run, first_line, load_run
from mnist_jax.sweep.table import is_sweep

if TYPE_CHECKING:
    from rich.console import Console

    from mnist_jax.data import Dataset


def analyze(
    out_dir: str | Path = "analysis",
    *,
    dataset: str = "mnist",
    data_dir: str | Path | None = None,
    runs: Sequence[str] | None = None,
    runs_dir: str | Path = "runs",
    include_dataset: bool = True,
    include_runs: bool = True,
    console: Console | None = None,
) -> Path:
    """Analyses a dataset and runs into `out_dir` and returns the path of `report.html`.

    Writes `dataset_stats.json`, `runs.csv`, the sweeps' CSV files, the figures under `figures/`
    and the report. A sweep directory among the runs (or in `runs_dir`) becomes a sweep section,
    its trials runs like any other. Bad run arguments fail before any work; a dataset that
    cannot be loaded only removes the dataset section (with the reason in the report), unless
    there is nothing else to show.
    """
    from rich.console import Console

    if include_dataset and dataset not in CLASS_NAMES:
        raise UserError(f"unknown dataset {dataset!r}; choose one of: {', '.join(CLASS_NAMES)}")
    console = console or Console()
    found = find_records(runs, runs_dir) if include_runs else Found([], [], "")
    run_paths, runs_note = found.runs, found.note
    if not include_runs:
        runs_note = "Run analysis skipped (--no-runs)."
    elif not run_paths and not found.sweeps and not include_dataset:
        raise UserError(
            f"{runs_note.rstrip('.')}, and --no-dataset leaves nothing else to analyse; point "
            "--runs-dir or --runs at directories written by `mnist-jax train`, or drop --no-dataset"
        )
    out = Path(out_dir)
    _check_writable(out)
    loader = _CachingLoader(data_dir)

    dataset_section, dataset_note = None, "Dataset analysis skipped (--no-dataset)."
    if include_dataset:
        try:
            data = loader.load(dataset, str(data_dir) if data_dir else None, "auto")
        except (UserError, OSError, ValueError) as e:
            reason = f"{dataset} could not be loaded ({first_line(e)})"
            if not run_paths and not found.sweeps:
                raise UserError(f"{reason}; there are no runs to analyse either") from None
            dataset_note = f"Dataset section missing: {reason}."
            console.print(f"[yellow]warning:[/] {dataset_note}")
        else:
            dataset_section, dataset_note = _dataset_part(data, out, console), ""

    if run_paths or found.sweeps:
        from mnist_jax import parallel

        parallel.use_compilation_cache()  # the ranking curves' program: compiled once, ever
    analyses = [analyze_run(_load_run(p), loader.load) for p in run_paths]
    sweep_sections = _sweeps_part(found.sweeps, out, console)
    run_sections, comparison, comparison_figures = (
        _runs_part(analyses, out, console) if include_runs else ([], None, [])
    )
    report = report_lib.Report(
        title="mnist-jax analysis",
        generated=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        dataset=dataset_section,
        dataset_note=dataset_note,
        runs=run_sections,
        comparison=comparison,
        comparison_figures=comparison_figures,
        runs_note=runs_note,
        sweeps=sweep_sections,
    )
    return report_lib.write(report, out / "report.html")


def _check_writable(out: Path) -> None:
    """Creates `out` and proves it writable (a file made and removed in it) before any work, so
    a bad --out fails in a moment with one line rather than after the analysis.

    The permission bits are not read: they do not stop root, and a read-only file system or a
    path under a regular file fails only when tried. On failure the directories made here are
    removed again, so nothing is left behind.
    """
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".analyze-", dir=out)
        os.close(handle)
        os.unlink(probe)
    except OSError as e:
        for directory in created:  # deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()
        reason = e.strerror or type(e).__name__
        raise UserError(f"cannot write to {out} ({reason}): choose another --out") from None


class _CachingLoader:
    """Loads each dataset once (and tries a failing one once).

    A run whose own data_dir cannot be used (a run trained on another machine, a relative path
    from another working directory) falls back to the data the command was given; the gallery
    caption names where the images came from, and labels are checked against the run's.
    """

    def __init__(self, default_data_dir: str | Path | None) -> None:
        self.default_data_dir = str(default_data_dir) if default_data_dir else None
        self.loaded: dict[tuple[str, str | None], Dataset] = {}
        self.failed: dict[tuple[str, str | None], Exception] = {}

    def load(self, name: str, data_dir: str | None, source: str) -> Dataset:
        try:
            return self._load(name, data_dir, source)
        except (UserError, OSError, ValueError) as error:
            if data_dir == self.default_data_dir:
                raise
            try:
                return self._load(name, self.default_data_dir, "auto")
            except (UserError, OSError, ValueError):
                raise error from None

    def _load(self, name: str, data_dir: str | None, source: str) -> Dataset:
        from mnist_jax import data as data_lib

        key = (name, data_dir)
        if key in self.failed:
            raise self.failed[key]
        if key not in self.loaded:
            try:
                self.loaded[key] = data_lib.load_dataset(name, data_dir, source, progress=False)
            except (UserError, OSError, ValueError) as e:
                self.failed[key] = e
                raise
        return self.loaded[key]


def _dataset_part(data: Dataset, out: Path, console: Console) -> report_lib.DatasetSection:
    """dataset_stats.json, the statistics tables on the console, and the dataset section."""
    stats = dataset_stats(data)
    write_text_atomic(out / "dataset_stats.json", json.dumps(stats, indent=2) + "\n")
    exact = sections.dataset_tables(stats, significant=None)
    _print_table(console, f"{data.name}: pixel statistics (exact, float64)", exact[0])
    _print_table(console, f"{data.name}: images per class", exact[1])
    tables = sections.dataset_tables(stats)  # the report's, rounded; the JSON keeps every digit
    return sections.dataset_section(data, stats, tables, out / "figures" / "dataset")


def _runs_part(
    analyses: Sequence[RunAnalysis], out: Path, console: Console
) -> tuple[list[report_lib.RunSection], report_lib.Table | None, list[report_lib.Figure]]:
    """runs.csv, the comparison table and figure, and one report section per run, best first."""
    pairs = zip(analyses, _unique_slugs([a.run.name for a in analyses]), strict=True)
    ordered = sorted(((comparison_row(a), a, slug) for a, slug in pairs),
                     key=lambda item: accuracy_order(item[0]))  # fmt: skip
    rows = [row for row, _, _ in ordered]
    write_runs_csv(rows, out / "runs.csv")
    if not rows:
        return [], None, []
    table = sections.comparison_table(rows)
    _print_table(console, "runs, best test accuracy first", table, _CONSOLE_RUN_COLUMNS)
    run_sections = [
        sections.run_section(a, slug, out / "figures" / "runs" / slug) for _, a, slug in ordered
    ]
    curves = {a.run.name: a.curves for _, a, _ in ordered if len(a.curves["epoch"])}
    figures = []
    if curves:
        png = run_plots.comparison_curves(curves, "Runs compared")
        caption = "Test accuracy and train loss at each epoch end, one line per run."
        plot = sections.Plot("comparison_curves", "Runs compared", png, caption)
        figures = sections.save_figures([plot], out / "figures")
    return run_sections, table, figures


def _load_run(path: Path) -> Run:
    """The run in `path`; a sweep's trial is named `SWEEP/TRIAL`, as every sweep has a
    `trial-00`."""
    run = load_run(path)
    parent = path.resolve().parent
    if is_sweep(parent):
        run.name = f"{parent.name}/{run.name}"
    return run


def _sweeps_part(
    paths: Sequence[Path], out: Path, console: Console
) -> list[report_lib.SweepSection]:
    """sweep-NAME.csv and sweep-NAME-spread.csv, the spread on the console, and one report
    section per sweep."""
    found = [sweeps.analyze_sweep(p) for p in paths]
    result = []
    for sweep, slug in zip(found, _unique_slugs([s.name for s in found]), strict=True):
        sweeps.write_csvs(sweep, out, slug)
        if sweep.spread:
            title = f"sweep {sweep.name}: test accuracy over seeds"
            _print_table(console, title, sweeps.spread_table(sweep))
        for problem in sweep.problems:
            console.print(f"[yellow]warning:[/] sweep {sweep.name}: {problem}")
        result.append(sweeps.sweep_section(sweep, slug, out / "figures" / "sweeps" / slug))
    return result


def _print_table(
    console: Console,
    title: str,
    table: report_lib.Table,
    columns: Sequence[str] | None = None,
) -> None:
    """Prints `table` (or only its `columns`, so it fits a terminal) with rich."""
    from rich.table import Table

    shown = Table(title=title, title_justify="left")
    kept = [i for i, h in enumerate(table.headers) if columns is None or h in columns]
    for i in kept:
        numeric = i < len(table.classes) and table.classes[i] == "num"
        shown.add_column(table.headers[i], justify="right" if numeric else "left", overflow="fold")
    for row in table.rows:
        shown.add_row(*(_plain(row[i]) for i in kept))
    console.print(shown)


# The columns that fit an 80-column terminal; the report and runs.csv have them all.
_CONSOLE_RUN_COLUMNS = ("run", "epochs", "test acc", "macro F1", "status")


# ============================================================================================
# Small helpers
# ============================================================================================


def _plain(cell: Any) -> str:
    """A table cell as plain text (a badge's status word rather than its HTML)."""
    text = str(cell)
    if isinstance(cell, str) and text.startswith("<span"):
        return text[text.index(">") + 1 : text.rindex("<")]
    return text


def _unique_slugs(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    slugs = []
    for name in names:
        base = report_lib.slug(name)
        seen[base] = seen.get(base, 0) + 1
        slugs.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return slugs
