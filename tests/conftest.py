"""Shared test fixtures: the real MNIST files, found through MNIST_JAX_DATA_DIR."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Tests count compilations and time them: no persistent compilation cache unless a test asks
# (the variable reaches the CLI subprocesses too).
os.environ.setdefault("MNIST_JAX_COMPILATION_CACHE", "off")
DEFAULT_DATA_DIR = REPO.parent / "shared" / "datasets" / "mnist"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """Directory holding the four canonical MNIST IDX .gz files."""
    path = Path(os.environ.get("MNIST_JAX_DATA_DIR", DEFAULT_DATA_DIR))
    if not (path / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"real MNIST not found in {path}; set MNIST_JAX_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def tiny_config(mnist_dir):
    """A factory for a run that trains in seconds: a few hundred real images, a narrow CNN."""
    from mnist_jax.config import Config

    def make(runs_dir: Path, **changes) -> Config:
        settings = dict(
            data_dir=str(mnist_dir),
            train_examples=512,
            test_examples=300,
            conv_features=(8, 16),
            dense_features=32,
            batch_size=64,
            eval_batch_size=128,  # 300 is not a multiple: the last batch is padded
            epochs=2,
            log_every=3,
            runs_dir=str(runs_dir),
            wandb="disabled",
        )
        return Config(**{**settings, **changes})

    return make


@pytest.fixture
def drawn(monkeypatch):
    """The matplotlib figures the analysis figure functions (runs, sweeps) draw, in order; the
    PNG they return is the signature alone."""
    from mnist_jax.analysis import run_plots, sweep_plots

    figures: list = []

    def keep(fig):
        fig.canvas.draw()
        figures.append(fig)
        return b"\x89PNG\r\n\x1a\n"

    monkeypatch.setattr(run_plots, "to_png", keep)
    monkeypatch.setattr(sweep_plots, "to_png", keep)
    return figures
