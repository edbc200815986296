"""Shared test fixtures: the real MNIST files, found through MNIST_JAX_DATA_DIR."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "datasets" / "mnist"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """Directory holding the four canonical MNIST IDX .gz files."""
    path = Path(os.environ.get("MNIST_JAX_DATA_DIR", DEFAULT_DATA_DIR))
    if not (path / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"real MNIST not found in {path}; set MNIST_JAX_DATA_DIR")
    return path
