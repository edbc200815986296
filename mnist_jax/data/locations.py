"""Where data lives by default: the environment variables that say so and the cache root.

Both downloads and the parsed-array cache live under the cache root; a data directory given
through the environment is read in place.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "MNIST_JAX_DATA_DIR"
CACHE_DIR_ENV = "MNIST_JAX_CACHE_DIR"


def cache_root() -> Path:
    """``$MNIST_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/mnist-jax``, else ``~/.cache/mnist-jax``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mnist-jax"


def dataset_cache_dir(name: str) -> Path:
    """Where downloads of `name` go by default."""
    return cache_root() / name
