"""Binary ranking metrics, exact and tie-aware: ROC and PR curves, AUROC, average precision,
and the ranking machinery the one-vs-rest metrics share (see the package docstring)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mnist_jax.metrics.counts import _mask_or_ones, _ratio

# Largest stacked-score length for which the int32 fixed-point sums below cannot overflow.
MAX_RANKED_EXAMPLES = 2**29 - 1


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
