"""`mnist_jax.metrics` against scikit-learn on random and adversarial, padded and merged inputs."""

from __future__ import annotations

import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from mnist_jax import metrics
from mnist_jax.metrics import ranking

TOL = 1e-6
PAD = 64  # every property-based example is padded to this size, so each function compiles once
C = 5

jit_confusion = jax.jit(metrics.confusion_matrix, static_argnames="num_classes")
jit_prf = jax.jit(metrics.precision_recall_f1)
jit_accuracy = jax.jit(metrics.accuracy)
jit_roc = jax.jit(metrics.roc_curve)
jit_auroc = jax.jit(metrics.auroc)
jit_pr = jax.jit(metrics.precision_recall_curve)
jit_ap = jax.jit(metrics.average_precision)
jit_ovr_auroc = jax.jit(metrics.one_vs_rest_auroc)
jit_ovr_ap = jax.jit(metrics.one_vs_rest_average_precision)
jit_summary = jax.jit(metrics.classification_summary)

# Fixed seed and no example database: the same examples on every run, nothing written to the tree.
hypothesis_settings = settings(max_examples=50, deadline=None, derandomize=True, database=None)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def pad(values: np.ndarray, garbage: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`values` followed by `garbage` up to PAD entries, and the mask of the real ones."""
    n = len(values)
    padded = np.concatenate([values, garbage[: PAD - n]]).astype(values.dtype)
    return padded, np.arange(PAD) < n


def garbage_scores(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Scores that would change every ranking metric if they were counted."""
    choices = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 0.5, 0.0], np.float32)
    return rng.choice(choices, size=shape)


def garbage_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(-3, C + 3, size=n).astype(np.int32)


def sk_roc(positives: np.ndarray, scores: np.ndarray):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return skm.roc_curve(positives, scores, drop_intermediate=False)


def sk_pr(positives: np.ndarray, scores: np.ndarray):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return skm.precision_recall_curve(positives, scores)


def sk_auroc(positives: np.ndarray, scores: np.ndarray) -> float:
    if positives.all() or not positives.any():
        return math.nan  # scikit-learn raises; ours is documented NaN
    return skm.roc_auc_score(positives, scores)


def sk_ap(positives: np.ndarray, scores: np.ndarray) -> float:
    if not positives.any():
        return math.nan  # scikit-learn returns 0 with a warning; ours is documented NaN
    return skm.average_precision_score(positives, scores)


def same_leaves(actual, expected) -> None:
    """Two pytrees of arrays: the same structure and bit-identical leaves."""
    actual_leaves, actual_tree = jax.tree.flatten(actual)
    expected_leaves, expected_tree = jax.tree.flatten(expected)
    assert actual_tree == expected_tree
    for actual_leaf, expected_leaf in zip(actual_leaves, expected_leaves, strict=True):
        np.testing.assert_array_equal(actual_leaf, expected_leaf)


def close(actual, expected) -> None:
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=TOL, equal_nan=True)


def check_binary(
    scores: np.ndarray, positives: np.ndarray, rng: np.random.Generator, dtype=np.float32
) -> None:
    """Every ranking function on padded, garbage-filled inputs against scikit-learn: jitted for
    float32 scores, eager for float64 ones (host scores, which are ranked exactly)."""
    scores = scores.astype(dtype)
    positives = positives.astype(bool)
    scores_p, mask = pad(scores, garbage_scores(rng, (PAD,)))
    positives_p, _ = pad(positives, rng.random(PAD) < 0.5)
    roc, pr, auroc, ap = (
        (jit_roc, jit_pr, jit_auroc, jit_ap)
        if dtype == np.float32
        else (
            metrics.roc_curve,
            metrics.precision_recall_curve,
            metrics.auroc,
            metrics.average_precision,
        )
    )

    fpr, tpr, thresholds, valid = map(np.asarray, roc(scores_p, positives_p, mask))
    sk_fpr, sk_tpr, sk_thresholds = sk_roc(positives, scores)
    close(fpr[valid], sk_fpr)
    close(tpr[valid], sk_tpr)
    np.testing.assert_array_equal(thresholds[valid], sk_thresholds.astype(dtype))

    precision, recall, thresholds, valid = map(np.asarray, pr(scores_p, positives_p, mask))
    sk_precision, sk_recall, sk_thresholds = sk_pr(positives, scores)
    close(precision[valid], sk_precision)
    close(recall[valid], sk_recall)
    np.testing.assert_array_equal(thresholds[valid][:-1], sk_thresholds)
    assert thresholds[valid][-1] == np.inf

    close(auroc(scores_p, positives_p, mask), sk_auroc(positives, scores))
    close(ap(scores_p, positives_p, mask), sk_ap(positives, scores))


