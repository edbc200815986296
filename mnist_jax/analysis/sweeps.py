"""Sweep analysis: a sweep directory (`mnist-jax sweep`) as one section of the report.

The trial table and the spread over seeds are `mnist_jax.sweep.table`'s, read from the same
files `sweep` reads at its end; here they become the section's tables, `sweep-NAME.csv` and
`sweep-NAME-spread.csv`, and a figure of test accuracy against the swept value. The trials are
runs and get their run sections like any other; a damaged sweep.json costs only this section's
tables, never the trials.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mnist_jax.analysis import report as report_lib
from mnist_jax.analysis import sweep_plots
from mnist_jax.analysis.sections import Plot, save_figures
from mnist_jax.analysis.sweep_plots import is_number, value_text
from mnist_jax.errors import UserError
from mnist_jax.files import write_text_atomic
from mnist_jax.metrics import BEST_TEST_ACCURACY, TRAIN_SECONDS
from mnist_jax.record import first_line
from mnist_jax.sweep.table import (
    ACCURACY,
    LOSS,
    RESULT_COLUMNS,
    SWEEP_FILE,
    read_sweep,
    spread,
    trial_rows,
)

COMPLETED = "completed"  # only completed trials are averaged and drawn, as `table.spread` does
SPREAD_COLUMNS = ("trials", "mean", "std", "min", "max")


@dataclasses.dataclass
class SweepAnalysis:
    """What the report shows for one sweep: its trials, best first, and the spread of test
    accuracy over seeds per swept value (`table.trial_rows`, `table.spread`)."""

    path: Path
    name: str
    swept: tuple[str, ...]
    rows: list[dict[str, Any]]
    spread: list[dict[str, Any]]
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def by(self) -> tuple[str, ...]:
        """The swept fields the spread is taken per value of: all but the seed."""
        return tuple(k for k in self.swept if k != "seed")

    @property
    def completed(self) -> list[dict[str, Any]]:
        """The trials averaged and drawn: completed, with a test accuracy."""
        return [r for r in self.rows if _completed(r)]

    @property
    def left_out(self) -> list[dict[str, Any]]:
        """The trials neither averaged nor drawn: failed, stopped, not started, or damaged."""
        return [r for r in self.rows if not _completed(r)]


def _completed(row: Mapping[str, Any]) -> bool:
    return row["status"] == COMPLETED and row[ACCURACY] is not None


def analyze_sweep(path: str | Path) -> SweepAnalysis:
    """The sweep in directory `path`; a sweep.json that cannot be read leaves the tables empty
    and says why in `problems`."""
    path = Path(path)
    name = path.resolve().name
    try:
        saved = read_sweep(path)
        swept = tuple(str(k) for k in saved.get("swept") or ())
        rows = [_hashable(row, swept) for row in trial_rows(path, saved)]
    except UserError as e:
        return SweepAnalysis(path, name, (), [], [], [first_line(e)])
    except (KeyError, TypeError, AttributeError) as e:  # trials without a name or values
        problem = f"{SWEEP_FILE} is damaged ({type(e).__name__}: {e}); its trials are still runs"
        return SweepAnalysis(path, name, (), [], [], [problem])
    return SweepAnalysis(path, name, swept, rows, spread(rows, swept))


def _hashable(row: dict[str, Any], swept: Sequence[str]) -> dict[str, Any]:
    """The row with list values (layer widths) as tuples, so trials group by them."""
    return {k: _frozen(v) if k in swept else v for k, v in row.items()}


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


# --------------------------------------------------------------------------------------------
# Files: the tables as CSV
# --------------------------------------------------------------------------------------------


def write_csvs(sweep: SweepAnalysis, out: Path, slug: str) -> list[Path]:
    """`sweep-SLUG.csv` (one row per trial, best first) and `sweep-SLUG-spread.csv` (mean and
    spread per swept value) in `out`; a sweep without trials gets the headers alone."""
    trials = out / f"sweep-{slug}.csv"
    summary = out / f"sweep-{slug}-spread.csv"
    trial_columns = ("trial", "status", *sweep.swept, *RESULT_COLUMNS)
    write_text_atomic(trials, _csv(trial_columns, sweep.rows))
    write_text_atomic(summary, _csv((*sweep.by, *SPREAD_COLUMNS), sweep.spread))
    return [trials, summary]


def _csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else _csv_value(row[k]) for k in columns})
    return text.getvalue()


def _csv_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# --------------------------------------------------------------------------------------------
# The report section: tables and the figure
# --------------------------------------------------------------------------------------------

# (header, trial row key, format, CSS class) of the trial table's result columns.
_RESULT_CELLS = (
    ("test acc", ACCURACY, "{:.2%}", "num"),
    ("test loss", LOSS, "{:.4f}", "num"),
    ("best test acc", BEST_TEST_ACCURACY, "{:.2%}", "num"),
    ("train time", TRAIN_SECONDS, "{:.1f} s", "num"),
)


def trial_table(sweep: SweepAnalysis) -> report_lib.Table:
    """The trials, best test accuracy first, each with its status and swept values."""
    body = []
    for row in sweep.rows:
        cells: list[Any] = [row["trial"], report_lib.markup_badge(row["status"])]
        cells += [value_text(row[k]) for k in sweep.swept]
        cells += [_number_text(row[key], spec) for _, key, spec, _ in _RESULT_CELLS]
        body.append(cells)
    headers = ["trial", "status", *sweep.swept, *(h for h, *_ in _RESULT_CELLS)]
    classes = ["", "", *([""] * len(sweep.swept)), *(c for *_, c in _RESULT_CELLS)]
    return report_lib.Table(headers, body, classes)


def spread_table(sweep: SweepAnalysis) -> report_lib.Table:
    """Test accuracy per swept value over the completed trials (seeds): mean ± std, min, max."""
    body = [
        [*(value_text(row[k]) for k in sweep.by), row["trials"],
         f"{row['mean']:.2%} ± {row['std']:.2%}", f"{row['min']:.2%}", f"{row['max']:.2%}"]
        for row in sweep.spread
    ]  # fmt: skip
    headers = [*sweep.by, "trials", "test acc mean ± std", "min", "max"]
    return report_lib.Table(headers, body, [*([""] * len(sweep.by)), "num", "num", "num", "num"])


def sweep_section(sweep: SweepAnalysis, slug: str, figures_dir: Path) -> report_lib.SweepSection:
    """The sweep's tables, its figure (saved under `figures_dir`) and what was left out."""
    notes = []
    if sweep.left_out:
        left = ", ".join(f"{r['trial']} ({r['status']})" for r in sweep.left_out)
        notes.append(f"Not averaged or plotted (not completed, or no test accuracy): {left}.")
    figures = []
    plot = accuracy_plot(sweep)
    if plot is not None:
        figures = save_figures([plot], figures_dir)
    elif sweep.rows:
        notes.append("No completed trial yet: nothing to plot.")
    tables = []
    if sweep.rows:
        tables.append(("Trials, best test accuracy first", trial_table(sweep)))
    if sweep.spread:
        caption = "Spread over seeds per swept value" if sweep.by else "Spread over seeds"
        tables.append((caption, spread_table(sweep)))
    return report_lib.SweepSection(
        name=sweep.name,
        slug=slug,
        path=str(sweep.path),
        swept=sweep.swept,
        problems=list(sweep.problems),
        tables=tables,
        figures=figures,
        notes=notes,
    )


