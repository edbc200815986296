"""Dataset statistics: exact pixel statistics, class counts, mean images and samples.

Every pixel statistic derives from the integer histogram of pixel values, so a mean or standard
deviation is the correctly rounded float64 value of the true one: these are the numbers users
paste into their normalisation code.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mnist_jax.data import Dataset

_BINCOUNT_CHUNK = 1 << 22  # pixels per np.bincount call: bounds its int64 temporary to 32 MiB


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
