"""Figures for `mnist-jax analyze`: the canvas every figure is drawn on, the dataset figures, and
the helpers `run_plots` shares. Each figure function takes plain numpy data and returns PNG bytes.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global state),
so they render the same on a headless server and never leak open figures. matplotlib is
imported inside the functions to keep importing this module cheap.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
SPLIT_COLORS = {"train": "#1f77b4", "test": "#ff7f0e"}


def new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas with the house style (readable fonts, constrained layout)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure) -> bytes:
    """The figure as PNG bytes, trimmed to its content."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return buffer.getvalue()


# --- dataset figures -------------------------------------------------------------------------


def sample_grid(
    images_CxKxHxW: np.ndarray, class_names: Sequence[str], title: str = "Sample images"
) -> bytes:
    """A grid with one row of example images per class, the class name at the start of each row.

    The grid is one mosaic image (one axes, not C*K of them): it draws ten times faster.
    """
    num_classes, per_class, height, width = images_CxKxHxW.shape
    gap = 2
    mosaic = np.full((num_classes * (height + gap) - gap, per_class * (width + gap) - gap), 255.0)
    for c in range(num_classes):
        for k in range(per_class):
            top, left = c * (height + gap), k * (width + gap)
            mosaic[top : top + height, left : left + width] = 255 - images_CxKxHxW[c, k]
    fig = new_figure(0.6 * per_class + 1.2, 0.6 * num_classes + 0.6)
    ax = fig.add_subplot()
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks(
        np.arange(num_classes) * (height + gap) + height / 2,
        [short(name, 12) for name in class_names],
        fontsize=11,
    )
    ax.set_xticks([])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title, fontsize=13)
    return to_png(fig)


def mean_intensity_heatmap(mean_HxW: np.ndarray, title: str) -> bytes:
    """Where digits are written: the average of every image, pixel by pixel."""
    fig = new_figure(6.0, 5.0)
    ax = fig.add_subplot()
    image = ax.imshow(mean_HxW, cmap="magma", vmin=0, vmax=max(float(mean_HxW.max()), 1.0))
    fig.colorbar(image, ax=ax, label="mean pixel value (0-255)")
    ax.set_title(title, fontsize=13)
    ax.set_xlabel("column (pixel)")
    ax.set_ylabel("row (pixel)")
    return to_png(fig)


def pixel_histogram(counts_by_split: Mapping[str, np.ndarray], title: str) -> bytes:
    """The share of pixels taking each value 0..255 per split, on a log scale.

    The log scale is the point: it shows both the huge spikes at 0 and 255 and the thin
    plateau of anti-aliased edge values between them.
    """
    fig = new_figure(9.0, 4.6)
    ax = fig.add_subplot()
    values = np.arange(256)
    for split, counts in counts_by_split.items():
        share = np.asarray(counts, np.float64) / max(int(np.sum(counts)), 1)
        shown = np.where(share > 0, share, np.nan)
        ax.step(
            values,
            shown,
            where="mid",
            lw=1.4,
            color=SPLIT_COLORS.get(split),
            label=f"{split}: {share[0]:.1%} at 0, {share[255]:.2%} at 255",
        )
    ax.set_yscale("log")
    ax.set_xlim(-2, 257)
    ax.set_xticks([0, 32, 64, 96, 128, 160, 192, 224, 255])
    ax.set_xlabel("pixel value")
    ax.set_ylabel("fraction of pixels (log scale)")
    ax.set_title(title, fontsize=13)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper center")
    return to_png(fig)


def class_distribution(
    counts_by_split: Mapping[str, Sequence[int]], class_names: Sequence[str], title: str
) -> bytes:
    """Images per class, one panel per split, with the uniform share as a dashed line."""
    splits = list(counts_by_split)
    fig = new_figure(5.2 * len(splits), 4.4)
    axes = fig.subplots(1, len(splits), squeeze=False)[0]
    x = np.arange(len(class_names))
    for ax, split in zip(axes, splits, strict=True):
        counts = np.asarray(counts_by_split[split])
        bars = ax.bar(x, counts, color=SPLIT_COLORS.get(split, "#555555"))
        ax.bar_label(bars, labels=[f"{c:,}" for c in counts], label_type="center", rotation=90,
                     fontsize=9, color="white")  # fmt: skip
        ax.axhline(counts.sum() / len(counts), color="black", ls="--", lw=1, label="uniform")
        class_xticks(ax, x, class_names)
        ax.set_ylim(0, counts.max() * 1.15)
        ax.set_xlabel("class")
        ax.set_ylabel("images")
        ax.set_title(f"{split} ({counts.sum():,} images)")
        ax.legend(loc="upper right", fontsize=9)
    fig.suptitle(title, fontsize=13)
    return to_png(fig)


def class_mean_images(mean_CxHxW: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
    """The average image of each class: the 'prototype' a linear model would see."""
    num_classes = mean_CxHxW.shape[0]
    cols = min(num_classes, 5)
    rows = -(-num_classes // cols)
    fig = new_figure(2.0 * cols, 2.2 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= num_classes:
            ax.set_axis_off()
            continue
        ax.imshow(mean_CxHxW[i], cmap="magma", vmin=0, vmax=255)
        ax.set_title(short(class_names[i], 16), fontsize=11)
    fig.suptitle(title, fontsize=13)
    return to_png(fig)


# --- helpers shared with run_plots ----------------------------------------------------------


def short(text: Any, limit: int) -> str:
    """`text` cut to `limit` characters, an ellipsis marking the cut."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def score_text(value: float, digits: int = 4) -> str:
    """`value` with `digits` decimals, never rounded up to 1 (or 100%): a score below 1 shows as
    many more digits as it takes to tell it from 1 (0.99995 is '0.99995', not '1.0000')."""
    text = f"{value:.{digits}f}"
    while text.startswith("1.") and value < 1 and digits < 12:
        digits += 1
        text = f"{value:.{digits}f}"
    if text.startswith("1.") and value < 1:  # within 1e-12 of 1: cut rather than round
        text = f"{math.floor(value * 10**digits) / 10**digits:.{digits}f}"
    return text


def class_xticks(ax: Any, x: np.ndarray, class_names: Sequence[str]) -> None:
    """Class names under the x ticks, slanted when they are words rather than digits."""
    labels = [short(n, 12) for n in class_names]
    if max((len(n) for n in labels), default=0) <= 3:
        ax.set_xticks(x, labels)
    else:
        ax.set_xticks(x, labels, rotation=40, ha="right", rotation_mode="anchor")