def check_class_curves(curves, c: int, positives: np.ndarray, scores: np.ndarray) -> None:
    """Class `c` of `one_vs_rest_curves` (on the host) against scikit-learn on that class."""
    valid = curves.roc_valid_CxM[c]
    sk_fpr, sk_tpr, sk_thresholds = sk_roc(positives, scores)
    close(curves.fpr_CxM[c][valid], sk_fpr)
    close(curves.tpr_CxM[c][valid], sk_tpr)
    np.testing.assert_array_equal(
        curves.roc_thresholds_CxM[c][valid], sk_thresholds.astype(scores.dtype)
    )
    valid = curves.pr_valid_CxM[c]
    sk_precision, sk_recall, sk_thresholds = sk_pr(positives, scores)
    close(curves.precision_CxM[c][valid], sk_precision)
    close(curves.recall_CxM[c][valid], sk_recall)
    np.testing.assert_array_equal(curves.pr_thresholds_CxM[c][valid][:-1], sk_thresholds)
    close(curves.auroc_C[c], sk_auroc(positives, scores))
    close(curves.average_precision_C[c], sk_ap(positives, scores))


def sk_prf(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """scikit-learn's answer for every key of `precision_recall_f1`."""
    expected = {}
    per_class = skm.precision_recall_fscore_support(
        labels, predictions, labels=np.arange(num_classes), average=None, zero_division=0
    )
    for name, value in zip(("precision", "recall", "f1", "support"), per_class, strict=True):
        expected[name] = value
    for average in ("macro", "micro", "weighted"):
        # labels=None: averages over the classes present in labels or predictions
        values = skm.precision_recall_fscore_support(
            labels, predictions, average=average, zero_division=0
        )
        for name, value in zip(("precision", "recall", "f1"), values[:3], strict=True):
            expected[f"{name}_{average}"] = value
    return expected


def check_counts(labels: np.ndarray, predictions: np.ndarray, rng: np.random.Generator) -> None:
    """confusion_matrix, accuracy and precision_recall_f1 on padded garbage against sklearn."""
    labels_p, mask = pad(labels.astype(np.int32), garbage_labels(rng, PAD))
    predictions_p, _ = pad(predictions.astype(np.int32), garbage_labels(rng, PAD))
    confusion = jit_confusion(labels_p, predictions_p, C, mask)
    assert confusion.dtype == jnp.int32 and confusion.shape == (C, C)
    np.testing.assert_array_equal(
        confusion, skm.confusion_matrix(labels, predictions, labels=np.arange(C))
    )
    close(jit_accuracy(confusion), skm.accuracy_score(labels, predictions))
    result = jit_prf(confusion)
    expected = sk_prf(labels, predictions, C)
    assert set(result) == set(expected)
    for name, value in expected.items():
        close(result[name], value)
    assert result["support"].dtype == jnp.int32


# --------------------------------------------------------------------------------------------
# count-based metrics
# --------------------------------------------------------------------------------------------


@hypothesis_settings
@given(
    data=st.lists(
        st.tuples(st.integers(0, C - 1), st.integers(0, C - 1)), min_size=1, max_size=PAD
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_counts_match_sklearn_property(data, seed):
    labels, predictions = (np.array(column) for column in zip(*data, strict=True))
    check_counts(labels, predictions, np.random.default_rng(seed))


@pytest.mark.parametrize(
    "case",
    ["random", "absent_class", "never_predicted", "single_class", "perfect", "all_wrong", "one"],
)
def test_counts_adversarial(case):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, C, 50)
    predictions = rng.integers(0, C, 50)
    if case == "absent_class":  # class 2 neither true nor predicted: left out of macro
        labels, predictions = labels[labels != 2][:40], predictions[labels != 2][:40]
        predictions = np.where(predictions == 2, 0, predictions)
    elif case == "never_predicted":  # precision of class 4 is 0/0 -> 0
        predictions = np.where(predictions == 4, 0, predictions)
    elif case == "single_class":
        labels = np.full(50, 3)
    elif case == "perfect":
        predictions = labels
    elif case == "all_wrong":
        predictions = (labels + 1) % C
    elif case == "one":
        labels, predictions = labels[:1], predictions[:1]
    check_counts(labels, predictions, rng)


def test_counts_hand_computed():
    labels = np.array([0, 0, 1, 1, 1, 2])
    predictions = np.array([0, 1, 1, 1, 0, 0])
    confusion = metrics.confusion_matrix(labels, predictions, 4)
    np.testing.assert_array_equal(
        confusion, [[1, 1, 0, 0], [1, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    )
    result = metrics.precision_recall_f1(confusion)
    close(result["precision"], [1 / 3, 2 / 3, 0, 0])
    close(result["recall"], [1 / 2, 2 / 3, 0, 0])
    close(result["f1"], [2 / 5, 2 / 3, 0, 0])
    close(result["precision_macro"], (1 / 3 + 2 / 3 + 0) / 3)  # class 3 absent: not averaged
    close(metrics.accuracy(confusion), 3 / 6)


def test_empty_confusion_is_all_zero():
    result = jit_prf(jnp.zeros((C, C), jnp.int32))
    for value in result.values():
        assert not np.any(np.asarray(value))
    assert float(jit_accuracy(jnp.zeros((C, C), jnp.int32))) == 0.0


def test_out_of_range_entries_count_nothing():
    confusion = metrics.confusion_matrix(np.array([0, -1, 3, 1, 2]), np.array([0, 1, 0, -2, 2]), 3)
    np.testing.assert_array_equal(confusion, [[1, 0, 0], [0, 0, 0], [0, 0, 1]])


def test_merged_batch_confusions_equal_whole():
    rng = np.random.default_rng(1)
    n, batch = 1000, 96  # the last batch is padded
    labels = rng.integers(0, C, n).astype(np.int32)
    predictions = rng.integers(0, C, n).astype(np.int32)
    merged = jnp.zeros((C, C), jnp.int32)
    for start in range(0, n, batch):
        chunk = slice(start, start + batch)
        size = len(labels[chunk])
        labels_b = np.concatenate([labels[chunk], garbage_labels(rng, batch - size)])
        predictions_b = np.concatenate([predictions[chunk], garbage_labels(rng, batch - size)])
        merged = merged + jit_confusion(labels_b, predictions_b, C, np.arange(batch) < size)
    whole = jit_confusion(labels, predictions, C)
    np.testing.assert_array_equal(merged, whole)
    np.testing.assert_array_equal(whole, skm.confusion_matrix(labels, predictions))
    assert int(jnp.sum(merged)) == n


# --------------------------------------------------------------------------------------------
# ranking metrics
# --------------------------------------------------------------------------------------------


@hypothesis_settings
@given(
    data=st.lists(st.tuples(st.integers(0, 1000), st.booleans()), min_size=1, max_size=PAD),
    levels=st.sampled_from([1, 2, 10, 1000]),
    seed=st.integers(0, 2**32 - 1),
)
def test_binary_ranking_matches_sklearn_property(data, levels, seed):
    raw, positives = (np.array(column) for column in zip(*data, strict=True))
    scores = np.round(raw / 1000 * levels) / levels  # few levels = many ties
    check_binary(scores, positives, np.random.default_rng(seed))


def binary_case(case: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    positives = rng.random(PAD - 3) < 0.4
    scores = rng.random(PAD - 3)
    if case == "ties":
        scores = np.round(scores, 1)
    elif case == "perfect":
        scores = positives + 0.1 * scores
    elif case == "inverted":
        scores = -(positives + 0.1 * scores)
    elif case == "all_equal":
        scores = np.full_like(scores, 0.3)
    elif case == "all_positive":
        positives = np.ones_like(positives)
    elif case == "all_negative":
        positives = np.zeros_like(positives)
    elif case == "single_example":
        scores, positives = scores[:1], positives[:1] | True
    elif case == "negative_zero":  # -0.0 and 0.0 are one threshold, as in scikit-learn
        scores = np.where(scores < 0.5, -0.0, 0.0)
    return scores, positives


BINARY_CASES = [
    "random",
    "ties",
    "perfect",
    "inverted",
    "all_equal",
    "all_positive",
    "all_negative",
    "single_example",
    "negative_zero",
]


@pytest.mark.parametrize("case", BINARY_CASES)
def test_binary_ranking_adversarial(case):
    rng = np.random.default_rng(2)
    scores, positives = binary_case(case, rng)
    check_binary(scores, positives, rng)


def test_ranking_edge_values():
    rng = np.random.default_rng(3)
    perfect = binary_case("perfect", rng)
    assert float(jit_auroc(*pad_binary(*perfect, rng))) == 1.0
    assert float(jit_ap(*pad_binary(*perfect, rng))) == 1.0
    assert float(jit_auroc(*pad_binary(*binary_case("inverted", rng), rng))) == 0.0
    assert float(jit_auroc(*pad_binary(*binary_case("all_equal", rng), rng))) == 0.5
    assert np.isnan(jit_auroc(*pad_binary(*binary_case("all_positive", rng), rng)))
    assert np.isnan(jit_ap(*pad_binary(*binary_case("all_negative", rng), rng)))


def pad_binary(scores, positives, rng):
    scores_p, mask = pad(scores.astype(np.float32), garbage_scores(rng, (PAD,)))
    positives_p, _ = pad(positives.astype(bool), np.ones(PAD, bool))
    return scores_p, positives_p, mask


def test_ranking_hand_computed():
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4], np.float32)
    positives = np.array([0, 0, 1, 1, 1], bool)
    # pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>both, 0.4>0.1, 0.4=0.4 (half) -> 4.5 / 6
    close(metrics.auroc(scores, positives), 4.5 / 6)
    # thresholds 0.8: P=1/1; 0.4: 2/3 adding one positive; 0.35: 3/4 adding one positive
    close(metrics.average_precision(scores, positives), (1 + 2 / 3 + 3 / 4) / 3)


def test_curves_are_trapezoid_safe_without_filtering():
    rng = np.random.default_rng(4)
    scores, positives = binary_case("ties", rng)
    fpr, tpr, _, valid = map(np.asarray, jit_roc(*pad_binary(scores, positives, rng)))
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert valid.sum() < len(valid)  # ties and padding do leave fill entries
    close(np.trapezoid(tpr, fpr), skm.roc_auc_score(positives, scores))


@pytest.mark.parametrize("rounding", [None, 3])
def test_exact_in_float32_at_100k(rounding):
    rng = np.random.default_rng(5)
    n = 100_000
    scores = rng.random(n).astype(np.float32)
    if rounding is not None:
        scores = np.round(scores, rounding).astype(np.float32)
    positives = rng.random(n) < scores  # informative, so AUROC is far from 0.5
    close(jit_auroc(scores, positives), skm.roc_auc_score(positives, scores))
    close(jit_ap(scores, positives), skm.average_precision_score(positives, scores))


@pytest.mark.parametrize("n", [1000, 2**18])
def test_exact_mean_of_fractions_against_float64(n):
    rng = np.random.default_rng(8)
    denominators = rng.integers(1, 2 * n, n)
    numerators = np.minimum(rng.integers(0, 2 * n, n), denominators)
    numerators[:10] = denominators[:10]  # fractions of exactly 1: the largest first digit
    weights = rng.random(n) < 0.7
    # float64 fractions summed by fsum: within 1e-15 of the rational answer
    expected = math.fsum(numerators[weights] / denominators[weights]) / weights.sum()
    mean = jax.jit(ranking._exact_mean_of_fractions)(
        numerators.astype(np.int32), denominators.astype(np.int32), weights
    )
    np.testing.assert_allclose(float(mean), expected, rtol=4 * 2.0**-24)


def test_one_vs_rest_match_sklearn():
    rng = np.random.default_rng(6)
    n = PAD - 7
    labels = rng.integers(0, C - 1, n)  # class C-1 absent -> NaN
    probs = np.round(rng.dirichlet(np.ones(C), n), 1).astype(np.float32)
    labels_p, mask = pad(labels.astype(np.int32), garbage_labels(rng, PAD))
    probs_p = np.concatenate([probs, garbage_scores(rng, (PAD - n, C))])
    expected_auroc = [sk_auroc(labels == c, probs[:, c]) for c in range(C)]
    expected_ap = [sk_ap(labels == c, probs[:, c]) for c in range(C)]
    close(jit_ovr_auroc(probs_p, labels_p, mask), expected_auroc)
    close(jit_ovr_ap(probs_p, labels_p, mask), expected_ap)
    assert np.isnan(expected_auroc[-1]) and not np.isnan(expected_auroc[0])
    # every class present: the mean equals scikit-learn's multiclass one-vs-rest macro AUROC
    full_labels = (np.arange(n) % C).astype(np.int32)
    normalised = (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)
    normalised_p = np.concatenate([normalised, garbage_scores(rng, (PAD - n, C))])
    close(
        np.mean(jit_ovr_auroc(normalised_p, pad(full_labels, labels_p)[0], mask)),
        skm.roc_auc_score(full_labels, normalised, multi_class="ovr"),
    )


def test_one_vs_rest_curves_match_sklearn_and_the_single_class_functions():
    rng = np.random.default_rng(8)
    n = PAD - 9
    labels = rng.integers(0, C - 1, n)  # class C-1 absent: its AUROC and AP are NaN
    probs = np.round(rng.dirichlet(np.ones(C), n), 1).astype(np.float32)  # many tied scores
    labels_p, mask = pad(labels.astype(np.int32), garbage_labels(rng, PAD))
    probs_p = np.concatenate([probs, garbage_scores(rng, (PAD - n, C))])
    curves = jax.device_get(metrics.one_vs_rest_curves(probs_p, labels_p, mask))
    assert curves.fpr_CxM.shape == curves.precision_CxM.shape == (C, PAD + 1)
    assert curves.auroc_C.shape == curves.average_precision_C.shape == (C,)

    for c in range(C):
        check_class_curves(curves, c, labels == c, probs[:, c])

        # One sort per class under vmap gives what the single-class functions give.
        single = (
            *jit_roc(probs_p[:, c], labels_p == c, mask),
            *jit_pr(probs_p[:, c], labels_p == c, mask),
        )
        for got, expected in zip(curves[:8], single, strict=True):
            np.testing.assert_array_equal(got[c], expected)
    np.testing.assert_array_equal(curves.auroc_C, jit_ovr_auroc(probs_p, labels_p, mask))
    np.testing.assert_array_equal(curves.average_precision_C, jit_ovr_ap(probs_p, labels_p, mask))


# --------------------------------------------------------------------------------------------
# float64 scores: exact, not rounded to float32
# --------------------------------------------------------------------------------------------


def float64_scores(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float64 scores that differ only beyond float32 precision (all one value in float32), with
    exact float64 ties too."""
    scores = 0.5 + rng.integers(0, 40, shape) * 1e-12
    assert len(np.unique(scores.astype(np.float32))) == 1
    return scores


@pytest.mark.parametrize("case", ["random", "ties_beyond_float32"])
def test_float64_scores_match_sklearn_exactly(case):
    rng = np.random.default_rng(10)
    positives = rng.random(PAD - 3) < 0.4
    if case == "random":
        scores = rng.random(PAD - 3)
    else:
        scores = float64_scores(rng, (PAD - 3,))
        # rounded to float32, every score would tie: AUROC 0.5, far from scikit-learn's
        assert abs(skm.roc_auc_score(positives, scores) - 0.5) > 0.05
    check_binary(scores, positives, rng, dtype=np.float64)
    # unpadded and unmasked as well; thresholds keep the float64 values
    fpr, tpr, thresholds, valid = metrics.roc_curve(scores, positives)
    assert thresholds.dtype == np.float64
    np.testing.assert_array_equal(thresholds[np.asarray(valid)], sk_roc(positives, scores)[2])
    close(metrics.auroc(scores, positives), skm.roc_auc_score(positives, scores))
    close(metrics.average_precision(scores, positives), sk_ap(positives, scores))


def test_float64_one_vs_rest_and_summary_match_sklearn_exactly():
    rng = np.random.default_rng(11)
    n = PAD - 6
    labels = rng.integers(0, C - 1, n)  # class C-1 absent: NaN
    probs = np.round(rng.dirichlet(np.ones(C), n), 1) + rng.integers(0, 30, (n, C)) * 1e-12
    labels_p, mask = pad(labels.astype(np.int32), garbage_labels(rng, PAD))
    probs_p = np.concatenate([probs, garbage_scores(rng, (PAD - n, C))])
    assert probs_p.dtype == np.float64

    curves = jax.device_get(metrics.one_vs_rest_curves(probs_p, labels_p, mask))
    summary = metrics.classification_summary(jnp.eye(C, dtype=jnp.int32), probs_p, labels_p, mask)
    expected_auroc = [sk_auroc(labels == c, probs[:, c]) for c in range(C)]
    expected_ap = [sk_ap(labels == c, probs[:, c]) for c in range(C)]
    for c in range(C):
        check_class_curves(curves, c, labels == c, probs[:, c])

        # the same as the single-class functions on the column
        single = (
            *metrics.roc_curve(probs_p[:, c], labels_p == c, mask),
            *metrics.precision_recall_curve(probs_p[:, c], labels_p == c, mask),
        )
        for got, expected in zip(curves[:8], single, strict=True):
            np.testing.assert_array_equal(got[c], expected)
    for values in (
        curves.auroc_C,
        summary["auroc"],
        metrics.one_vs_rest_auroc(probs_p, labels_p, mask),
    ):
        close(values, expected_auroc)
    for values in (
        curves.average_precision_C,
        summary["average_precision"],
        metrics.one_vs_rest_average_precision(probs_p, labels_p, mask),
    ):
        close(values, expected_ap)
    close(summary["auroc_macro"], np.nanmean(expected_auroc))
    close(summary["average_precision_macro"], np.nanmean(expected_ap))


def test_float64_with_x64_enabled_is_sorted_as_is():
    rng = np.random.default_rng(12)
    positives = rng.random(PAD - 3) < 0.4
    scores = float64_scores(rng, (PAD - 3,))
    with jax.enable_x64(True):
        check_binary(scores, positives, rng, dtype=np.float64)
        assert metrics.roc_curve(jnp.asarray(scores), positives)[2].dtype == jnp.float64


def test_float64_thresholds_inside_jit_are_refused_clearly():
    scores = float64_scores(np.random.default_rng(15), (10,))
    positives = np.arange(10) % 2 == 0
    for curve in (metrics.roc_curve, metrics.precision_recall_curve):
        with pytest.raises(ValueError, match="jax_enable_x64"):
            jax.jit(lambda p, curve=curve: curve(scores, p))(positives)
    with pytest.raises(ValueError, match="float32 knowingly"):
        jax.jit(lambda labels: metrics.one_vs_rest_curves(scores[:, None], labels))(positives * 0)
    # without thresholds the ranks serve exactly, traced or not
    close(jax.jit(lambda p: metrics.auroc(scores, p))(positives), sk_auroc(positives, scores))


# --------------------------------------------------------------------------------------------
# one label rule: a label outside [0, C) counts nothing, as if masked out
# --------------------------------------------------------------------------------------------


def test_out_of_range_labels_count_as_masked_out_in_every_metric():
    rng = np.random.default_rng(13)
    n = PAD - 8
    labels = rng.integers(0, C, n)
    stray = rng.choice(n, 9, replace=False)  # unmasked labels outside [0, C)
    labels[stray] = rng.choice([-1, -7, C, C + 2], 9)
    in_range = (labels >= 0) & (labels < C)
    probs = np.round(rng.dirichlet(np.ones(C), n), 1).astype(np.float32)
    predictions = np.argmax(probs, axis=1)
    labels_p, mask = pad(labels.astype(np.int32), garbage_labels(rng, PAD))
    predictions_p, _ = pad(predictions.astype(np.int32), garbage_labels(rng, PAD))
    probs_p = np.concatenate([probs, garbage_scores(rng, (PAD - n, C))])
    masked_too = mask & pad(in_range, np.zeros(PAD, bool))[0]

    def everything(mask_N):
        confusion = jit_confusion(labels_p, predictions_p, C, mask_N)
        return (
            jit_summary(confusion, probs_p, labels_p, mask_N),
            tuple(metrics.one_vs_rest_curves(probs_p, labels_p, mask_N)),
            jit_ovr_auroc(probs_p, labels_p, mask_N),
            jit_ovr_ap(probs_p, labels_p, mask_N),
        )

    same_leaves(everything(mask), everything(masked_too))

    # and scikit-learn on the examples that remain
    summary, curves, _, _ = everything(mask)
    kept_labels, kept_probs = labels[in_range], probs[in_range]
    expected = sk_prf(kept_labels, predictions[in_range], C)
    expected["accuracy"] = skm.accuracy_score(kept_labels, predictions[in_range])
    expected["auroc"] = [sk_auroc(kept_labels == c, kept_probs[:, c]) for c in range(C)]
    expected["average_precision"] = [sk_ap(kept_labels == c, kept_probs[:, c]) for c in range(C)]
    for name, value in expected.items():
        close(summary[name], value)
    curves = metrics.OneVsRestCurves(*jax.device_get(curves))
    for c in range(C):
        check_class_curves(curves, c, kept_labels == c, kept_probs[:, c])


def test_binary_labels_other_than_0_1_count_as_masked_out():
    rng = np.random.default_rng(14)
    n = PAD - 5
    labels = rng.integers(0, 2, n).astype(np.int32)
    labels[rng.choice(n, 7, replace=False)] = rng.choice([-1, 2, 5], 7)  # binary: [0, 2)
    in_range = (labels == 0) | (labels == 1)
    scores = np.round(rng.random(n), 1).astype(np.float32)
    scores_p, mask = pad(scores, garbage_scores(rng, (PAD,)))
    labels_p, _ = pad(labels, garbage_labels(rng, PAD))
    masked_too = mask & pad(in_range, np.zeros(PAD, bool))[0]
    for function in (jit_roc, jit_pr, jit_auroc, jit_ap):
        same_leaves(
            function(scores_p, labels_p, mask), function(scores_p, labels_p == 1, masked_too)
        )
    check_binary(scores[in_range], labels[in_range] == 1, rng)


@pytest.mark.parametrize("k", [0, 1, 7, 1000])
def test_top_mistakes_against_a_python_sort(k):
    rng = np.random.default_rng(9)
    n = 300
    labels = rng.integers(0, C, n)
    probs = np.round(rng.dirichlet(np.ones(C), n), 1).astype(np.float32)  # tied confidences
    predicted = probs.argmax(axis=1)
    wrong = [i for i in range(n) if predicted[i] != labels[i]]
    expected = sorted(wrong, key=lambda i: (-probs[i, predicted[i]], i))[:k]
    chosen = metrics.top_mistakes(probs, labels, k)
    np.testing.assert_array_equal(chosen, np.array(expected, dtype=chosen.dtype))
    assert len(metrics.top_mistakes(probs, predicted, k)) == 0  # nothing wrong, nothing chosen


@hypothesis_settings
@given(
    data=st.lists(
        st.tuples(st.integers(0, C - 2), st.lists(st.integers(0, 10), min_size=C, max_size=C)),
        min_size=1,
        max_size=PAD,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_summary_matches_sklearn_property(data, seed):
    rng = np.random.default_rng(seed)
    labels = np.array([row[0] for row in data])
    probs = np.array([row[1] for row in data], np.float32) / 10
    predictions = np.argmax(probs, axis=1)
    labels_p, mask = pad(labels.astype(np.int32), garbage_labels(rng, PAD))
    predictions_p, _ = pad(predictions.astype(np.int32), garbage_labels(rng, PAD))
    probs_p = np.concatenate([probs, garbage_scores(rng, (PAD - len(labels), C))])
    confusion = jit_confusion(labels_p, predictions_p, C, mask)
    summary = jit_summary(confusion, probs_p, labels_p, mask)

    expected = sk_prf(labels, predictions, C)
    expected["accuracy"] = skm.accuracy_score(labels, predictions)
    expected["auroc"] = [sk_auroc(labels == c, probs[:, c]) for c in range(C)]
    expected["average_precision"] = [sk_ap(labels == c, probs[:, c]) for c in range(C)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of an all-NaN slice
        expected["auroc_macro"] = np.nanmean(expected["auroc"])
        expected["average_precision_macro"] = np.nanmean(expected["average_precision"])
    assert set(summary) == set(expected)
    for name, value in expected.items():
        close(summary[name], value)


# --------------------------------------------------------------------------------------------
# jit == eager, and the host record
# --------------------------------------------------------------------------------------------


def test_jit_equals_eager():
    rng = np.random.default_rng(7)
    n = PAD - 5
    labels = np.concatenate([rng.integers(0, C, n), garbage_labels(rng, 5)]).astype(np.int32)
    probs = np.concatenate(
        [np.round(rng.dirichlet(np.ones(C), n), 2), garbage_scores(rng, (5, C))]
    ).astype(np.float32)
    predictions = np.argmax(np.nan_to_num(probs), axis=1).astype(np.int32)
    mask = np.arange(PAD) < n
    scores, positives = probs[:, 1], labels == 1
    with jax.disable_jit():
        eager_confusion = metrics.confusion_matrix(labels, predictions, C, mask)
        eager = (
            eager_confusion,
            metrics.classification_summary(eager_confusion, probs, labels, mask),
            metrics.roc_curve(scores, positives, mask),
            metrics.precision_recall_curve(scores, positives, mask),
        )
    confusion = jit_confusion(labels, predictions, C, mask)
    jitted = (
        confusion,
        jit_summary(confusion, probs, labels, mask),
        jit_roc(scores, positives, mask),
        jit_pr(scores, positives, mask),
    )
    same_leaves(jitted, eager)


def test_a_summary_from_the_curves_equals_one_from_the_probabilities():
    """What an evaluation does: rank once for the curves, take the summary's areas from them."""
    rng = np.random.default_rng(8)
    n = PAD - 5
    labels = np.concatenate([rng.integers(0, C, n), garbage_labels(rng, 5)]).astype(np.int32)
    probs = rng.dirichlet(np.ones(C), PAD).astype(np.float32)
    mask = np.arange(PAD) < n
    confusion = jit_confusion(labels, probs.argmax(1).astype(np.int32), C, mask)
    curves = jax.jit(metrics.one_vs_rest_curves)(probs, labels, mask)
    from_curves = jax.jit(lambda c, k: metrics.classification_summary(c, curves=k))
    same_leaves(from_curves(confusion, curves), jit_summary(confusion, probs, labels, mask))


def test_to_record_names_and_json():
    labels = np.array([0, 1, 1, 2, 2, 2])
    predictions = np.array([0, 1, 2, 2, 2, 0])
    probs = np.eye(3, dtype=np.float32)[predictions] * 0.8 + 0.1
    confusion = metrics.confusion_matrix(labels, predictions, 4)  # class 3 absent
    probs4 = np.concatenate([probs, np.full((6, 1), 0.05, np.float32)], axis=1)
    summary = metrics.classification_summary(confusion, probs4, labels)
    record = metrics.to_record("test", summary, confusion, loss=jnp.float32(0.25))

    per_class = ["precision", "recall", "f1", "support", "auroc", "average_precision"]
    averages = [f"{m}_{a}" for m in ("precision", "recall", "f1") for a in ("macro", "micro")]
    averages += [f"{m}_weighted" for m in ("precision", "recall", "f1")]
    expected_keys = {"test/accuracy", "test/loss", "test/confusion_matrix"}
    expected_keys |= {f"test/{name}" for name in averages + ["auroc_macro"]}
    expected_keys |= {"test/average_precision_macro"}
    expected_keys |= {f"test/{name}/{c}" for name in per_class for c in range(4)}
    assert set(record) == expected_keys
    assert list(record)[:2] == ["test/accuracy", "test/loss"]

    assert record["test/accuracy"] == pytest.approx(4 / 6)
    assert record["test/loss"] == 0.25
    assert record["test/support/2"] == 3 and type(record["test/support/2"]) is int
    assert record["test/auroc/3"] is None  # NaN -> JSON null
    assert record["test/precision/1"] == pytest.approx(1.0)
    assert (
        record["test/confusion_matrix"]
        == skm.confusion_matrix(labels, predictions, labels=range(4)).tolist()
    )
    assert all(type(v) is int for row in record["test/confusion_matrix"] for v in row)
    assert json.loads(json.dumps(record, allow_nan=False)) == record


def test_to_record_without_extras_and_bad_split():
    summary = metrics.classification_summary(jnp.eye(2, dtype=jnp.int32))
    record = metrics.to_record("train", summary)
    assert record["train/accuracy"] == 1.0
    assert "train/loss" not in record and "train/confusion_matrix" not in record
    assert metrics.metric_key("val", "recall", 7) == "val/recall/7"
    with pytest.raises(ValueError, match="split"):
        metrics.to_record("test/x", summary)
