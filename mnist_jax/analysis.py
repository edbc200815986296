"""Dataset statistics, run analysis and run comparison: everything `mnist-jax analyze` computes.

Dataset statistics are exact. Every pixel statistic derives from the integer histogram of pixel
values, so a mean or standard deviation is the correctly rounded float64 value of the true one:
these are the numbers users paste into their normalisation code.

Runs are read from their run directories (docs/run-record.md) tolerantly: a run that is still
running, was interrupted, failed, or lost a file is shown with its status and what is missing,
never skipped and never a crash. Per-class numbers and ROC/PR curves come from `mnist_jax.metrics`
(imported when the first run is analysed, so dataset-only analysis does not start jax).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import glob
import json
import math
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, localcontext
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mnist_jax import plots
from mnist_jax import report as report_lib
from mnist_jax.data import CLASS_NAMES
from mnist_jax.errors import UserError
from mnist_jax.tracking import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    SUMMARY_FILE,
)

if TYPE_CHECKING:
    from rich.console import Console

    from mnist_jax.data import Dataset

SAMPLES_PER_CLASS = 10
GALLERY_SIZE = 24
_BINCOUNT_CHUNK = 1 << 22  # pixels per np.bincount call: bounds its int64 temporary to 32 MiB
_GLOB_CHARS = frozenset("*?[")

# The comparison table (and runs.csv): config fields, then `split/name` metric keys.
CONFIG_COLUMNS = ("dataset", "optimizer", "lr", "schedule", "batch_size", "epochs")
METRIC_COLUMNS = (
    "epoch",
    "test/accuracy",
    "test/f1_macro",
    "test/auroc_macro",
    "time/train_seconds",
    "train/examples_per_sec",
)
COMPARISON_COLUMNS = ("name", *CONFIG_COLUMNS, *METRIC_COLUMNS, "status", "problems", "path")


# ============================================================================================
# Dataset statistics
# ============================================================================================


def pixel_value_counts(images: np.ndarray) -> np.ndarray:
    """How many pixels take each value 0..255: `int64 [256]`, exact, computed in chunks."""
    flat = np.asarray(images).reshape(-1)
    if flat.dtype != np.uint8:
        raise ValueError(f"pixel statistics need uint8 images, got {flat.dtype}")
    counts = np.zeros(256, np.int64)
    for start in range(0, flat.size, _BINCOUNT_CHUNK):
        counts += np.bincount(flat[start : start + _BINCOUNT_CHUNK], minlength=256)
    return counts


def pixel_stats(counts_256: np.ndarray) -> dict[str, float | int]:
    """Mean and standard deviation (population, ddof=0) of pixels on the 0-255 and [0, 1] scales,
    and the fractions of pixels at 0 and at 255, from the value histogram.

    Sums are Python integers (exact), the variance's numerator `n*S2 - S1^2` too; only the final
    division and square root round, once, in 50-digit decimal arithmetic, so every float64 result
    is the true value correctly rounded.
    """
    counts = [int(c) for c in np.asarray(counts_256)]
    if len(counts) != 256:
        raise ValueError(f"expected 256 counts, got {len(counts)}")
    n = sum(counts)
    if n == 0:
        raise ValueError("no pixels to describe")
    s1 = sum(v * c for v, c in enumerate(counts))
    s2 = sum(v * v * c for v, c in enumerate(counts))
    with localcontext() as ctx:
        ctx.prec = 50
        root = Decimal(n * s2 - s1 * s1).sqrt()
        std_255 = float(root / n)
        std_01 = float(root / (n * 255))
    return {
        "num_pixels": n,
        "pixel_mean_0_255": float(Fraction(s1, n)),
        "pixel_std_0_255": std_255,
        "pixel_mean_0_1": float(Fraction(s1, n * 255)),
        "pixel_std_0_1": std_01,
        "fraction_zero": counts[0] / n,
        "fraction_255": counts[255] / n,
    }


def split_stats(
    images_NxHxW: np.ndarray, labels_N: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Statistics of one split: pixel statistics, class counts, and the value histogram."""
    counts = pixel_value_counts(images_NxHxW)
    per_class = np.bincount(np.asarray(labels_N, np.int64), minlength=len(class_names))
    return {
        "num_images": int(images_NxHxW.shape[0]),
        **pixel_stats(counts),
        "class_counts": {str(name): int(c) for name, c in zip(class_names, per_class, strict=True)},
        "pixel_value_counts": [int(c) for c in counts],
    }


