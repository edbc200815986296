"""The ``tfds`` source: a dataset already prepared in a tensorflow-datasets data directory.

tensorflow and tensorflow-datasets are an optional extra, imported only when this source is
used; it never downloads.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mnist_jax.data.dataset import Dataset, Split
from mnist_jax.data.registry import spec
from mnist_jax.errors import UserError

_TFDS_BATCH = 10_000


def tfds_installed() -> bool:
    """Whether tensorflow-datasets can be imported (found without importing TensorFlow)."""
    return importlib.util.find_spec("tensorflow_datasets") is not None


def load_tfds(name: str, data_dir: Path | None) -> Dataset:
    """Both splits of `name` from the TFDS data dir `data_dir` (default: TFDS's own)."""
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise UserError(
            f"source 'tfds' needs tensorflow and tensorflow-datasets ({e}); "
            'pip install "mnist-jax[tfds]", or use --data-dir DIR or --source download'
        ) from None
    # TensorFlow only feeds numpy here; it must not claim accelerator memory JAX will need.
    tf.config.set_visible_devices([], "GPU")
    splits = {}
    for split in ("train", "test"):
        try:
            # Never download: this source is for data already prepared in a TFDS data dir, and
            # offline a TFDS download retries for minutes before it gives up.
            ds = tfds.load(
                name,
                split=split,
                batch_size=_TFDS_BATCH,
                as_supervised=True,
                data_dir=str(data_dir) if data_dir else None,
                download=False,
            )
            batches = list(tfds.as_numpy(ds))
        except Exception as e:  # tfds raises many types; all mean "could not load"
            raise _tfds_error(tfds, name, split, data_dir, e) from None
        splits[split] = _split_from_batches(name, split, batches)
    return Dataset(name, splits["train"], splits["test"], spec(name).class_names, origin="tfds")


def _tfds_error(
    tfds: Any, name: str, split: str, data_dir: Path | None, error: Exception
) -> UserError:
    """One line for a failed `tfds.load`: "not prepared" (and how to prepare it) when the TFDS
    data dir lacks the dataset, else the first line of what tfds said."""
    try:
        builder = tfds.builder(name, data_dir=str(data_dir) if data_dir else None)
        prepared, root = builder.is_prepared(), builder.data_dir_root
    except Exception:  # the builder cannot say: fall back to tfds's own message
        prepared, root = True, data_dir
    if not prepared:
        return UserError(
            f"{name} is not prepared in the TFDS data dir {root} and source 'tfds' never "
            f"downloads; prepare it on a connected machine (`tfds build {name} --data_dir "
            f"{root}`), point --data-dir at the TFDS data dir that holds it, or use "
            "--source download"
        )
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    return UserError(
        f"tensorflow-datasets could not load {name} {split}: {first_line}; "
        "try --source download or --data-dir DIR"
    )


def _split_from_batches(
    name: str, split: str, batches: Sequence[tuple[np.ndarray, np.ndarray]]
) -> Split:
    dataset = spec(name)
    h, w, c = dataset.image_shape
    images = np.concatenate([b[0] for b in batches]) if batches else np.zeros((0, h, w, c))
    labels = np.concatenate([b[1] for b in batches]) if batches else np.zeros((0,))
    # TFDS images carry a channel axis, a `Split` holds grayscale [N, H, W]: accept both.
    if images.shape[1:] not in ((h, w, c), (h, w)):
        raise UserError(f"tfds {name} {split}: images have shape {images.shape[1:]}, not {h}x{w}")
    if labels.size and not 0 <= labels.min() <= labels.max() < dataset.num_classes:
        raise UserError(f"tfds {name} {split}: labels outside [0, {dataset.num_classes})")
    images = images.reshape(-1, h, w).astype(np.uint8, copy=False)
    labels = labels.astype(np.int32)
    for array in (images, labels):
        array.setflags(write=False)
    return Split(images, labels)
