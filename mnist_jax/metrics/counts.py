"""Count-based metrics: confusion counts (additive across batches and devices) and what derives
from them: accuracy, precision, recall, F1."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# --------------------------------------------------------------------------------------------
# Count-based metrics
# --------------------------------------------------------------------------------------------


def _mask_or_ones(mask_N: jax.Array | None, n: int) -> jax.Array:
    if mask_N is None:
        return jnp.ones((n,), dtype=bool)
    return jnp.asarray(mask_N).astype(bool)


def confusion_matrix(
    labels_N: jax.Array,
    predictions_N: jax.Array,
    num_classes: int,
    mask_N: jax.Array | None = None,
) -> jax.Array:
    """Counts of (true class, predicted class) pairs: `int32 [C, C]`, rows true, columns predicted.

    The counts are additive, so the matrix of a whole set is the sum of its batches' (or devices')
    matrices. Entries with `mask_N` False count nothing, and so do entries whose label or prediction
    lies outside `[0, num_classes)`, which lets a padded last batch carry garbage. `num_classes`
    must be static under `jax.jit`.
    """
    labels = jnp.asarray(labels_N).astype(jnp.int32)
    predictions = jnp.asarray(predictions_N).astype(jnp.int32)
    counted = (
        _mask_or_ones(mask_N, labels.shape[0])
        & (labels >= 0)
        & (labels < num_classes)
        & (predictions >= 0)
        & (predictions < num_classes)
    )
    # Uncounted entries go to an out-of-bounds cell that the scatter drops.
    cell = jnp.where(counted, labels * num_classes + predictions, num_classes * num_classes)
    counts = jnp.zeros((num_classes * num_classes,), jnp.int32).at[cell].add(1, mode="drop")
    return counts.reshape(num_classes, num_classes)


def _ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator in float32, and 0 where the denominator is 0 (zero_division=0)."""
    numerator = numerator.astype(jnp.float32)
    denominator = denominator.astype(jnp.float32)
    safe = jnp.where(denominator > 0, denominator, 1.0)
    return jnp.where(denominator > 0, numerator / safe, 0.0)


def accuracy(confusion_CxC: jax.Array) -> jax.Array:
    """Fraction of counted examples whose prediction is their label (scalar float32).

    An empty matrix gives 0, following the same zero_division=0 rule as `precision_recall_f1`.
    """
    confusion = jnp.asarray(confusion_CxC)
    return _ratio(jnp.trace(confusion), jnp.sum(confusion))


def precision_recall_f1(confusion_CxC: jax.Array) -> dict[str, jax.Array]:
    """Per-class precision, recall, F1 and support, and their macro, micro and weighted averages.

    Per class `c` (arrays of shape `[C]`): precision = TP / predicted-as-c, recall = TP / support,
    F1 = 2 TP / (2 TP + FP + FN), support = number of true examples of `c` (int32).

    zero_division rule, as scikit-learn's `zero_division=0`: a class never predicted has
    precision 0, a class with no examples has recall 0, and F1 is 0 when TP + FP + FN = 0.

    Averages (scalars), matching scikit-learn's `precision_recall_fscore_support` with its default
    `labels=None`:
    * macro: unweighted mean over the classes *present*, i.e. occurring among the labels or the
      predictions; a class absent from both has no say (and every value is 0 if none is present).
    * micro: from the summed counts; for single-label classification all three equal accuracy.
    * weighted: mean weighted by support (0 when there is no example at all).
    """
    confusion = jnp.asarray(confusion_CxC).astype(jnp.int32)
    true_positives = jnp.diagonal(confusion)
    support = jnp.sum(confusion, axis=1)
    predicted = jnp.sum(confusion, axis=0)
    precision = _ratio(true_positives, predicted)
    recall = _ratio(true_positives, support)
    f1 = _ratio(2 * true_positives, support + predicted)

    present = (support > 0) | (predicted > 0)
    num_present = jnp.sum(present)
    total_support = jnp.sum(support)
    micro = {
        "precision": _ratio(jnp.sum(true_positives), jnp.sum(predicted)),
        "recall": _ratio(jnp.sum(true_positives), total_support),
        "f1": _ratio(2 * jnp.sum(true_positives), total_support + jnp.sum(predicted)),
    }
    result = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    for name, per_class in (("precision", precision), ("recall", recall), ("f1", f1)):
        result[f"{name}_macro"] = _ratio(jnp.sum(jnp.where(present, per_class, 0.0)), num_present)
        result[f"{name}_micro"] = micro[name]
        result[f"{name}_weighted"] = _ratio(jnp.sum(per_class * support), total_support)
    return result
