"""A loaded dataset: host-side uint8 images and int32 labels per split."""

from __future__ import annotations

import dataclasses

import numpy as np

from mnist_jax.data.registry import DatasetSpec, spec


@dataclasses.dataclass(frozen=True, repr=False)
class Split:
    """One split: ``images`` uint8 ``[N, 28, 28]`` and ``labels`` int32 ``[N]`` (read-only)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.labels.ndim != 1:
            raise ValueError(
                f"Split wants images [N, H, W] and labels [N], got {self.images.shape} "
                f"and {self.labels.shape}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"Split(images={self.images.dtype}{list(self.images.shape)}, "
            f"labels={self.labels.dtype}{list(self.labels.shape)})"
        )


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A whole dataset, host-side. ``origin`` says where it was read from, for logs."""

    name: str
    train: Split
    test: Split
    class_names: tuple[str, ...]
    origin: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def spec(self) -> DatasetSpec:
        """The registry's spec for this dataset's name (image shape, channels, classes)."""
        return spec(self.name)
