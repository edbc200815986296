"""Datasets as host-side uint8 arrays, and everything known about them before loading.

Modules, each owning one thing:
- `registry`: dataset names, class names, image shape (`spec`), file names, mirrors, checksums,
  sources. Standard library only: `mnist_jax.config` imports it to validate flags.
- `locations`: the data and cache directories the environment selects.
- `dataset`: the `Dataset` and `Split` containers.
- `idx`: IDX parsing and validation, ``data verify``.
- `cache`: the parsed-array ``.npz`` cache keyed by the files' content.
- `fetch`: verified downloads from the mirrors.
- `tfds`: the tensorflow-datasets source.
- `loading`: `load_dataset` and the choice of source (``data info``).

Every public name is also reachable here (``data.load_dataset``, ``data.CLASS_NAMES``), but
imported lazily on first use (PEP 562): importing the registry, as the CLI's start does, must not
pull in numpy through this package.
"""

from __future__ import annotations

import importlib
from typing import Any

# submodule -> the public names re-exported from it
_EXPORTS: dict[str, tuple[str, ...]] = {
    "registry": (
        "CHECKSUMS",
        "CLASS_NAMES",
        "DATASETS",
        "FILE_STEMS",
        "MIRRORS",
        "MNIST_MD5",
        "SOURCES",
        "DatasetSpec",
        "check_name",
        "spec",
    ),
    "locations": ("CACHE_DIR_ENV", "DATA_DIR_ENV", "cache_root", "dataset_cache_dir"),
    "dataset": ("Dataset", "Split"),
    "idx": ("IMAGES_MAGIC", "LABELS_MAGIC", "DataWarning", "FileCheck", "find_files", "verify_dir"),
    "fetch": ("CONNECT_TIMEOUT_S", "MIRROR_ENV", "READ_TIMEOUT_S", "download", "mirrors"),
    "loading": (
        "DataInfo",
        "SourcePlan",
        "describe",
        "load_dataset",
        "load_idx_dir",
        "local_dir",
        "plan_source",
        "subset",
    ),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBMODULES = (*_EXPORTS, "tfds")
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    """Imports the submodule that defines `name` on first access and remembers the value."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
