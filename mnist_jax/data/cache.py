"""The parsed-array cache: an ``.npz`` of a directory's four arrays, keyed by the files' content.

The key is the SHA-256 of the files' bytes as stored (plus the dataset name and a layout
version): exact (a changed byte means a new key, a copied directory keeps its key) and free of
mtimes. The cache sits beside the files when that directory is writable, else under the cache
root; it is written atomically, and a corrupt, stale or inconsistent one is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mnist_jax.data.locations import cache_root
from mnist_jax.data.registry import DatasetSpec, spec
from mnist_jax.files import atomic_write

log = logging.getLogger(__name__)

# Bump when the parsed-array layout changes, or parsing refuses files it used to accept (2:
# canonical files under each other's names), so that old caches are rebuilt rather than misread.
_CACHE_VERSION = "2"
_CACHE_NAME = "mnist-jax-cache.npz"


def cache_key(name: str, paths: Mapping[str, Path], blobs: Mapping[str, bytes]) -> str:
    """The key of the files `paths` whose bytes are `blobs` (both keyed by IDX stem)."""
    h = hashlib.sha256(f"mnist-jax/{_CACHE_VERSION}/{name}".encode())
    for stem, blob in blobs.items():
        h.update(f"\0{paths[stem].name}\0{len(blob)}\0".encode())
        h.update(hashlib.sha256(blob).digest())
    return h.hexdigest()


def read_cache(
    directory: Path, name: str, key: str
) -> tuple[Path, dict[str, np.ndarray], list[str]] | None:
    """The first intact cache for `key` (beside the files, else under the cache root): its
    path, its arrays keyed ``{split}_{kind}`` and its MD5-mismatched stems; None if there is
    none."""
    for candidate in _candidates(directory, name, key):
        arrays = _read(candidate, key, spec(name))
        if arrays is not None:
            md5_mismatch = arrays.pop("md5_mismatch")
            return candidate, arrays, md5_mismatch
    return None


def write_cache(
    directory: Path, name: str, key: str, arrays: Mapping[str, np.ndarray], md5_mismatch: list[str]
) -> None:
    """Writes the cache beside the files if allowed, else under the cache root; never fails."""
    payload = dict(arrays, key=np.array(key), md5_mismatch=np.array(md5_mismatch, dtype=str))
    beside, fallback = _candidates(directory, name, key)
    targets = [beside, fallback] if _writable_dir(directory) else [fallback]
    for target in targets:
        try:
            with atomic_write(target, "wb") as f:
                np.savez(f, **payload)
            return
        except OSError as e:
            log.info("could not write cache %s (%s)", target, e)


def _candidates(directory: Path, name: str, key: str) -> list[Path]:
    return [directory / _CACHE_NAME, cache_root() / "parsed" / f"{name}-{key[:20]}.npz"]


def _read(path: Path, key: str, dataset: DatasetSpec) -> dict[str, Any] | None:
    """The cached arrays if `path` is an intact cache for `key`, else None (it gets rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["key"]) != key:
                return None
            arrays: dict[str, Any] = {
                f"{split}_{kind}": npz[f"{split}_{kind}"]
                for split in ("train", "test")
                for kind in ("images", "labels")
            }
            arrays["md5_mismatch"] = [str(s) for s in npz["md5_mismatch"]]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.info("ignoring unreadable cache %s (%s); rebuilding it", path, e)
        return None
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if (
            images.dtype != np.uint8
            or images.shape[1:] != (dataset.height, dataset.width)
            or labels.dtype != np.int32
            or labels.shape != images.shape[:1]
            or (labels.size and not 0 <= labels.min() <= labels.max() < dataset.num_classes)
        ):
            log.info("ignoring inconsistent cache %s; rebuilding it", path)
            return None
    return arrays


def _writable_dir(directory: Path) -> bool:
    # Write permission bits are honoured even for root, who could otherwise write into a data
    # directory its owner marked read-only.
    try:
        mode = directory.stat().st_mode
    except OSError:
        return False
    return bool(mode & 0o222) and os.access(directory, os.W_OK)
