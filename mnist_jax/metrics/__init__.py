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

from mnist_jax.metrics.counts import accuracy, confusion_matrix, precision_recall_f1
from mnist_jax.metrics.names import (
    BEST_STEP,
    BEST_TEST_ACCURACY,
    COMPILE_CACHE_HITS,
    COMPILE_SECONDS,
    COMPILED_PROGRAMS,
    EVAL_SECONDS,
    TOTAL_SECONDS,
    TRACED_PROGRAMS,
    TRAIN_SECONDS,
    metric_key,
    to_record,
    top_mistakes,
    train_record,
)
from mnist_jax.metrics.ranking import (
    MAX_RANKED_EXAMPLES,
    auroc,
    average_precision,
    precision_recall_curve,
    roc_curve,
)
from mnist_jax.metrics.summary import (
    OneVsRestCurves,
    classification_summary,
    curve_points,
    one_vs_rest_auroc,
    one_vs_rest_average_precision,
    one_vs_rest_curves,
)

__all__ = [
    "accuracy",
    "confusion_matrix",
    "precision_recall_f1",
    "BEST_STEP",
    "BEST_TEST_ACCURACY",
    "COMPILED_PROGRAMS",
    "COMPILE_CACHE_HITS",
    "COMPILE_SECONDS",
    "EVAL_SECONDS",
    "MAX_RANKED_EXAMPLES",
    "OneVsRestCurves",
    "TOTAL_SECONDS",
    "TRACED_PROGRAMS",
    "TRAIN_SECONDS",
    "auroc",
    "average_precision",
    "classification_summary",
    "curve_points",
    "metric_key",
    "one_vs_rest_auroc",
    "one_vs_rest_average_precision",
    "one_vs_rest_curves",
    "precision_recall_curve",
    "roc_curve",
    "to_record",
    "top_mistakes",
    "train_record",
]