def dataset_stats(dataset: Dataset) -> dict[str, Any]:
    """The content of `dataset_stats.json`: image shape, classes and per-split statistics."""
    return {
        "dataset": dataset.name,
        "image_shape": list(dataset.train.images.shape[1:]),
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
        "std": "population standard deviation (ddof=0) over all pixels of the split",
        "splits": {
            name: split_stats(split.images, split.labels, dataset.class_names)
            for name, split in (("train", dataset.train), ("test", dataset.test))
        },
    }


def mean_image(images_NxHxW: np.ndarray) -> np.ndarray:
    """The pixel-wise mean image in float64 `[H, W]` (integer sums, one division)."""
    return images_NxHxW.sum(axis=0, dtype=np.int64) / max(images_NxHxW.shape[0], 1)


def class_mean_images(
    images_NxHxW: np.ndarray, labels_N: np.ndarray, num_classes: int
) -> np.ndarray:
    """The mean image of every class, float64 `[C, H, W]` (zeros for an absent class)."""
    return np.stack([mean_image(images_NxHxW[labels_N == c]) for c in range(num_classes)])


def sample_images(
    images_NxHxW: np.ndarray, labels_N: np.ndarray, num_classes: int, per_class: int, seed: int = 0
) -> np.ndarray:
    """`per_class` images of every class, drawn reproducibly: uint8 `[C, K, H, W]` (blank if
    a class has fewer)."""
    order = np.random.default_rng(seed).permutation(len(labels_N))
    grid = np.zeros((num_classes, per_class, *images_NxHxW.shape[1:]), np.uint8)
    for c in range(num_classes):
        chosen = order[labels_N[order] == c][:per_class]
        grid[c, : len(chosen)] = images_NxHxW[chosen]
    return grid


# ============================================================================================
# Reading run directories
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class Predictions:
    """`predictions.npz`: the final model's test-split outputs."""

    probs_NxC: np.ndarray
    labels_N: np.ndarray
    indices_N: np.ndarray


@dataclasses.dataclass
class Run:
    """One run directory as found on disk; whatever could not be read is listed in `problems`."""

    path: Path
    name: str
    config: dict[str, Any]
    environment: dict[str, Any]
    summary: dict[str, Any]
    events: list[dict[str, Any]]
    predictions: Predictions | None
    checkpoints: dict[str, list[int]]
    problems: list[str]

    @property
    def status(self) -> str:
        """The summary's status, or `unknown` when the summary is missing or unreadable."""
        status = self.summary.get("status")
        return status if isinstance(status, str) and status else "unknown"

    @property
    def epoch_events(self) -> list[dict[str, Any]]:
        """The per-epoch evaluation events (the ones that carry `test/accuracy`), by step."""
        events = [e for e in self.events if "test/accuracy" in e]
        return sorted(events, key=lambda e: _number(e.get("step")) or 0)

    @property
    def step_events(self) -> list[dict[str, Any]]:
        """The training events logged every `log_every` steps, by step."""
        events = [e for e in self.events if "test/accuracy" not in e and "train/loss" in e]
        return sorted(events, key=lambda e: _number(e.get("step")) or 0)

    def final_metrics(self) -> dict[str, Any]:
        """The latest `test/*` numbers: the summary's, else those of the last epoch event."""
        if _number(self.summary.get("test/accuracy")) is not None:
            return self.summary
        epochs = self.epoch_events
        return {**self.summary, **epochs[-1]} if epochs else self.summary


def find_runs(patterns: Sequence[str] | None, runs_dir: str | Path) -> tuple[list[Path], str]:
    """The run directories to analyse, and a note for the report when there are none.

    `patterns` are directories or quoted globs. An explicit directory that is not a run is an
    error; a glob (and the default `runs_dir/*`) passes over directories that hold no run file
    at all, but keeps a damaged run (one that lost its config.json) so the report shows it.
    """
    if not patterns:
        root = Path(runs_dir)
        if not root.is_dir():
            return [], f"No runs found: the runs directory {root} does not exist."
        found = sorted(p for p in root.iterdir() if _looks_like_run(p))
        return found, "" if found else f"No runs found under {root}."
    found: list[Path] = []
    for pattern in patterns:
        if _GLOB_CHARS & set(pattern):
            matches = sorted(glob.glob(os.path.expanduser(pattern)))
            if not matches:
                raise UserError(f"--runs {pattern!r} matches nothing; check the pattern")
            found.extend(Path(m) for m in matches if _looks_like_run(Path(m)))
        else:
            found.append(_explicit_run(Path(pattern).expanduser()))
    runs, seen = [], set()
    for path in found:  # each run once, in the order given
        if path.resolve() not in seen:
            seen.add(path.resolve())
            runs.append(path)
    note = "" if runs else f"No runs found in {', '.join(repr(p) for p in patterns)}."
    return runs, note


