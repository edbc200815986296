"""Loading a dataset as uint8 arrays from the source that `source=` selects.

Sources:
- ``local``: a directory holding the four IDX files, gzipped or not (``data_dir`` or
  ``$MNIST_JAX_DATA_DIR``, else the download cache when it is complete). Never touches the network.
- ``download``: the four ``.gz`` files from the mirrors tensorflow-datasets uses, each checked
  against its registered size and SHA-256 and written atomically into the cache directory.
- ``tfds``: ``tensorflow_datasets.load`` (optional extra, imported only when asked for).
- ``auto``: a given directory, else a complete cache, else download.

Every file is validated (`idx`) and every problem is one `UserError` line naming the file.
Parsed arrays are cached in an ``.npz`` keyed by the SHA-256 of the files' bytes (`cache`), so a
second load skips decompression and parsing.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mnist_jax.data.cache import cache_key, read_cache, write_cache
from mnist_jax.data.dataset import Dataset, Split
from mnist_jax.data.fetch import download, mirrors
from mnist_jax.data.idx import find_files, parse_all, read_file, require_files, warn_md5
from mnist_jax.data.locations import DATA_DIR_ENV, dataset_cache_dir
from mnist_jax.data.registry import CHECKSUMS, SOURCES, check_name, spec
from mnist_jax.data.tfds import load_tfds, tfds_installed
from mnist_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class SourcePlan:
    """Where `load_dataset` would read from, decided without reading or downloading anything.

    ``kind`` is ``local`` (a given directory), ``cache`` (the complete download cache),
    ``download`` (fetch into ``directory``) or ``tfds``; ``reason`` says why, for `data info`.
    """

    kind: str
    directory: Path | None
    reason: str


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What `mnist-jax data info` shows: the plan, the files there, and what they hold.

    ``dataset`` is None when nothing was loaded (download or tfds planned, or ``error``).
    """

    name: str
    plan: SourcePlan
    files: dict[str, tuple[Path, int] | None]
    urls: tuple[str, ...]
    tfds_installed: bool
    dataset: Dataset | None
    error: str | None


def load_dataset(
    name: str = "mnist",
    data_dir: str | Path | None = None,
    source: str = "auto",
    *,
    cache: bool = True,
    progress: bool = True,
) -> Dataset:
    """Loads `name` from the source `source` selects (see the module docstring).

    ``data_dir`` defaults to ``$MNIST_JAX_DATA_DIR``; for ``source="download"`` it is where the
    files go (default: the cache directory), for ``source="tfds"`` the TFDS data directory.
    ``cache`` reads and writes the parsed-array ``.npz``; ``progress`` shows a download bar.
    """
    plan = plan_source(name, data_dir, source)
    if plan.kind == "tfds":
        return load_tfds(name, plan.directory)
    assert plan.directory is not None
    if plan.kind == "download":
        download(name, plan.directory, progress=progress)
    return load_idx_dir(name, plan.directory, cache=cache)


def subset(dataset: Dataset, train: int, test: int) -> Dataset:
    """The first `train` and `test` examples of each split (views, no copy), for tiny runs."""
    for split, n, have in (("train", train, len(dataset.train)), ("test", test, len(dataset.test))):
        if not 0 <= n <= have:
            raise UserError(f"subset of {n} {split} examples asked for; {dataset.name} has {have}")
    return dataclasses.replace(
        dataset,
        train=Split(dataset.train.images[:train], dataset.train.labels[:train]),
        test=Split(dataset.test.images[:test], dataset.test.labels[:test]),
    )


