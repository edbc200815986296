"""Classification metrics in pure `jax.numpy`: confusion counts, precision/recall/F1, ROC and PR.

Two kinds of metric live here, and the split decides how evaluation is written:

* **Count-based** metrics derive from a confusion matrix of `int32` counts. The matrix is additive,
  so batches (and devices) each add their counts and the sum is divided once, at the end.
* **Ranking** metrics (ROC and PR curves, AUROC, average precision) are not additive: they take the
  whole stacked set of scores. Padding is excluded through `mask_N`.

Every device function works under `jax.jit` with fixed output shapes, never talks to the host
(but for ranking host float64 scores, below), and gives the same answer jitted or eager.
Masked-out entries may hold anything (NaN scores, labels out of range): they count nothing.

One rule for labels, in every metric: **a label outside `[0, C)` counts nothing, exactly as if its
example were masked out.** `confusion_matrix` drops it (and an out-of-range prediction); the
one-vs-rest ranking metrics and `classification_summary` drop the example from every class's
ranking, so it is neither a positive nor a negative; the binary ranking functions, whose labels
are `positives_N` (two classes), drop an entry that is neither 0/False nor 1/True. This keeps the
shapes fixed (nothing is filtered), so it works under `jit`.

Ranking metrics are exact, not a threshold grid: ties are handled like scikit-learn's
`roc_auc_score` (average ranks, i.e. a tie counts one half) and `average_precision_score`
(tied scores form one step). They stay exact in float32 without float64: counts are `int32` and
the sums of fractions are carried out in integer fixed point (see `_exact_mean_of_fractions`),
so the only rounding is the final float32 division (a few units in the last place).

Float64 scores are ranked exactly. With `jax_enable_x64` off, JAX would round them to float32 and
merge distinct scores into ties. Every ranking metric depends only on the order and the ties of
the scores, so host (numpy) float64 scores are replaced, on the host, by their exact dense ranks
before anything reaches the device, and returned thresholds are mapped back to the original
float64 values (a host `np.ndarray`), equal to scikit-learn's. This needs the scores on the host:
under `jax.jit` with x64 off, float64 arguments are already float32 when these functions see them,
so call them eagerly for float64 scores, or enable `jax_enable_x64`, or cast to float32 knowingly.
(A host float64 constant inside a traced function is still ranked exactly, but float64 thresholds
cannot be returned from there: the curve functions refuse it with a `ValueError` saying so.)
With x64 on, float64 scores are sorted as they are.

`to_record` is the host-side boundary: it is the one place metric names (`"test/accuracy"`,
`"train/loss"`, `"test/precision/3"`) are defined.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Largest stacked-score length for which the int32 fixed-point sums below cannot overflow.
MAX_RANKED_EXAMPLES = 2**29 - 1


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


# --------------------------------------------------------------------------------------------
# Ranking metrics
# --------------------------------------------------------------------------------------------


class _Ranked(NamedTuple):
    """Examples sorted by descending score (masked-out ones last), with tie-group counts.

    For each sorted position, the `*_through` counts are cumulative up to and including the whole
    tie group of that position; `positives_above` counts positives with a strictly higher score.
    Positions past the last valid example carry the totals.
    """

    scores_N: jax.Array
    valid_N: jax.Array
    positive_N: jax.Array
    negative_N: jax.Array
    is_group_end_N: jax.Array
    positives_through_N: jax.Array
    negatives_through_N: jax.Array
    positives_above_N: jax.Array
    num_positives: jax.Array
    num_negatives: jax.Array


# The rank that stands for a threshold above every score (`+inf`) when scores are ranks.
_ABOVE_EVERY_RANK = np.iinfo(np.int32).max


def _device_scores(scores: Any) -> tuple[jax.Array, np.ndarray | None]:
    """Scores ready to rank on the device, and the sorted distinct values if they became ranks.

    Host scores wider than float32 (float64) with x64 off would be rounded to float32, merging
    distinct values into ties; they are replaced here by their exact dense ranks (`int32`), which
    have the same order and ties. Thresholds computed on ranks index the returned distinct values.
    Anything else keeps its values: floats sort in their own dtype (at least float32, which keeps
    the order and ties of every narrower float), other dtypes are cast to float32.
    """
    if not isinstance(scores, jax.Array) and not jax.config.jax_enable_x64:
        host = np.asarray(scores)
        if np.issubdtype(host.dtype, np.floating) and host.dtype.itemsize > 4:
            distinct, ranks = np.unique(host, return_inverse=True)
            return jnp.asarray(ranks.reshape(host.shape), jnp.int32), distinct
    scores = jnp.asarray(scores)
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        return scores.astype(jnp.float32), None
    return scores.astype(jnp.promote_types(scores.dtype, jnp.float32)), None


def _original_thresholds(thresholds: jax.Array, distinct: np.ndarray | None) -> Any:
    """Thresholds in the caller's score values: ranks mapped back to the distinct scores."""
    if distinct is None:
        return thresholds
    if isinstance(thresholds, jax.core.Tracer):  # host float64 scores inside a traced function
        raise ValueError(
            "float64 scores under jax.jit (or another transformation) with jax_enable_x64 off: "
            "their thresholds cannot be float64 there. Call this function eagerly, cast the "
            "scores to float32 knowingly (ties below float32 precision merge), or enable "
            "jax_enable_x64."
        )
    ranks = np.asarray(jax.device_get(thresholds))
    above_every = ranks == _ABOVE_EVERY_RANK
    return np.where(above_every, np.inf, distinct[np.where(above_every, 0, ranks)])