def load_run(path: str | Path) -> Run:
    """Reads a run directory, noting (not raising) anything missing, partial or damaged."""
    path = Path(path)
    problems: list[str] = []
    config_file = _read_json_object(path / CONFIG_FILE, problems) or {}
    config = config_file.get("config")
    if config_file and not isinstance(config, dict):
        problems.append(f"{CONFIG_FILE} has no 'config' object")
    environment = config_file.get("environment")
    summary = _read_json_object(path / SUMMARY_FILE, problems) or {}
    return Run(
        path=path,
        name=path.resolve().name,
        config=config if isinstance(config, dict) else {},
        environment=environment if isinstance(environment, dict) else {},
        summary=summary,
        events=_read_events(path / METRICS_FILE, problems),
        predictions=_read_predictions(path / PREDICTIONS_FILE, problems),
        checkpoints=_find_checkpoints(path / CHECKPOINTS_DIR, problems),
        problems=problems,
    )


def _looks_like_run(path: Path) -> bool:
    """A run directory, or a damaged one: no config.json, but files only training writes."""
    written = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, CHECKPOINTS_DIR, PREDICTIONS_FILE)
    return path.is_dir() and any((path / name).exists() for name in written)


def _explicit_run(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"--runs {path}: no such directory")
    if _looks_like_run(path):
        return path
    if path.is_dir() and any(_looks_like_run(p) for p in path.iterdir()):
        raise UserError(
            f"{path} is not a run directory (no {CONFIG_FILE}) but holds runs; "
            f"use --runs-dir {path} or --runs '{path}/*'"
        )
    raise UserError(
        f"{path} is not a run directory (no {CONFIG_FILE}); pass a directory written by "
        "`mnist-jax train`"
    )


