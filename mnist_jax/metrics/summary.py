"""Every class against the rest, and every metric of a split at once: the one-vs-rest curves
and areas, and `classification_summary`."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax.metrics.counts import accuracy, precision_recall_f1
from mnist_jax.metrics.ranking import (  # the shared ranking machinery, package-private
    _auroc_from_ranked,
    _average_precision_from_ranked,
    _original_thresholds,
    _per_class,
    _precision_recall_from_ranked,
    _Ranked,
    _roc_from_ranked,
)


def one_vs_rest_auroc(
    probs_NxC: jax.Array, labels_N: jax.Array, mask_N: jax.Array | None = None
) -> jax.Array:
    """Per-class AUROC `[C]`: class c's score column against "label == c". NaN for a class that
    is absent (or is the only one present). An example whose label lies outside `[0, C)` counts
    nothing, as if masked out."""
    return _per_class(_auroc_from_ranked, probs_NxC, labels_N, mask_N)[0]


def one_vs_rest_average_precision(
    probs_NxC: jax.Array, labels_N: jax.Array, mask_N: jax.Array | None = None
) -> jax.Array:
    """Per-class average precision `[C]`: class c's score column against "label == c". NaN for
    a class with no example. An example whose label lies outside `[0, C)` counts nothing, as if
    masked out."""
    return _per_class(_average_precision_from_ranked, probs_NxC, labels_N, mask_N)[0]


def _auroc_and_average_precision(ranked: _Ranked) -> tuple[jax.Array, jax.Array]:
    return _auroc_from_ranked(ranked), _average_precision_from_ranked(ranked)  # one sort, both


class OneVsRestCurves(NamedTuple):
    """Every class's one-vs-rest ROC and PR curves, `[C, N + 1]` each (see `roc_curve` and
    `precision_recall_curve`: keep the points where the `*_valid` mask is True), with the
    per-class AUROC and average precision `[C]` (NaN where undefined)."""

    fpr_CxM: jax.Array
    tpr_CxM: jax.Array
    roc_thresholds_CxM: jax.Array
    roc_valid_CxM: jax.Array
    precision_CxM: jax.Array
    recall_CxM: jax.Array
    pr_thresholds_CxM: jax.Array
    pr_valid_CxM: jax.Array
    auroc_C: jax.Array
    average_precision_C: jax.Array


def _curves_and_areas(ranked: _Ranked) -> tuple[jax.Array, ...]:
    # one sort serves both curves and both areas
    return (
        *_roc_from_ranked(ranked),
        *_precision_recall_from_ranked(ranked),
        _auroc_from_ranked(ranked),
        _average_precision_from_ranked(ranked),
    )


def one_vs_rest_curves(
    probs_NxC: jax.Array, labels_N: jax.Array, mask_N: jax.Array | None = None
) -> OneVsRestCurves:
    """ROC and PR curves, AUROC and average precision of every class against the rest, as one
    program (all classes through `vmap`, one sort per class; compile it once).

    Each class's points equal the single-class functions' (`roc_curve`, `precision_recall_curve`,
    `auroc`, `average_precision` on column c against "label == c"), so they match scikit-learn's.
    An example whose label lies outside `[0, C)` counts nothing, as if masked out. Host float64
    scores (x64 off) are ranked exactly, and both threshold arrays are then float64 host arrays
    (module docstring).
    """
    per_class, distinct = _per_class(_curves_and_areas, probs_NxC, labels_N, mask_N)
    curves = OneVsRestCurves(*per_class)
    return curves._replace(
        roc_thresholds_CxM=_original_thresholds(curves.roc_thresholds_CxM, distinct),
        pr_thresholds_CxM=_original_thresholds(curves.pr_thresholds_CxM, distinct),
    )


def curve_points(curves: OneVsRestCurves) -> tuple[list[tuple[np.ndarray, np.ndarray]], ...]:
    """Per class, the valid points of each curve on the host: ROC as (fpr, tpr) and PR as
    (recall, precision)."""
    c = jax.device_get(curves)
    roc = [(x[v], y[v]) for x, y, v in zip(c.fpr_CxM, c.tpr_CxM, c.roc_valid_CxM, strict=True)]
    pr = [
        (x[v], y[v]) for x, y, v in zip(c.recall_CxM, c.precision_CxM, c.pr_valid_CxM, strict=True)
    ]
    return roc, pr


def classification_summary(
    confusion_CxC: jax.Array,
    probs_NxC: jax.Array | None = None,
    labels_N: jax.Array | None = None,
    mask_N: jax.Array | None = None,
    *,
    curves: OneVsRestCurves | None = None,
) -> dict[str, jax.Array]:
    """Every classification metric of a split, on the device.

    From the counts: `"accuracy"` and all keys of `precision_recall_f1`. When `probs_NxC` (the
    stacked class scores) and `labels_N` are given, also one-vs-rest `"auroc"` and
    `"average_precision"` (`[C]`) and their `"auroc_macro"` and `"average_precision_macro"`:
    the mean over the classes where the metric is defined (NaN-skipping), NaN if there is none.

    The ranking metrics follow the module's label rule: an example whose label lies outside
    `[0, C)` counts nothing, as if masked out (as `confusion_matrix` drops it from the counts).
    Host float64 probabilities (x64 off) are ranked exactly (module docstring). Given the
    split's `curves` (`one_vs_rest_curves`) instead of the probabilities, the ranking metrics
    are their areas: nothing is ranked twice.
    """
    summary = {"accuracy": accuracy(confusion_CxC), **precision_recall_f1(confusion_CxC)}
    if curves is not None:
        per_class_auroc, per_class_ap = curves.auroc_C, curves.average_precision_C
    elif probs_NxC is None:
        return summary
    elif labels_N is None:
        raise ValueError("classification_summary needs labels_N together with probs_NxC")
    else:
        (per_class_auroc, per_class_ap), _ = _per_class(
            _auroc_and_average_precision, probs_NxC, labels_N, mask_N
        )
    summary["auroc"] = per_class_auroc
    summary["auroc_macro"] = _nanmean(per_class_auroc)
    summary["average_precision"] = per_class_ap
    summary["average_precision_macro"] = _nanmean(per_class_ap)
    return summary


def _nanmean(values: jax.Array) -> jax.Array:
    defined = ~jnp.isnan(values)
    count = jnp.sum(defined)
    total = jnp.sum(jnp.where(defined, values, 0.0))
    return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)


# --------------------------------------------------------------------------------------------
