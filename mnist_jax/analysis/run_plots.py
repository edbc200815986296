"""Figures of runs for `mnist-jax analyze`: learning curves, confusion matrix, per-class scores,
ROC and PR curves, the mistakes gallery and the runs compared. Each function takes plain numpy
data and returns PNG bytes, drawn like the dataset figures (see `plots`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mnist_jax.analysis.plots import (
    SPLIT_COLORS,
    class_xticks,
    new_figure,
    score_text,
    short,
    to_png,
)
from mnist_jax.metrics import metric_key


def learning_curves(curves: Mapping[str, np.ndarray], title: str) -> bytes:
    """Loss and accuracy by epoch, train and test, with the logged training steps faintly behind.

    `curves` holds `epoch` and `train/loss`, `train/accuracy`, `test/loss`, `test/accuracy`
    (per epoch event) and `step_epoch`, `step/train/loss`, `step/train/accuracy` (per
    training event); missing values are NaN.
    """
    fig = new_figure(11.0, 4.2)
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        steps_x = curves.get("step_epoch", np.array([]))
        steps_y = curves.get(f"step/{metric_key('train', name)}", np.array([]))
        if len(steps_x):
            ax.plot(
                steps_x,
                steps_y,
                color=SPLIT_COLORS["train"],
                alpha=0.3,
                lw=1,
                label="train (logged steps)",
            )
        for split in ("train", "test"):
            y = curves.get(metric_key(split, name), np.array([]))
            if len(y) and np.isfinite(y).any():
                ax.plot(
                    curves["epoch"],
                    y,
                    "o-",
                    color=SPLIT_COLORS[split],
                    lw=2,
                    label=f"{split} (epoch)",
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(name.capitalize())
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=9)
    if _positive(curves, "loss"):
        _log_y(loss_ax)
    accuracy_y(acc_ax)
    for ax in (loss_ax, acc_ax):
        _epoch_x(ax)
    fig.suptitle(title, fontsize=13)
    return to_png(fig)


def confusion_heatmap(confusion_CxC: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
    """Counts annotated in each cell; the colour is the share of the true class (row).

    Colouring by row share on a power scale keeps the rare mistakes visible next to a
    diagonal that holds almost all the mass.
    """
    from matplotlib.colors import PowerNorm

    cm = np.asarray(confusion_CxC, np.int64)
    num_classes = cm.shape[0]
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(5.5, 0.45 * num_classes + 2.0)
    fig = new_figure(size + 0.9, size)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", norm=PowerNorm(0.3, vmin=0, vmax=1))
    fig.colorbar(image, ax=ax, label="share of the true class", shrink=0.8)
    fontsize = 10 if num_classes <= 10 else 7
    for i in range(num_classes):
        for j in range(num_classes):
            if cm[i, j] == 0:
                continue
            dark = share[i, j] ** 0.3 > 0.6
            ax.text(
                j,
                i,
                f"{cm[i, j]}",
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if dark else "black",
            )
    ticks = np.arange(num_classes)
    class_xticks(ax, ticks, class_names)
    ax.set_yticks(ticks, [short(n, 12) for n in class_names])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=13)
    return to_png(fig)


def per_class_bars(
    scores: Mapping[str, np.ndarray], class_names: Sequence[str], title: str
) -> bytes:
    """Grouped bars of per-class scores (precision, recall, F1), zoomed to the range they span."""
    fig = new_figure(max(7.0, 0.6 * len(class_names) + 1.5), 5.0)
    ax = fig.add_subplot()
    x = np.arange(len(class_names))
    width = 0.8 / max(len(scores), 1)
    lowest = 1.0
    for i, (name, values) in enumerate(scores.items()):
        values = np.asarray(values, np.float64)
        ax.bar(x + (i - (len(scores) - 1) / 2) * width, values, width, label=name)
        if np.isfinite(values).any():
            lowest = min(lowest, float(np.nanmin(values)))
    bottom = _zoom_bottom(lowest)
    ax.set_ylim(bottom, 1.0)
    class_xticks(ax, x, class_names)
    ax.set_xlabel("class")
    ax.set_ylabel("score (axis zoomed)" if bottom > 0 else "score")
    ax.set_title(title, fontsize=13)
    ax.grid(True, axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=len(scores), fontsize=9)
    return to_png(fig)


def roc_pr_curves(
    roc: Sequence[tuple[np.ndarray, np.ndarray]],
    pr: Sequence[tuple[np.ndarray, np.ndarray]],
    auroc_C: np.ndarray,
    ap_C: np.ndarray,
    class_names: Sequence[str],
    title: str,
) -> bytes:
    """One-vs-rest ROC curves (log-scale false positive rate) and precision-recall curves.

    `roc[k]` is (fpr, tpr) and `pr[k]` is (recall, precision) for class k. A log FPR axis is
    what separates good classifiers: on a linear axis every MNIST curve is the corner. For the
    same reason the PR panel is zoomed (see `pr_zoom`). Scores are printed with `score_text`, so
    a score below 1 never reads as 1.
    """
    import matplotlib as mpl

    colors = mpl.colormaps["tab10" if len(class_names) <= 10 else "tab20"]
    fig = new_figure(13.0, 5.0)
    roc_ax, pr_ax = fig.subplots(1, 2)
    smallest_fpr = 1.0
    for k, ((fpr, tpr), (recall, precision)) in enumerate(zip(roc, pr, strict=True)):
        color = colors(k % colors.N)
        label = f"{short(class_names[k], 10)}: AUROC {score_text(auroc_C[k])}, "
        label += f"AP {score_text(ap_C[k])}"
        positive = fpr > 0
        if positive.any():
            smallest_fpr = min(smallest_fpr, float(fpr[positive].min()))
        roc_ax.plot(np.where(positive, fpr, np.nan), tpr, color=color, lw=1.4, label=label)
        pr_ax.plot(recall, precision, color=color, lw=1.4)
    roc_ax.set_xscale("log")
    roc_ax.set_xlim(max(smallest_fpr / 2, 1e-6), 1.0)
    roc_ax.set_ylim(min(0.5, roc_ax.get_ylim()[0]), 1.01)
    roc_ax.set_xlabel("false positive rate (log scale)")
    roc_ax.set_ylabel("true positive rate")
    roc_ax.set_title(f"ROC, one vs rest (macro AUROC {score_text(np.nanmean(auroc_C))})")
    low = pr_zoom(pr)
    zoomed = " (axis zoomed)" if low > 0 else ""
    pr_ax.set_xlim(low, 1.005)
    pr_ax.set_ylim(low, 1.005)
    pr_ax.set_xlabel(f"recall{zoomed}")
    pr_ax.set_ylabel(f"precision{zoomed}")
    heading = "Precision-recall, zoomed on the knees" if low > 0 else "Precision-recall"
    pr_ax.set_title(f"{heading} (macro AP {score_text(np.nanmean(ap_C))})")
    for ax in (roc_ax, pr_ax):
        ax.grid(True, alpha=0.3)
    fig.legend(loc="outside right center", fontsize=9)
    fig.suptitle(title, fontsize=13)
    return to_png(fig)


def pr_zoom(pr: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """The lower limit of both axes of the PR panel: the lowest recall or precision at any
    class's knee (its best-F1 point), less twice its distance from 1 as a margin.

    A good classifier's curves hug the top-right corner, so unzoomed they all sit in it; their
    two ends (precision 1 at low recall, the final fall to the class's share of the examples at
    full recall) are the same for every class and leave the zoomed axes.
    """
    lowest = 1.0
    for recall, precision in pr:
        recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
        f1 = 2 * recall * precision / np.maximum(recall + precision, 1e-12)
        if np.isfinite(f1).any():
            knee = int(np.nanargmax(f1))
            lowest = min(lowest, float(recall[knee]), float(precision[knee]))
    return _zoom_bottom(lowest, margin=2.0)


def mistakes_gallery(
    images_KxHxW: np.ndarray,
    true_K: np.ndarray,
    predicted_K: np.ndarray,
    confidence_K: np.ndarray,
    class_names: Sequence[str],
    title: str,
    columns: int = 8,
) -> bytes:
    """The most confidently misclassified images, each titled with true → predicted (confidence)."""
    count = len(images_KxHxW)
    cols = min(columns, max(count, 1))
    rows = max(-(-count // cols), 1)
    fig = new_figure(1.55 * cols, 1.85 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= count:
            ax.set_axis_off()
            continue
        ax.imshow(images_KxHxW[i], cmap="gray_r", vmin=0, vmax=255)
        true_name = short(class_names[int(true_K[i])], 7)
        pred_name = short(class_names[int(predicted_K[i])], 7)
        ax.set_title(
            f"true {true_name}\npred {pred_name} ({confidence_K[i]:.2f})",
            fontsize=9,
            color="#b00020",
        )
    fig.suptitle(title, fontsize=13)
    return to_png(fig)


# --- comparison figures ----------------------------------------------------------------------


def comparison_curves(curves_by_run: Mapping[str, Mapping[str, np.ndarray]], title: str) -> bytes:
    """Test accuracy and train loss by epoch, one line per run: runs compared at a glance."""
    import matplotlib as mpl

    colors = mpl.colormaps["tab10" if len(curves_by_run) <= 10 else "tab20"]
    fig = new_figure(13.0, 4.8)
    acc_ax, loss_ax = fig.subplots(1, 2)
    for i, (name, curves) in enumerate(curves_by_run.items()):
        color = colors(i % colors.N)
        epoch = curves.get("epoch", np.array([]))
        for ax, key in (
            (acc_ax, metric_key("test", "accuracy")),
            (loss_ax, metric_key("train", "loss")),
        ):
            y = curves.get(key, np.array([]))
            if len(y):
                ax.plot(
                    epoch,
                    y,
                    "o-",
                    color=color,
                    lw=1.6,
                    ms=4,
                    label=short(name, 40) if ax is acc_ax else None,
                )
    acc_ax.set_title("Test accuracy by epoch")
    acc_ax.set_ylabel("test accuracy")
    loss_ax.set_title("Train loss by epoch")
    loss_ax.set_ylabel("train loss")
    if any(_positive(c, "loss", splits=("train",)) for c in curves_by_run.values()):
        _log_y(loss_ax)
    accuracy_y(acc_ax)
    for ax in (acc_ax, loss_ax):
        _epoch_x(ax)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    if acc_ax.has_data():
        fig.legend(loc="outside right center", fontsize=9)
    fig.suptitle(title, fontsize=13)
    return to_png(fig)


def _log_y(ax: Any) -> None:
    """A log y axis labelled with plain numbers (0.2, 0.05) rather than powers of ten, with at
    least three labelled ticks on any range: decades, else 1-2-5 steps, else every multiple of a
    power of ten, else (a range narrower than that) evenly spaced values."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    ax.set_yscale("log")
    low, high = ax.get_ylim()
    major: Any = MaxNLocator(nbins=5)
    for subs in ((1.0,), (1.0, 2.0, 5.0), tuple(range(1, 10))):
        locator = LogLocator(base=10, subs=subs)
        ticks = locator.tick_values(low, high)
        if np.count_nonzero((ticks >= low) & (ticks <= high)) >= 3:
            major = locator
            break
    ax.yaxis.set_major_locator(major)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def accuracy_y(ax: Any) -> None:
    """Accuracy limits around the plotted values and never above 1: alone, a single point gets
    matplotlib's +-5% (an axis up to 1.04). Points on the limit are drawn whole, unclipped."""
    values = _plotted(ax, "y")
    if not values.size:
        return
    low, high = float(values.min()), float(values.max())
    pad = max(0.08 * (high - low), 0.01)
    ax.set_ylim(max(0.0, low - pad), min(1.0, high + pad))
    for line in ax.get_lines():
        line.set_clip_on(False)