def plan_source(name: str, data_dir: str | Path | None, source: str = "auto") -> SourcePlan:
    """Decides where `name` comes from, without touching the network or parsing files."""
    check_name(name)
    if source not in SOURCES:
        raise UserError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
    if source == "tfds":
        return SourcePlan("tfds", Path(data_dir) if data_dir else None, "tensorflow-datasets")
    if source == "download":
        if data_dir:
            return SourcePlan("download", Path(data_dir), "download into data_dir")
        return SourcePlan("download", dataset_cache_dir(name), "download into the cache")
    if data_dir:
        return SourcePlan("local", Path(data_dir), "data_dir")
    if os.environ.get(DATA_DIR_ENV):
        return SourcePlan("local", Path(os.environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}")
    cached = dataset_cache_dir(name)
    if all(find_files(cached).values()):
        return SourcePlan("cache", cached, "complete download cache")
    if source == "local":
        raise UserError(
            f"no local {name} data: pass --data-dir DIR or set {DATA_DIR_ENV} to a directory with "
            f"the four IDX files, or run `mnist-jax data download --dataset {name}`"
        )
    return SourcePlan("download", cached, "nothing local, download into the cache")


def local_dir(name: str, data_dir: str | Path | None = None) -> Path:
    """The directory local files of `name` are looked for in: `data_dir`, else
    ``$MNIST_JAX_DATA_DIR``, else the download cache."""
    check_name(name)
    if data_dir:
        return Path(data_dir)
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    return dataset_cache_dir(name)


def describe(name: str, data_dir: str | Path | None = None, source: str = "auto") -> DataInfo:
    """Where `name` would come from and, for local files, what they hold; never downloads."""
    plan = plan_source(name, data_dir, source)
    files: dict[str, tuple[Path, int] | None] = {}
    if plan.directory is not None and plan.kind != "tfds":
        for stem, path in find_files(plan.directory).items():
            files[stem] = (path, path.stat().st_size) if path else None
    dataset = error = None
    if plan.kind in ("local", "cache") and plan.directory is not None:
        try:
            dataset = load_idx_dir(name, plan.directory)
        except UserError as e:
            error = str(e)
    urls = tuple(urllib.parse.urljoin(base, f) for base in mirrors(name) for f in CHECKSUMS[name])
    return DataInfo(name, plan, files, urls, tfds_installed(), dataset, error)


def load_idx_dir(name: str, directory: str | Path, *, cache: bool = True) -> Dataset:
    """Parses and validates the four IDX files in `directory`, through the ``.npz`` cache.

    Only gzipped files are worth caching: decompressing MNIST costs ~0.2 s, while uncompressed
    files parse as views of their bytes, and a cache would only double their disk use. The key
    is the SHA-256 of the four files' bytes as stored (plus the dataset name and a layout
    version): reading and hashing the ~11 MB of MNIST .gz takes milliseconds, is exact (a
    changed byte means a new key, a copied directory keeps its key) and trusts no mtime. The
    cache sits beside the files when that directory is writable, else under the cache root;
    it is written atomically, and a corrupt or stale one is rebuilt.
    """
    check_name(name)
    directory = Path(directory)
    paths = require_files(name, directory)
    blobs = {stem: read_file(path) for stem, path in paths.items()}
    cache = cache and any(path.suffix == ".gz" for path in paths.values())
    key = cache_key(name, paths, blobs) if cache else ""
    origin = str(directory)
    if cache and (cached := read_cache(directory, name, key)) is not None:
        candidate, arrays, mismatched = cached
        warn_md5(paths, mismatched)
        return _assemble(name, arrays, f"{origin} (cached {candidate})")
    arrays, mismatched = parse_all(name, paths, blobs)
    warn_md5(paths, mismatched)
    if cache:
        write_cache(directory, name, key, arrays, mismatched)
    return _assemble(name, arrays, origin)


def _assemble(name: str, arrays: Mapping[str, np.ndarray], origin: str) -> Dataset:
    """Read-only arrays keyed ``{split}_{kind}`` -> a `Dataset`."""
    for array in arrays.values():
        array.setflags(write=False)
    return Dataset(
        name=name,
        train=Split(arrays["train_images"], arrays["train_labels"]),
        test=Split(arrays["test_images"], arrays["test_labels"]),
        class_names=spec(name).class_names,
        origin=origin,
    )
