"""The host side: metric names (made here and only here), the run record's keys, and
`top_mistakes`."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

# Host side: names
# --------------------------------------------------------------------------------------------


def metric_key(split: str, name: str, class_index: int | None = None) -> str:
    """The logged name of a metric: `"split/name"`, or `"split/name/class"` for a per-class one."""
    key = f"{split}/{name}"
    return key if class_index is None else f"{key}/{class_index}"


# Run-record keys made outside `to_record` (by training), named here so that readers never spell
# them out: the best epoch's test accuracy and step, and the wall-clock phases.
BEST_TEST_ACCURACY = metric_key("best", metric_key("test", "accuracy"))
BEST_STEP = metric_key("best", "step")
COMPILED_PROGRAMS = metric_key("compile", "programs")
COMPILE_CACHE_HITS = metric_key("compile", "cache_hits")
TRACED_PROGRAMS = metric_key("compile", "traced")
COMPILE_SECONDS = metric_key("time", "compile_seconds")
TRAIN_SECONDS = metric_key("time", "train_seconds")
EVAL_SECONDS = metric_key("time", "eval_seconds")
TOTAL_SECONDS = metric_key("time", "total_seconds")


def _to_python(value: Any) -> float | int | None:
    value = np.asarray(value).item()
    if isinstance(value, (bool, int)):
        return int(value)
    value = float(value)
    return None if math.isnan(value) else value


def to_record(
    split: str,
    summary: dict[str, Any],
    confusion_CxC: Any = None,
    loss: Any = None,
) -> dict[str, float | int | list | None]:
    """Flattens a summary into JSON-ready `{"split/name": value}` (on the host; fetches once).

    Scalars go under `"split/name"` (`"test/accuracy"`, `"test/loss"`, `"test/f1_macro"`),
    per-class values under `"split/name/c"` (`"test/recall/3"`, `"test/support/3"` as int), the
    confusion matrix under `"split/confusion_matrix"` as lists of ints. NaN becomes None (JSON
    null); infinities are kept. This is the one place the logged metric names are made.
    """
    if not split or "/" in split:
        raise ValueError(f"split must be a non-empty name without '/', got {split!r}")
    summary, confusion_CxC, loss = jax.device_get((dict(summary), confusion_CxC, loss))
    record: dict[str, float | int | list | None] = {}
    if "accuracy" in summary:
        record[metric_key(split, "accuracy")] = _to_python(np.asarray(summary["accuracy"]))
    if loss is not None:
        record[metric_key(split, "loss")] = _to_python(np.asarray(loss))
    for name, value in summary.items():
        array = np.asarray(value)
        if array.ndim == 0:
            record[metric_key(split, name)] = _to_python(array)
        elif array.ndim == 1:
            for class_index, item in enumerate(array):
                record[metric_key(split, name, class_index)] = _to_python(item)
        else:
            raise ValueError(f"summary entry {name!r} has shape {array.shape}; expected [] or [C]")
    if confusion_CxC is not None:
        record[metric_key(split, "confusion_matrix")] = (
            np.asarray(confusion_CxC).astype(int).tolist()
        )
    return record


def train_record(loss_sum: Any, correct: Any, count: Any) -> dict[str, float]:
    """Training loss and accuracy from the sums kept on the device, divided once."""
    count = int(count)
    return {
        metric_key("train", "loss"): float(loss_sum) / count,
        metric_key("train", "accuracy"): int(correct) / count,
    }


# --------------------------------------------------------------------------------------------
# Host side: the most confidently wrong predictions
# --------------------------------------------------------------------------------------------


def top_mistakes(probs_NxC: Any, labels_N: Any, k: int) -> np.ndarray:
    """Indices (into N) of the `k` wrong predictions with the highest predicted-class
    probability, most confident first; ties go to the lower index. Fewer when fewer are wrong.

    A prediction is the arg-max class; its confidence is that class's probability. On the host:
    the number of mistakes is data-dependent, and the galleries that use it are small.
    """
    probs = np.asarray(probs_NxC)
    predicted_N = np.argmax(probs, axis=1)
    confidence_N = probs[np.arange(len(predicted_N)), predicted_N]
    wrong = np.flatnonzero(predicted_N != np.asarray(labels_N))
    return wrong[np.argsort(-confidence_N[wrong], kind="stable")[:k]]