def _epoch_x(ax: Any) -> None:
    """Whole-epoch ticks. Points spanning less than two epochs (a one-epoch run) get the epochs
    either side as limits, so a lone point sits between labelled whole epochs rather than on an
    axis from 0.945 to 1.05."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    values = _plotted(ax, "x")
    if values.size and values.max() - values.min() < 2:
        ax.set_xlim(max(0.0, np.floor(values.min()) - 1), np.ceil(values.max()) + 1)


def _plotted(ax: Any, axis: str) -> np.ndarray:
    """The finite x or y values of every line on `ax`."""
    data = [np.asarray(getattr(line, f"get_{axis}data")(), np.float64) for line in ax.get_lines()]
    values = np.concatenate(data) if data else np.array([])
    return values[np.isfinite(values)]


def _zoom_bottom(lowest: float, margin: float = 0.25) -> float:
    """The lower limit of an axis zoomed onto scores in [lowest, 1]: `margin` times the distance
    to 1 below `lowest`, floored to a hundredth, at most 0.99 (so a perfect score gets an axis)."""
    bottom = min(max(0.0, lowest - margin * (1.0 - lowest) - 0.005), 0.99)
    return float(np.floor(bottom * 100) / 100)


def _positive(curves: Mapping[str, np.ndarray], name: str, splits=("train", "test")) -> bool:
    """True when every finite loss value is positive, so a log axis can show them all."""
    values = [np.asarray(curves.get(metric_key(s, name), [])) for s in splits]
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    return bool(finite.size) and bool((finite > 0).all())