def _binary_labels(positives_N: jax.Array, mask_N: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """`(positive_N, counted_N)`: booleans are labels already; other labels count only as 0 or 1."""
    positives = jnp.asarray(positives_N)
    counted = _mask_or_ones(mask_N, positives.shape[0])
    if positives.dtype != jnp.bool_:
        counted = counted & ((positives == 0) | (positives == 1))
    return positives.astype(bool), counted


def _one_vs_rest_labels(
    labels_N: jax.Array, num_classes: int, mask_N: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """`(positives_CxN, counted_N)`: "label == c" per class; labels outside [0, C) uncounted."""
    labels = jnp.asarray(labels_N)
    counted = _mask_or_ones(mask_N, labels.shape[0]) & (labels >= 0) & (labels < num_classes)
    return labels[None, :] == jnp.arange(num_classes)[:, None], counted


def _rank(scores: jax.Array, positive_N: jax.Array, valid: jax.Array) -> _Ranked:
    """Sorts the examples by descending score (float, or `int32` ranks), the `valid` ones first."""
    n = scores.shape[0]
    if not 0 < n <= MAX_RANKED_EXAMPLES:
        raise ValueError(f"ranking metrics take 1 to {MAX_RANKED_EXAMPLES} scores, got {n}")
    positive = positive_N & valid
    invalid_first_key = (~valid).astype(jnp.int32)
    _, neg_scores, positive, valid = lax.sort(
        (invalid_first_key, -scores, positive, valid), num_keys=2
    )
    scores = -neg_scores
    negative = valid & ~positive

    # -0.0 == 0.0 here, as in scikit-learn's np.diff-based grouping.
    same_as_next = jnp.concatenate([(scores[1:] == scores[:-1]) & valid[1:], jnp.array([False])])
    is_group_end = valid & ~same_as_next
    positives_cum = jnp.cumsum(positive, dtype=jnp.int32)
    negatives_cum = jnp.cumsum(negative, dtype=jnp.int32)
    num_positives = positives_cum[-1]
    num_negatives = negatives_cum[-1]

    def through_group(cumulative: jax.Array, total: jax.Array) -> jax.Array:
        sentinel = jnp.iinfo(jnp.int32).max
        at_ends = jnp.where(is_group_end, cumulative, sentinel)
        nearest_end_at_or_after = lax.cummin(at_ends, reverse=True)
        return jnp.where(nearest_end_at_or_after == sentinel, total, nearest_end_at_or_after)

    through_prev_end = lax.cummax(jnp.where(is_group_end, positives_cum, 0))
    positives_above = jnp.concatenate([jnp.zeros((1,), jnp.int32), through_prev_end[:-1]])
    return _Ranked(
        scores_N=scores,
        valid_N=valid,
        positive_N=positive,
        negative_N=negative,
        is_group_end_N=is_group_end,
        positives_through_N=through_group(positives_cum, num_positives),
        negatives_through_N=through_group(negatives_cum, num_negatives),
        positives_above_N=positives_above,
        num_positives=num_positives,
        num_negatives=num_negatives,
    )


def _exact_mean_of_fractions(
    numerators_N: jax.Array, denominators_N: jax.Array, weights_N: jax.Array
) -> jax.Array:
    """sum(w * num / den) / sum(w) for 0 <= num <= den and 0/1 weights, exact to float32 rounding.

    A float32 sum of N fractions can lose up to N ulps and depends on the reduction order. Instead
    each fraction is expanded by integer long division into base-2^d digits (d chosen statically
    so that no int32 product or digit sum can overflow), the digits are summed exactly in int32,
    and only the few digit sums meet float32. The truncated tail is below 2^-32 of the result, and
    since integer sums are order-free the answer is bit-identical jitted, eager or on any backend.
    """
    n = numerators_N.shape[0]
    max_denominator = 2 * n  # the largest denominator any caller passes
    digit_bits = max(1, min(16, 31 - max_denominator.bit_length(), 30 - n.bit_length()))
    num_digits = math.ceil(32 / digit_bits)
    counted = weights_N.astype(bool)
    denominators = jnp.where(counted & (denominators_N > 0), denominators_N, 1).astype(jnp.int32)
    remainder = jnp.where(counted, numerators_N, 0).astype(jnp.int32)
    total = jnp.zeros((), jnp.float32)
    for place in range(1, num_digits + 1):
        shifted = remainder << digit_bits
        digit = shifted // denominators
        remainder = shifted - digit * denominators
        digit_sum = jnp.sum(digit, dtype=jnp.int32).astype(jnp.float32)
        total = total + digit_sum * np.float32(2.0 ** (-digit_bits * place))
    return total / jnp.sum(counted, dtype=jnp.int32).astype(jnp.float32)


def _auroc_from_ranked(ranked: _Ranked) -> jax.Array:
    # Mann-Whitney: each negative scores (positives strictly above + half the tied positives) / P.
    # Doubled to stay integral: (above + through) / (2 P).
    value = _exact_mean_of_fractions(
        ranked.positives_above_N + ranked.positives_through_N,
        jnp.broadcast_to(2 * ranked.num_positives, ranked.positives_through_N.shape),
        ranked.negative_N,
    )
    defined = (ranked.num_positives > 0) & (ranked.num_negatives > 0)
    return jnp.where(defined, value, jnp.nan)


def _average_precision_from_ranked(ranked: _Ranked) -> jax.Array:
    # Each positive contributes the precision at its tie group's threshold, weighted 1/P.
    value = _exact_mean_of_fractions(
        ranked.positives_through_N,
        ranked.positives_through_N + ranked.negatives_through_N,
        ranked.positive_N,
    )
    return jnp.where(ranked.num_positives > 0, value, jnp.nan)


def _thresholds(ranked: _Ranked) -> jax.Array:
    """`[N + 1]`: `+inf` (or `_ABOVE_EVERY_RANK` for ranks), then each sorted position's score."""
    dtype = ranked.scores_N.dtype
    above_every = jnp.inf if jnp.issubdtype(dtype, jnp.floating) else _ABOVE_EVERY_RANK
    lowest = jnp.min(jnp.where(ranked.valid_N, ranked.scores_N, above_every))
    thresholds = jnp.where(ranked.valid_N, ranked.scores_N, lowest)
    return jnp.concatenate([jnp.full((1,), above_every, dtype), thresholds])


def _binary(
    from_ranked: Any, scores_N: jax.Array, positives_N: jax.Array, mask_N: jax.Array | None
) -> tuple[Any, np.ndarray | None]:
    """`from_ranked` of one binary problem, and the distinct scores if the scores became ranks."""
    scores, distinct = _device_scores(scores_N)
    positive, counted = _binary_labels(positives_N, mask_N)
    return from_ranked(_rank(scores, positive, counted)), distinct


def _binary_curve(
    from_ranked: Any, scores_N: jax.Array, positives_N: jax.Array, mask_N: jax.Array | None
) -> tuple[Any, Any, Any, Any]:
    """A curve `(x, y, thresholds, valid)` of one binary problem, thresholds in the score values
    the caller gave."""
    (x, y, thresholds, valid), distinct = _binary(from_ranked, scores_N, positives_N, mask_N)
    return x, y, _original_thresholds(thresholds, distinct), valid


def _per_class(
    from_ranked: Any, probs_NxC: jax.Array, labels_N: jax.Array, mask_N: jax.Array | None
) -> tuple[Any, np.ndarray | None]:
    """`from_ranked` of every class against the rest (vmapped, one sort per class), and the
    distinct scores if the scores became ranks (all columns ranked together, which keeps each
    column's order and ties)."""
    probs, distinct = _device_scores(probs_NxC)
    positives_CxN, counted = _one_vs_rest_labels(labels_N, probs.shape[1], mask_N)

    def one_class(scores_N: jax.Array, positives_N: jax.Array) -> Any:
        return from_ranked(_rank(scores_N, positives_N, counted))

    return jax.vmap(one_class, in_axes=(1, 0))(probs, positives_CxN), distinct


def roc_curve(
    scores_N: jax.Array, positives_N: jax.Array, mask_N: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The exact ROC curve: `(fpr, tpr, thresholds, valid)`, each of fixed shape `[N + 1]`.

    The points where `valid` is True are exactly those of
    `sklearn.metrics.roc_curve(..., drop_intermediate=False)`, in the same order: first
    `(0, 0)` at threshold `+inf`, then one point per distinct score, descending. The other
    entries repeat a neighbouring real point, so the unfiltered arrays stay monotone and a
    trapezoid over them still gives the exact area. fpr is NaN when there is no negative, tpr
    when there is no positive (as scikit-learn, which also warns).

    Entries with `mask_N` False count nothing, and so do labels other than 0/1 in `positives_N`.
    Host float64 scores (x64 off) are ranked exactly and give float64 host thresholds (module
    docstring).
    """
    return _binary_curve(_roc_from_ranked, scores_N, positives_N, mask_N)


def _roc_from_ranked(ranked: _Ranked) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    zero = jnp.zeros((1,), jnp.int32)
    fpr = _ratio_nan(jnp.concatenate([zero, ranked.negatives_through_N]), ranked.num_negatives)
    tpr = _ratio_nan(jnp.concatenate([zero, ranked.positives_through_N]), ranked.num_positives)
    valid = jnp.concatenate([jnp.array([True]), ranked.is_group_end_N])
    return fpr, tpr, _thresholds(ranked), valid


def _ratio_nan(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator in float32, NaN everywhere when the denominator is 0."""
    denominator = denominator.astype(jnp.float32)
    safe = jnp.where(denominator > 0, denominator, 1.0)
    return jnp.where(denominator > 0, numerator.astype(jnp.float32) / safe, jnp.nan)


def auroc(
    scores_N: jax.Array, positives_N: jax.Array, mask_N: jax.Array | None = None
) -> jax.Array:
    """Exact area under the ROC curve, equal to `sklearn.metrics.roc_auc_score` (scalar float32).

    Rank-based (Mann-Whitney U with average ranks, so a tied positive/negative pair counts one
    half), not a threshold grid. NaN when only one class is present, where it is undefined.
    Entries with `mask_N` False count nothing, and so do labels other than 0/1 in `positives_N`;
    host float64 scores are ranked exactly (module docstring).
    """
    return _binary(_auroc_from_ranked, scores_N, positives_N, mask_N)[0]


def precision_recall_curve(
    scores_N: jax.Array, positives_N: jax.Array, mask_N: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The exact precision-recall curve: `(precision, recall, thresholds, valid)`, shape `[N + 1]`.

    Order and values as `sklearn.metrics.precision_recall_curve` (thresholds increasing, recall
    decreasing, ending at precision 1, recall 0) once filtered by `valid`. scikit-learn gives that
    final point no threshold; here it has `+inf`, so `thresholds[valid][:-1]` are scikit-learn's.
    Invalid entries repeat a neighbouring real point. With no positive at all, recall is 1 at every
    threshold, as in scikit-learn.

    Entries with `mask_N` False count nothing, and so do labels other than 0/1 in `positives_N`.
    Host float64 scores (x64 off) are ranked exactly and give float64 host thresholds (module
    docstring).
    """
    return _binary_curve(_precision_recall_from_ranked, scores_N, positives_N, mask_N)


def _precision_recall_from_ranked(
    ranked: _Ranked,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    through = ranked.positives_through_N
    predicted = through + ranked.negatives_through_N
    precision = _ratio(through, predicted)
    recall = jnp.where(
        ranked.num_positives > 0, _ratio(through, ranked.num_positives), jnp.float32(1.0)
    )
    thresholds = _thresholds(ranked)
    precision = jnp.concatenate([jnp.ones((1,), jnp.float32), precision])
    recall = jnp.concatenate([jnp.zeros((1,), jnp.float32), recall])
    valid = jnp.concatenate([jnp.array([True]), ranked.is_group_end_N])
    return precision[::-1], recall[::-1], thresholds[::-1], valid[::-1]


def average_precision(
    scores_N: jax.Array, positives_N: jax.Array, mask_N: jax.Array | None = None
) -> jax.Array:
    """Average precision, equal to `sklearn.metrics.average_precision_score` (scalar float32).

    The step-wise sum over distinct thresholds of (recall increase) x precision, tied scores
    forming one step; no interpolation. NaN when there is no positive: it is undefined there
    (scikit-learn returns 0 with a warning), and NaN lets macro averages skip the class.
    Entries with `mask_N` False count nothing, and so do labels other than 0/1 in `positives_N`;
    host float64 scores are ranked exactly (module docstring).
    """
    return _binary(_average_precision_from_ranked, scores_N, positives_N, mask_N)[0]


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
) -> dict[str, jax.Array]:
    """Every classification metric of a split, on the device.

    From the counts: `"accuracy"` and all keys of `precision_recall_f1`. When `probs_NxC` (the
    stacked class scores) and `labels_N` are given, also one-vs-rest `"auroc"` and
    `"average_precision"` (`[C]`) and their `"auroc_macro"` and `"average_precision_macro"`:
    the mean over the classes where the metric is defined (NaN-skipping), NaN if there is none.

    The ranking metrics follow the module's label rule: an example whose label lies outside
    `[0, C)` counts nothing, as if masked out (as `confusion_matrix` drops it from the counts).
    Host float64 probabilities (x64 off) are ranked exactly (module docstring).
    """
    summary = {"accuracy": accuracy(confusion_CxC), **precision_recall_f1(confusion_CxC)}
    if probs_NxC is None:
        return summary
    if labels_N is None:
        raise ValueError("classification_summary needs labels_N together with probs_NxC")
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
COMPILE_SECONDS = metric_key("time", "compile_seconds")
TRAIN_SECONDS = metric_key("time", "train_seconds")
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
