"""Run analysis: which run directories to read, and what the report shows for each run.

Runs are read by `mnist_jax.record.load_run`, tolerantly: a partial or damaged run is analysed
as far as its files allow, with its problems listed, never skipped and never a crash. Per-class
numbers, ROC/PR curves and the most confident mistakes come from `mnist_jax.metrics`.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from mnist_jax import metrics
from mnist_jax.data import CLASS_NAMES
from mnist_jax.errors import UserError
from mnist_jax.record import (
    CONFIG_FILE,
    PREDICTIONS_FILE,
    SUMMARY_FILE,
    Predictions,
    Run,
    first_line,
    looks_like_run,
    number,
)
from mnist_jax.sweep.table import is_sweep

if TYPE_CHECKING:
    from mnist_jax.data import Dataset

GALLERY_SIZE = 24
_GLOB_CHARS = frozenset("*?[")
_CONFUSION_KEY = metrics.metric_key("test", "confusion_matrix")

DatasetLoader = Callable[[str, "str | None", str], "Dataset"]


class Found(NamedTuple):
    """What `find_records` found: run directories (a sweep's trials among them), sweep
    directories, and a note for the report when there are no runs."""

    runs: list[Path]
    sweeps: list[Path]
    note: str


def find_runs(patterns: Sequence[str] | None, runs_dir: str | Path) -> tuple[list[Path], str]:
    """The run directories to analyse (a sweep's trials among them), and a note for the report
    when there are none; see `find_records`."""
    found = find_records(patterns, runs_dir)
    return found.runs, found.note


def find_records(patterns: Sequence[str] | None, runs_dir: str | Path) -> Found:
    """The run and sweep directories to analyse.

    `patterns` are directories or quoted globs. An explicit directory that is neither a run nor
    a sweep is an error; a glob (and the default `runs_dir/*`) passes over directories that hold
    no run file at all, but keeps a damaged run (one that lost its config.json) so the report
    shows it. A sweep directory (`mnist-jax sweep`) stands for itself and its trials, which are
    runs one level further down; each run and sweep is listed once, in the order given.
    """
    candidates: list[Path] = []
    if not patterns:
        root = Path(runs_dir)
        if not root.is_dir():
            return Found([], [], f"No runs found: the runs directory {root} does not exist.")
        candidates = sorted(root.iterdir())
    for pattern in patterns or ():
        if _GLOB_CHARS & set(pattern):
            matches = sorted(glob.glob(os.path.expanduser(pattern)))
            if not matches:
                raise UserError(f"--runs {pattern!r} matches nothing; check the pattern")
            candidates.extend(Path(m) for m in matches)
        else:
            candidates.append(_explicit_run(Path(pattern).expanduser()))
    runs: dict[Path, Path] = {}  # by resolved path: each once, in the order found
    sweeps: dict[Path, Path] = {}
    for path in candidates:
        if is_sweep(path):
            sweeps.setdefault(path.resolve(), path)
            for trial in _trial_dirs(path):
                runs.setdefault(trial.resolve(), trial)
        elif looks_like_run(path):
            runs.setdefault(path.resolve(), path)
    if runs:
        note = ""
    elif not patterns:
        note = f"No runs found under {runs_dir}."
    else:
        note = f"No runs found in {', '.join(repr(p) for p in patterns)}."
    return Found(list(runs.values()), list(sweeps.values()), note)


def _trial_dirs(sweep_dir: Path) -> list[Path]:
    """A sweep's trial run directories: those it has started (each is a complete run record)."""
    return sorted(p for p in sweep_dir.iterdir() if looks_like_run(p))


def _explicit_run(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"--runs {path}: no such directory")
    if looks_like_run(path) or is_sweep(path):
        return path
    if path.is_dir() and any(looks_like_run(p) or is_sweep(p) for p in path.iterdir()):
        raise UserError(
            f"{path} is not a run directory (no {CONFIG_FILE}) but holds runs; "
            f"use --runs-dir {path} or --runs '{path}/*'"
        )
    raise UserError(
        f"{path} is not a run directory (no {CONFIG_FILE}); pass a directory written by "
        "`mnist-jax train` or `mnist-jax sweep`"
    )


@dataclasses.dataclass(frozen=True)
class Mistakes:
    """The most confidently misclassified test images, most confident first."""

    indices_K: np.ndarray  # into the test split
    true_K: np.ndarray
    predicted_K: np.ndarray
    confidence_K: np.ndarray
    images_KxHxW: np.ndarray | None
    images_from: str = ""


@dataclasses.dataclass(frozen=True)
class Ranking:
    """One-vs-rest ranking metrics per class: ROC points (fpr, tpr), PR points (recall,
    precision), AUROC and average precision."""

    roc: list[tuple[np.ndarray, np.ndarray]]
    pr: list[tuple[np.ndarray, np.ndarray]]
    auroc_C: np.ndarray
    average_precision_C: np.ndarray


@dataclasses.dataclass
class RunAnalysis:
    """What the report shows for one run: curves, counts and per-class numbers."""

    run: Run
    class_names: tuple[str, ...]
    curves: dict[str, np.ndarray]
    confusion_CxC: np.ndarray | None = None
    confusion_source: str = ""
    per_class: dict[str, np.ndarray] | None = None
    ranking: Ranking | None = None
    mistakes: Mistakes | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def learning_curves(run: Run) -> dict[str, np.ndarray]:
    """Per-epoch and per-logged-step series from metrics.jsonl; missing values are NaN.

    Keys: `epoch`, the epoch events' `train/loss`, `train/accuracy`, `test/loss`,
    `test/accuracy`, then `step_epoch` and `step/train/loss`, `step/train/accuracy`.
    """
    epochs, steps = run.epoch_events, run.step_events
    curves = {"epoch": _series(epochs, "epoch")}
    for split in ("train", "test"):
        for name in ("loss", "accuracy"):
            key = metrics.metric_key(split, name)
            curves[key] = _series(epochs, key)
    curves["step_epoch"] = _series(steps, "epoch")
    for name in ("loss", "accuracy"):
        key = metrics.metric_key("train", name)
        curves[f"step/{key}"] = _series(steps, key)
    return curves


def top_mistakes(predictions: Predictions, k: int = GALLERY_SIZE) -> Mistakes:
    """The `k` wrong predictions with the highest probability; ties: lower index first."""
    chosen = metrics.top_mistakes(predictions.probs_NxC, predictions.labels_N, k)
    predicted = np.argmax(predictions.probs_NxC[chosen], axis=1)
    return Mistakes(
        indices_K=predictions.indices_N[chosen],
        true_K=predictions.labels_N[chosen],
        predicted_K=predicted,
        confidence_K=predictions.probs_NxC[chosen, predicted].astype(np.float64),
        images_KxHxW=None,
    )


def ranking(predictions: Predictions) -> Ranking:
    """ROC and PR curves, AUROC and AP of every class against the rest, from
    `metrics.one_vs_rest_curves` (exact and tie-aware, like scikit-learn's)."""
    from mnist_jax import parallel

    probs = predictions.probs_NxC
    # Float64 scores (a predictions file written elsewhere) are ranked exactly only outside
    # jit, where x64 is off; ours are float32 and take the compiled path.
    curves_of = metrics.one_vs_rest_curves
    if probs.dtype != np.float64:
        curves_of = parallel.jit(curves_of)
    curves = curves_of(probs, predictions.labels_N.astype(np.int32))
    roc, pr = metrics.curve_points(curves)
    return Ranking(
        roc=roc,
        pr=pr,
        auroc_C=np.asarray(curves.auroc_C, np.float64),
        average_precision_C=np.asarray(curves.average_precision_C, np.float64),
    )


def per_class_scores(confusion_CxC: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support from the confusion counts (via metrics), in
    one compiled program rather than a dozen eager ones (each its own compilation)."""
    from mnist_jax import parallel

    scores = parallel.jit(metrics.precision_recall_f1)(np.asarray(confusion_CxC, np.int32))
    return {k: np.asarray(scores[k]) for k in ("precision", "recall", "f1", "support")}


def analyze_run(run: Run, load_dataset: DatasetLoader | None = None) -> RunAnalysis:
    """Everything the report shows for one run, computed from what the run directory holds.

    `load_dataset(name, data_dir, source)` supplies the test images of the gallery; when it
    fails, the gallery is skipped with the reason and everything else is still computed.
    """
    num_classes = _num_classes(run)
    dataset, dataset_error = None, ""
    if run.predictions is not None and load_dataset is not None and run.config.get("dataset"):
        try:
            dataset = load_dataset(
                str(run.config["dataset"]),
                run.config.get("data_dir"),
                str(run.config.get("source") or "auto"),
            )
        except (UserError, OSError, ValueError) as e:
            dataset_error = first_line(e)
    if dataset is not None and dataset.num_classes == num_classes:
        class_names = tuple(dataset.class_names)
    elif len(known := CLASS_NAMES.get(str(run.config.get("dataset")), ())) == num_classes:
        class_names = known
    else:
        class_names = tuple(str(c) for c in range(num_classes))
    result = RunAnalysis(run=run, class_names=class_names, curves=learning_curves(run))
    _add_confusion(result, num_classes)
    if run.predictions is not None:
        result.ranking = ranking(run.predictions)
        result.mistakes = _gallery(run, dataset, dataset_error, result.notes)
    return result


def _num_classes(run: Run) -> int:
    if run.predictions is not None:
        return int(run.predictions.probs_NxC.shape[1])
    confusion = run.summary.get(_CONFUSION_KEY)
    if isinstance(confusion, list) and confusion:
        return len(confusion)
    return 10


def _add_confusion(result: RunAnalysis, num_classes: int) -> None:
    run = result.run
    confusion = _confusion_from_summary(run.summary, num_classes)
    if confusion is not None:
        result.confusion_CxC, result.confusion_source = confusion, SUMMARY_FILE
    elif run.predictions is not None:
        predicted = np.argmax(run.predictions.probs_NxC, axis=1)
        result.confusion_CxC = np.asarray(
            metrics.confusion_matrix(run.predictions.labels_N, predicted, num_classes)
        )
        result.confusion_source = PREDICTIONS_FILE
        result.notes.append(
            f"{SUMMARY_FILE} has no {_CONFUSION_KEY}; it is computed from {PREDICTIONS_FILE}."
        )
    if result.confusion_CxC is not None:
        result.per_class = per_class_scores(result.confusion_CxC)


def _confusion_from_summary(summary: Mapping[str, Any], num_classes: int) -> np.ndarray | None:
    value = summary.get(_CONFUSION_KEY)
    try:
        confusion = np.asarray(value, np.int64)
    except (TypeError, ValueError):
        return None
    if value is None or confusion.shape != (num_classes, num_classes) or (confusion < 0).any():
        return None
    return confusion


def _gallery(
    run: Run, dataset: Dataset | None, dataset_error: str, notes: list[str]
) -> Mistakes | None:
    assert run.predictions is not None
    mistakes = top_mistakes(run.predictions)
    if len(mistakes.indices_K) == 0:
        notes.append("No misclassified test image: the gallery is empty.")
        return mistakes
    name = run.config.get("dataset")
    if dataset is None:
        notes.append(
            f"Misclassified gallery skipped: the {name} dataset could not be loaded "
            f"({dataset_error or 'no dataset named in config.json'})."
        )
        return None
    test = dataset.test
    indices = run.predictions.indices_N
    if (
        indices.min() < 0
        or indices.max() >= len(test.labels)
        or not np.array_equal(test.labels[indices], run.predictions.labels_N)
    ):
        notes.append(
            f"Misclassified gallery skipped: the labels of the loaded {name} test split do not "
            f"match {PREDICTIONS_FILE}, so its images would not be the ones the run saw."
        )
        return None
    return dataclasses.replace(
        mistakes, images_KxHxW=test.images[mistakes.indices_K], images_from=dataset.origin
    )


def _series(events: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    values = [number(e.get(key)) for e in events]
    return np.array([math.nan if v is None else v for v in values], np.float64)
