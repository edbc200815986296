"""The sweep table: one row per trial from its run record, and the mean and spread over seeds.

Reads only what the trials wrote (through `record.load_run`), so `sweep` prints it at its end
and `analyze` draws it from the same files at any later time.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mnist_jax import metrics
from mnist_jax.errors import UserError
from mnist_jax.files import write_text_atomic
from mnist_jax.record import load_run, number

SWEEP_FILE = "sweep.json"
TABLE_FILE = "sweep.csv"
SUMMARY_FILE = "sweep_summary.csv"
ACCURACY = metrics.metric_key("test", "accuracy")
LOSS = metrics.metric_key("test", "loss")
RESULT_COLUMNS = (ACCURACY, LOSS, metrics.BEST_TEST_ACCURACY, metrics.TRAIN_SECONDS)


def is_sweep(path: str | Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def read_sweep(path: str | Path) -> dict[str, Any]:
    """`sweep.json` of the sweep directory `path`: its name, swept fields and trials."""
    file = Path(path) / SWEEP_FILE
    if not Path(path).is_dir():
        raise UserError(f"{path} is not a sweep directory; pass the directory a sweep wrote")
    try:
        saved = json.loads(file.read_text())
        if not isinstance(saved, dict) or not isinstance(saved.get("trials"), list):
            raise ValueError("no trials")
    except FileNotFoundError:
        raise UserError(f"{path} is not a sweep directory (it has no {SWEEP_FILE})") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {file}: {e}; the sweep record is damaged") from None
    return saved


def trial_rows(path: str | Path, saved: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per trial: its name, status, swept values and final results, best first (by
    test accuracy; trials without one last)."""
    rows = []
    for trial in saved["trials"]:
        run_dir = Path(path) / trial["name"]
        final = load_run(run_dir).final_metrics() if run_dir.is_dir() else {}
        row = {"trial": trial["name"], "status": final.get("status", "not started")}
        row.update({key: trial["values"].get(key) for key in saved["swept"]})
        row.update({key: number(final.get(key)) for key in RESULT_COLUMNS})
        rows.append(row)
    return sorted(rows, key=lambda r: -(r[ACCURACY] if r[ACCURACY] is not None else -math.inf))


def spread(rows: Sequence[Mapping[str, Any]], swept: Sequence[str]) -> list[dict[str, Any]]:
    """Test accuracy per swept value (over every swept field but the seed): the number of
    trials, their mean and standard deviation (the sample's, 0 for one trial), min and max.
    Only completed trials count."""
    by = [key for key in swept if key != "seed"]
    groups: dict[str, tuple[tuple, list[float]]] = {}
    for row in rows:
        if row["status"] == "completed" and row[ACCURACY] is not None:
            values = tuple(row[k] for k in by)
            # keyed by their JSON: a swept value may be a list (layer widths)
            groups.setdefault(json.dumps(values, default=list), (values, []))[1].append(
                row[ACCURACY]
            )
    out = []
    for values, accuracies in groups.values():
        out.append(
            {
                **dict(zip(by, values, strict=True)),
                "trials": len(accuracies),
                "mean": statistics.fmean(accuracies),
                "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "min": min(accuracies),
                "max": max(accuracies),
            }
        )
    return sorted(out, key=lambda r: -r["mean"])


def write_tables(path: str | Path, saved: Mapping[str, Any]) -> tuple[list, list]:
    """Writes `sweep.csv` (the trials) and `sweep_summary.csv` (mean and spread per swept
    value); returns both tables."""
    rows = trial_rows(path, saved)
    summary = spread(rows, saved["swept"])
    write_text_atomic(Path(path) / TABLE_FILE, to_csv(rows))
    write_text_atomic(Path(path) / SUMMARY_FILE, to_csv(summary))
    return rows, summary


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return out.getvalue()


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as aligned plain-text columns (numbers to 4 significant digits)."""
    if not rows:
        return "(no trials)"
    columns = list(rows[0])
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