def _read_json_object(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        problems.append(f"no {path.name}")
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{path.name} is not valid JSON ({_first_line(e)})")
        return None
    except OSError as e:
        problems.append(f"{path.name} cannot be read ({e.strerror})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path.name} does not hold a JSON object")
        return None
    return value


def _read_events(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        problems.append(f"no {path.name}")
        return []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        problems.append(f"{path.name} cannot be read ({e.strerror})")
        return []
    events, unreadable = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            unreadable += 1
            continue
        if isinstance(event, dict):
            events.append(event)
        else:
            unreadable += 1
    if not events and not unreadable:
        problems.append(f"{path.name} is empty")
    if unreadable:
        problems.append(f"{unreadable} unreadable line(s) in {path.name}")
    if events and not any("test/accuracy" in e for e in events):
        problems.append(f"no epoch has finished: no epoch events in {path.name}")
    return events


def _read_predictions(path: Path, problems: list[str]) -> Predictions | None:
    if not path.is_file():
        problems.append(f"no {path.name} (written when training ends)")
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            probs = np.asarray(npz["probs"], np.float32)
            labels = np.asarray(npz["labels"], np.int64)
            indices = np.asarray(npz["indices"], np.int64)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        problems.append(f"{path.name} cannot be read ({_first_line(e)})")
        return None
    n = labels.shape[0] if labels.ndim == 1 else -1
    if probs.ndim != 2 or n != probs.shape[0] or indices.shape != labels.shape or n == 0:
        problems.append(
            f"{path.name} has inconsistent shapes: probs {probs.shape}, labels {labels.shape}, "
            f"indices {indices.shape}"
        )
        return None
    if labels.min() < 0 or labels.max() >= probs.shape[1] or not np.isfinite(probs).all():
        problems.append(f"{path.name} holds labels out of range or non-finite probabilities")
        return None
    return Predictions(probs, labels, indices)


def _find_checkpoints(path: Path, problems: list[str]) -> dict[str, list[int]]:
    found = {}
    for kind in ("last", "best"):
        folder = path / kind
        steps = (
            sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
            if folder.is_dir()
            else []
        )
        if steps:
            found[kind] = steps
    if not found:
        problems.append("no checkpoint")
    return found


# ============================================================================================
# Analysing runs
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class Mistakes:
    """The most confidently misclassified test images, most confident first."""

    indices_K: np.ndarray  # into the test split
    true_K: np.ndarray
    predicted_K: np.ndarray
    confidence_K: np.ndarray
    images_KxHxW: np.ndarray | None
    images_from: str = ""


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


DatasetLoader = Callable[[str, "str | None", str], "Dataset"]


def learning_curves(run: Run) -> dict[str, np.ndarray]:
    """Per-epoch and per-logged-step series from metrics.jsonl; missing values are NaN."""
    epochs, steps = run.epoch_events, run.step_events
    curves = {"epoch": _series(epochs, "epoch")}
    for key in ("train/loss", "train/accuracy", "test/loss", "test/accuracy"):
        curves[key] = _series(epochs, key)
    curves["step_epoch"] = _series(steps, "epoch")
    for key in ("train/loss", "train/accuracy"):
        curves[f"step/{key}"] = _series(steps, key)
    return curves


def top_mistakes(predictions: Predictions, k: int = GALLERY_SIZE) -> Mistakes:
    """The `k` wrong predictions with the highest probability; ties: lower index first."""
    predicted = np.argmax(predictions.probs_NxC, axis=1)
    confidence = predictions.probs_NxC[np.arange(len(predicted)), predicted]
    wrong = np.flatnonzero(predicted != predictions.labels_N)
    chosen = wrong[np.argsort(-confidence[wrong], kind="stable")[:k]]
    return Mistakes(
        indices_K=predictions.indices_N[chosen],
        true_K=predictions.labels_N[chosen],
        predicted_K=predicted[chosen],
        confidence_K=confidence[chosen].astype(np.float64),
        images_KxHxW=None,
    )


@dataclasses.dataclass(frozen=True)
class Ranking:
    """One-vs-rest ranking metrics per class: ROC points (fpr, tpr), PR points (recall,
    precision), AUROC and average precision."""

    roc: list[tuple[np.ndarray, np.ndarray]]
    pr: list[tuple[np.ndarray, np.ndarray]]
    auroc_C: np.ndarray
    average_precision_C: np.ndarray


def ranking(predictions: Predictions) -> Ranking:
    """ROC and PR curves, AUROC and AP of every class against the rest, from
    `mnist_jax.metrics` (exact and tie-aware, like scikit-learn's)."""
    import jax
    import jax.numpy as jnp

    from mnist_jax import metrics

    probs = jnp.asarray(predictions.probs_NxC)
    labels = jnp.asarray(predictions.labels_N.astype(np.int32))
    roc_fn = jax.jit(metrics.roc_curve)
    pr_fn = jax.jit(metrics.precision_recall_curve)
    roc, pr = [], []
    for c in range(probs.shape[1]):
        fpr, tpr, _, valid = jax.device_get(roc_fn(probs[:, c], labels == c))
        roc.append((fpr[valid], tpr[valid]))
        precision, recall, _, valid = jax.device_get(pr_fn(probs[:, c], labels == c))
        pr.append((recall[valid], precision[valid]))
    return Ranking(
        roc=roc,
        pr=pr,
        auroc_C=np.asarray(metrics.one_vs_rest_auroc(probs, labels), np.float64),
        average_precision_C=np.asarray(
            metrics.one_vs_rest_average_precision(probs, labels), np.float64
        ),
    )


def per_class_scores(confusion_CxC: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support from the confusion counts (via metrics)."""
    from mnist_jax import metrics

    scores = metrics.precision_recall_f1(np.asarray(confusion_CxC, np.int32))
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
            dataset_error = _first_line(e)
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
    confusion = run.summary.get("test/confusion_matrix")
    if isinstance(confusion, list) and confusion:
        return len(confusion)
    return 10


def _add_confusion(result: RunAnalysis, num_classes: int) -> None:
    run = result.run
    confusion = _confusion_from_summary(run.summary, num_classes)
    if confusion is not None:
        result.confusion_CxC, result.confusion_source = confusion, SUMMARY_FILE
    elif run.predictions is not None:
        from mnist_jax import metrics

        predicted = np.argmax(run.predictions.probs_NxC, axis=1)
        result.confusion_CxC = np.asarray(
            metrics.confusion_matrix(run.predictions.labels_N, predicted, num_classes)
        )
        result.confusion_source = PREDICTIONS_FILE
        result.notes.append(
            f"{SUMMARY_FILE} has no test/confusion_matrix; it is computed from {PREDICTIONS_FILE}."
        )
    if result.confusion_CxC is not None:
        result.per_class = per_class_scores(result.confusion_CxC)


def _confusion_from_summary(summary: Mapping[str, Any], num_classes: int) -> np.ndarray | None:
    value = summary.get("test/confusion_matrix")
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


# ============================================================================================
# Comparing runs
# ============================================================================================


def comparison_row(analysis: RunAnalysis) -> dict[str, Any]:
    """One row of the comparison table: name, key hyperparameters, final metrics, status."""
    run = analysis.run
    metrics_ = run.final_metrics()
    row: dict[str, Any] = {"name": run.name}
    for key in CONFIG_COLUMNS:
        row[key] = run.config.get(key)
    for key in METRIC_COLUMNS:
        row[key] = _number(metrics_.get(key))
    if row["test/auroc_macro"] is None and analysis.ranking is not None:
        defined = analysis.ranking.auroc_C[np.isfinite(analysis.ranking.auroc_C)]
        row["test/auroc_macro"] = float(defined.mean()) if defined.size else None
    row["status"] = run.status
    row["problems"] = "; ".join(run.problems)
    row["path"] = str(run.path)
    return row


def sort_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Best test accuracy first; runs without one last; ties by name."""
    return [dict(r) for r in sorted(rows, key=_accuracy_order)]


def _accuracy_order(row: Mapping[str, Any]) -> tuple[bool, float, str]:
    accuracy = row.get("test/accuracy")
    return (accuracy is None, -(accuracy or 0.0), str(row.get("name")))


def write_runs_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Writes the comparison table; empty cells for values a run does not have."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COMPARISON_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in COMPARISON_COLUMNS})
    return path


# ============================================================================================
# The `analyze` command
# ============================================================================================


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

    Writes `dataset_stats.json`, `runs.csv`, the figures under `figures/` and the report. Bad
    run arguments fail before any work; a dataset that cannot be loaded only removes the
    dataset section (with the reason in the report), unless there is nothing else to show.
    """
    from rich.console import Console

    if include_dataset and dataset not in CLASS_NAMES:
        raise UserError(f"unknown dataset {dataset!r}; choose one of: {', '.join(CLASS_NAMES)}")
    console = console or Console()
    run_paths, runs_note = find_runs(runs, runs_dir) if include_runs else ([], "")
    if not include_runs:
        runs_note = "Run analysis skipped (--no-runs)."
    elif not run_paths and not include_dataset:
        raise UserError(
            f"{runs_note.rstrip('.')}, and --no-dataset leaves nothing else to analyse; point "
            "--runs-dir or --runs at directories written by `mnist-jax train`, or drop --no-dataset"
        )
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {out}: {e.strerror}") from None
    loader = _CachingLoader(data_dir)

    dataset_section, dataset_note = None, "Dataset analysis skipped (--no-dataset)."
    if include_dataset:
        try:
            data = loader.load(dataset, str(data_dir) if data_dir else None, "auto")
        except (UserError, OSError, ValueError) as e:
            reason = f"{dataset} could not be loaded ({_first_line(e)})"
            if not run_paths:
                raise UserError(f"{reason}; there are no runs to analyse either") from None
            dataset_note = f"Dataset section missing: {reason}."
            console.print(f"[yellow]warning:[/] {dataset_note}")
        else:
            dataset_section, dataset_note = _dataset_part(data, out, console), ""

    analyses = [analyze_run(load_run(p), loader.load) for p in run_paths]
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
    )
    return report_lib.write(report, out / "report.html")


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
    stats = dataset_stats(data)
    (out / "dataset_stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    stats_table, classes_table = _dataset_tables(stats)
    _print_table(console, f"{data.name}: pixel statistics (exact, float64)", stats_table)
    _print_table(console, f"{data.name}: images per class", classes_table)

    train = data.train
    names = data.class_names
    counts = {split: stats["splits"][split] for split in ("train", "test")}
    samples = sample_images(train.images, train.labels, data.num_classes, SAMPLES_PER_CLASS)
    figures = [
        _Plot(
            "sample_images", "Sample images per class",
            plots.sample_grid(samples, names, f"{data.name}: random training images per class"),
            "Drawn with a fixed seed from the training split.", half=True,
        ),
        _Plot(
            "mean_intensity", "Average intensity",
            plots.mean_intensity_heatmap(
                mean_image(train.images),
                f"{data.name}: mean of the {len(train.labels):,} training images",
            ),
            "Where the digits are written: the pixel-wise mean over the training split.",
            half=True,
        ),
        _Plot(
            "pixel_histogram", "Pixel value histogram",
            plots.pixel_histogram(
                {s: np.asarray(c["pixel_value_counts"]) for s, c in counts.items()},
                f"{data.name}: pixel values are nearly binary (mostly 0, else often near 255)",
            ),
            "Share of all pixels at each value; log-scale y.",
        ),
        _Plot(
            "class_distribution", "Class distribution",
            plots.class_distribution(
                {s: list(c["class_counts"].values()) for s, c in counts.items()},
                names, f"{data.name}: images per class",
            ),
        ),
        _Plot(
            "class_mean_images", "Mean image per class",
            plots.class_mean_images(
                class_mean_images(train.images, train.labels, data.num_classes), names,
                f"{data.name}: mean training image of each class",
            ),
        ),
    ]  # fmt: skip
    train_stats = stats["splits"]["train"]
    snippet = (
        f"# {data.name} training split, exact over all pixels (population std)\n"
        f"MEAN_0_1, STD_0_1 = {train_stats['pixel_mean_0_1']!r}, {train_stats['pixel_std_0_1']!r}\n"
        f"MEAN_0_255, STD_0_255 = {train_stats['pixel_mean_0_255']!r}, "
        f"{train_stats['pixel_std_0_255']!r}"
    )
    return report_lib.DatasetSection(
        name=data.name,
        tables=[("Pixel statistics", stats_table), ("Images per class", classes_table)],
        figures=_save_figures(figures, out / "figures" / "dataset"),
        snippet=snippet,
    )


def _dataset_tables(stats: Mapping[str, Any]) -> tuple[report_lib.Table, report_lib.Table]:
    """Pixel statistics (one row per statistic, one column per split) and class counts."""
    splits = list(stats["splits"])
    shape = "x".join(str(s) for s in stats["image_shape"])
    pixel_rows = [["images", *(f"{stats['splits'][s]['num_images']:,}" for s in splits)]]
    pixel_rows.append(["image shape", *([shape] * len(splits))])
    for label, key, spec in _PIXEL_ROWS:
        pixel_rows.append([label, *(spec.format(stats["splits"][s][key]) for s in splits)])
    classes = ["", *["num"] * len(splits)]
    pixel_table = report_lib.Table(["statistic", *splits], pixel_rows, classes)
    class_rows = [
        [name, *(f"{stats['splits'][s]['class_counts'][name]:,}" for s in splits)]
        for name in stats["class_names"]
    ]
    return pixel_table, report_lib.Table(["class", *splits], class_rows, classes)


_PIXEL_ROWS = (
    ("mean (0-255)", "pixel_mean_0_255", "{!r}"),
    ("std (0-255)", "pixel_std_0_255", "{!r}"),
    ("mean [0, 1]", "pixel_mean_0_1", "{!r}"),
    ("std [0, 1]", "pixel_std_0_1", "{!r}"),
    ("pixels = 0", "fraction_zero", "{:.4%}"),
    ("pixels = 255", "fraction_255", "{:.4%}"),
)


def _runs_part(
    analyses: Sequence[RunAnalysis], out: Path, console: Console
) -> tuple[list[report_lib.RunSection], report_lib.Table | None, list[report_lib.Figure]]:
    """runs.csv, the comparison table and figure, and one report section per run, best first."""
    pairs = zip(analyses, _unique_slugs([a.run.name for a in analyses]), strict=True)
    ordered = sorted(((comparison_row(a), a, slug) for a, slug in pairs),
                     key=lambda item: _accuracy_order(item[0]))  # fmt: skip
    rows = [row for row, _, _ in ordered]
    write_runs_csv(rows, out / "runs.csv")
    if not rows:
        return [], None, []
    table = _comparison_table(rows)
    _print_table(console, "runs, best test accuracy first", table, _CONSOLE_RUN_COLUMNS)
    sections = [_run_section(a, slug, out / "figures" / "runs" / slug) for _, a, slug in ordered]
    curves = {a.run.name: a.curves for _, a, _ in ordered if len(a.curves["epoch"])}
    figures = []
    if curves:
        png = plots.comparison_curves(curves, "Runs compared")
        caption = "Test accuracy and train loss at each epoch end, one line per run."
        figures = _save_figures([_Plot("comparison_curves", "Runs compared", png, caption)],
                                out / "figures")  # fmt: skip
    return sections, table, figures


# (header, runs.csv key, format, CSS class) of each column of the report's comparison table.
_TABLE_COLUMNS = (
    ("run", "name", "{}", ""),
    ("dataset", "dataset", "{}", ""),
    ("optimizer", "optimizer", "{}", ""),
    ("lr", "lr", "{:g}", "num"),
    ("schedule", "schedule", "{}", ""),
    ("batch", "batch_size", "{}", "num"),
    ("epochs", "epochs", "{}", "num"),
    ("test acc", "test/accuracy", "{:.2%}", "num"),
    ("macro F1", "test/f1_macro", "{:.4f}", "num"),
    ("macro AUROC", "test/auroc_macro", "{:.5f}", "num"),
    ("train time", "time/train_seconds", "{:.1f} s", "num"),
    ("examples/s", "train/examples_per_sec", "{:,.0f}", "num"),
    ("status", "status", "{}", ""),
)


def _comparison_table(rows: Sequence[Mapping[str, Any]]) -> report_lib.Table:
    body = []
    for row in rows:
        cells: list[Any] = [_fmt(row[key], spec) for _, key, spec, _ in _TABLE_COLUMNS]
        if row["epoch"] is not None and row["epochs"] is not None and row["epoch"] != row["epochs"]:
            cells[6] = f"{_fmt(row['epoch'], '{:g}')}/{row['epochs']}"  # a run that stopped early
        cells[-1] = report_lib.markup_badge(row["status"])
        body.append(cells)
    headers = [header for header, *_ in _TABLE_COLUMNS]
    return report_lib.Table(headers, body, [css for *_, css in _TABLE_COLUMNS])


def _run_section(analysis: RunAnalysis, slug: str, figures_dir: Path) -> report_lib.RunSection:
    run, names, title = analysis.run, analysis.class_names, analysis.run.name
    figures = []
    if len(analysis.curves["epoch"]) or len(analysis.curves["step_epoch"]):
        png = plots.learning_curves(analysis.curves, f"{title}: learning curves")
        figures.append(_Plot("learning_curves", "Learning curves", png, f"From {METRICS_FILE}."))
    if analysis.confusion_CxC is not None:
        cm = analysis.confusion_CxC
        heading = f"{title}: confusion matrix ({cm.sum():,} test images, accuracy "
        heading += f"{np.trace(cm) / max(cm.sum(), 1):.2%})"
        caption = f"Counts from {analysis.confusion_source}; rows are the true class."
        png = plots.confusion_heatmap(cm, names, heading)
        figures.append(_Plot("confusion_matrix", "Confusion matrix", png, caption, half=True))
    if analysis.per_class is not None:
        scores = {k: analysis.per_class[k] for k in ("precision", "recall", "f1")}
        png = plots.per_class_bars(scores, names, f"{title}: per-class scores")
        caption = "From the confusion counts."
        figures.append(_Plot("per_class_scores", "Per-class scores", png, caption, half=True))
    if analysis.ranking is not None:
        r = analysis.ranking
        png = plots.roc_pr_curves(
            r.roc, r.pr, r.auroc_C, r.average_precision_C, names,
            f"{title}: one-vs-rest ROC and PR curves",
        )  # fmt: skip
        figures.append(
            _Plot("roc_pr_curves", "ROC and PR curves", png, f"From {PREDICTIONS_FILE}.")
        )
    mistakes = analysis.mistakes
    if mistakes is not None and mistakes.images_KxHxW is not None and len(mistakes.indices_K):
        png = plots.mistakes_gallery(
            mistakes.images_KxHxW, mistakes.true_K, mistakes.predicted_K, mistakes.confidence_K,
            names, f"{title}: most confident mistakes",
        )  # fmt: skip
        caption = "Confidence is the predicted class's probability. Test indices: "
        caption += ", ".join(str(i) for i in mistakes.indices_K) + "."
        if mistakes.images_from:
            caption += f" Images from {mistakes.images_from}."
        figures.append(_Plot("misclassified", "Most confident mistakes", png, caption))
    return report_lib.RunSection(
        name=run.name,
        slug=slug,
        path=str(run.path),
        status=run.status,
        message=str(run.summary.get("message") or ""),
        problems=list(run.problems),
        facts=_run_facts(run),
        figures=_save_figures(figures, figures_dir),
        notes=list(analysis.notes),
    )


def _run_facts(run: Run) -> list[tuple[str, str]]:
    """Label/value lines about a run; a line whose values are all missing is left out."""
    m, c, env = run.final_metrics(), run.config, run.environment
    best = _values(m, ("best/test/accuracy",), "{:.2%}")
    if best and _number(m.get("best/step")) is not None:
        best += f" (step {m['best/step']})"
    progress = ""
    if _number(m.get("step")) is not None:
        progress = f"epoch {_fmt(m.get('epoch'), '{:g}')} of {_fmt(c.get('epochs'), '{}')}, "
        progress += f"step {m['step']}"
    facts = [
        ("test accuracy", _values(m, ("test/accuracy",), "{:.2%}")),
        ("best test accuracy", best),
        ("test loss", _values(m, ("test/loss",), "{:.4f}")),
        ("macro F1 / AUROC / AP", _values(m, ("test/f1_macro", "test/auroc_macro",
                                              "test/average_precision_macro"), "{:.4f}")),
        ("progress", progress),
        ("time: compile / train / total", _values(m, ("time/compile_seconds",
                                                      "time/train_seconds",
                                                      "time/total_seconds"), "{:.1f} s")),
        ("train examples/s", _values(m, ("train/examples_per_sec",), "{:,.0f}")),
        ("checkpoints", ", ".join(f"{k} at step {v[-1]}" for k, v in run.checkpoints.items())),
    ]  # fmt: skip
    if c:
        model = f"conv {c.get('conv_features')}, dense {c.get('dense_features')}, "
        model += f"norm {c.get('norm')}, dropout {c.get('dropout')}"
        optimisation = f"{c.get('optimizer')}, lr {c.get('lr')}, {c.get('schedule')} schedule, "
        optimisation += f"batch {c.get('batch_size')}, weight decay {c.get('weight_decay')}, "
        optimisation += f"seed {c.get('seed')}"
        data = f"{c.get('dataset')} from {c.get('data_dir') or 'the default'} ({c.get('source')})"
        facts += [("model", model), ("optimisation", optimisation), ("data", data)]
    keys = ("backend", "device_kind", "device_count", "jax", "flax", "git_commit", "started")
    facts.append(("environment", ", ".join(f"{k} {env[k]}" for k in keys if env.get(k))))
    return [(label, value) for label, value in facts if value]


def _values(metrics_: Mapping[str, Any], keys: Sequence[str], spec: str) -> str:
    """`spec`-formatted values joined by ' / ' ('–' for a missing one); '' if all are missing."""
    values = [_number(metrics_.get(k)) for k in keys]
    if all(v is None for v in values):
        return ""
    return " / ".join(_fmt(v, spec) for v in values)


@dataclasses.dataclass(frozen=True)
class _Plot:
    """A rendered figure on its way to `figures/STEM.png` and the report."""

    stem: str
    title: str
    png: bytes
    caption: str = ""
    half: bool = False


def _save_figures(figures: Sequence[_Plot], folder: Path) -> list[report_lib.Figure]:
    folder.mkdir(parents=True, exist_ok=True)
    for figure in figures:
        (folder / f"{figure.stem}.png").write_bytes(figure.png)
    return [report_lib.Figure(f.title, f.png, f.caption, f.half) for f in figures]


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


def _series(events: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    values = [_number(e.get(key)) for e in events]
    return np.array([math.nan if v is None else v for v in values], np.float64)


def _number(value: Any) -> float | None:
    """A finite number from JSON, or None (missing, null, NaN, or not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _fmt(value: Any, spec: str) -> str:
    if value is None or value == "":
        return "–"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _unique_slugs(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    slugs = []
    for name in names:
        base = report_lib.slug(name)
        seen[base] = seen.get(base, 0) + 1
        slugs.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return slugs