def accuracy_plot(sweep: SweepAnalysis) -> Plot | None:
    """Test accuracy against the swept value, or over the seeds when only the seed is swept;
    None before any trial completed.

    The x axis is the first numeric swept field (else the first swept field); every other
    swept field but the seed makes one line per value.
    """
    done = sweep.completed
    if not done or not sweep.spread:
        return None
    title = f"{sweep.name}: test accuracy"
    std = "the sample standard deviation over the seeds (n - 1; 0 for one trial)"
    if not sweep.by:
        seeds = [r.get("seed", r["trial"]) for r in done]
        order = sorted(range(len(done)), key=lambda i: str(done[i]["trial"]))
        summary = sweep.spread[0]
        png = sweep_plots.accuracy_over_seeds(
            [seeds[i] for i in order], [done[i][ACCURACY] for i in order],
            summary["mean"], summary["std"], f"{title} over seeds",
        )  # fmt: skip
        caption = f"Each completed trial's test accuracy; the mean, and dashed {std} either side."
        return Plot("test_accuracy", "Test accuracy over seeds", png, caption)
    numeric = [k for k in sweep.by if all(is_number(r[k]) for r in done)]
    x = (numeric or list(sweep.by))[0]
    others = [k for k in sweep.by if k != x]

    def line(row: Mapping[str, Any]) -> str:
        return ", ".join(f"{k}={value_text(row[k])}" for k in others)

    points = [(r[x], line(r), r[ACCURACY]) for r in done]
    means = [(r[x], line(r), r["mean"], r["std"]) for r in sweep.spread]
    png = sweep_plots.accuracy_by_value(points, means, x, f"{title} against {x}")
    caption = f"Points: completed trials. Line: the mean over seeds at each {x}, error bars {std}."
    if others:
        caption += f" One line per value of {', '.join(others)}."
    return Plot("test_accuracy", f"Test accuracy against {x}", png, caption)


def _number_text(value: Any, spec: str) -> str:
    return "–" if value is None else spec.format(value)
