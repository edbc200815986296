"""Run comparison: one row per run (key hyperparameters, the model, final metrics, the training's
FLOP rate, status), best test accuracy first, written to runs.csv and shown as the report's
comparison table."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mnist_jax import metrics
from mnist_jax.analysis.runs import RunAnalysis
from mnist_jax.files import write_bytes_atomic
from mnist_jax.record import number

_ACCURACY = metrics.metric_key("test", "accuracy")
_AUROC_MACRO = metrics.metric_key("test", "auroc_macro")
_RATE = metrics.metric_key("train", "examples_per_sec")

# The comparison table (and runs.csv): config fields, the model config.json describes (empty
# for runs written before it did), `split/name` metric keys, then the training's FLOP rate.
CONFIG_COLUMNS = ("dataset", "optimizer", "lr", "schedule", "batch_size", "epochs")
COUNT_COLUMNS = ("params", "flops_per_example", "train_flops_per_example")
MODEL_COLUMNS = ("model", *COUNT_COLUMNS)
METRIC_COLUMNS = (
    "epoch",
    _ACCURACY,
    metrics.metric_key("test", "f1_macro"),
    _AUROC_MACRO,
    metrics.TRAIN_SECONDS,
    _RATE,
)
# GFLOP/s of the training's products: the model's train FLOPs per example (forward and
# backward, `models.describe`) times the examples/s of the summary.
TRAIN_GFLOPS = "train_gflops"
COMPARISON_COLUMNS = (
    "name",
    *CONFIG_COLUMNS,
    *MODEL_COLUMNS,
    *METRIC_COLUMNS,
    TRAIN_GFLOPS,
    "status",
    "problems",
    "path",
)


def comparison_row(analysis: RunAnalysis) -> dict[str, Any]:
    """One row of the comparison table: name, key hyperparameters, model, final metrics, the
    training's FLOP rate (where the model's train FLOPs and the rate are known), status."""
    run = analysis.run
    metrics_ = run.final_metrics()
    row: dict[str, Any] = {"name": run.name}
    for key in CONFIG_COLUMNS:
        row[key] = run.config.get(key)
    row.update(model_columns(run.model))
    for key in METRIC_COLUMNS:
        row[key] = number(metrics_.get(key))
    if row[_AUROC_MACRO] is None and analysis.ranking is not None:
        defined = analysis.ranking.auroc_C[np.isfinite(analysis.ranking.auroc_C)]
        row[_AUROC_MACRO] = float(defined.mean()) if defined.size else None
    flops, rate = row["train_flops_per_example"], row[_RATE]
    row[TRAIN_GFLOPS] = flops * rate / 1e9 if flops is not None and rate is not None else None
    row["status"] = run.status
    row["problems"] = "; ".join(run.problems)
    row["path"] = str(run.path)
    return row


def model_columns(model: Mapping[str, Any]) -> dict[str, Any]:
    """The model's name, parameter count and FLOPs per example (forward, and a training step's)
    from config.json's `model` object; None for what it does not hold (or holds with the wrong
    type)."""
    name = model.get("name")
    counts = {}
    for key in COUNT_COLUMNS:
        value = model.get(key)
        counts[key] = value if isinstance(value, int) and not isinstance(value, bool) else None
    return {"model": name if isinstance(name, str) and name else None, **counts}


def sort_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Best test accuracy first; runs without one last; ties by name."""
    return [dict(r) for r in sorted(rows, key=accuracy_order)]


def accuracy_order(row: Mapping[str, Any]) -> tuple[bool, float, str]:
    """The sort key of `sort_rows`."""
    accuracy = row.get(_ACCURACY)
    return (accuracy is None, -(accuracy or 0.0), str(row.get("name")))


def write_runs_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Writes the comparison table; empty cells for values a run does not have."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COMPARISON_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in COMPARISON_COLUMNS})
    write_bytes_atomic(path, text.getvalue().encode("utf-8"))
    return path
