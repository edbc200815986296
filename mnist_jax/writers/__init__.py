"""Where a run's metrics go: one `Writer` interface, many destinations, one fan-out.

The run record (always), the progress display (always), Weights & Biases and TensorBoard (when
asked) are each a `Writer`; training talks to one `MultiWriter` and never to a destination by
name. A new destination is one module here with a `Writer` subclass, and one line in
`mnist_jax.train.open_writers`. A writer must never stop training: destinations that can fail
(a network, a full disk of their own) catch their errors and say so once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class TestResults:
    """The final evaluation of the test split, on the host."""

    probs_NxC: np.ndarray
    labels_N: np.ndarray
    images_NxHxW: np.ndarray
    class_names: tuple[str, ...]
    confusion_CxC: np.ndarray


class Writer:
    """The no-op writer, and the interface: every method is optional for a destination."""

    #: Facts for the run summary (e.g. the W&B run id); empty for most writers.
    info: Mapping[str, Any] = {}

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One log event at `step` (a `step` key in `metrics` is ignored)."""

    def write_evaluation(self, results: TestResults) -> None:
        """The final test evaluation: probabilities, labels, images, confusion counts."""

    def write_checkpoint(self, path: Path, metadata: Mapping[str, Any]) -> None:
        """The best checkpoint, once training is complete."""

    def message(self, text: str) -> None:
        """A line for the person watching (a stop, a failure)."""

    def close(self, status: str, summary: Mapping[str, Any]) -> None:
        """The run ended with `status`; `summary` is the final summary.json."""


class MultiWriter(Writer):
    """Fans every call out to each writer, in order."""

    def __init__(self, writers: Sequence[Writer]) -> None:
        self.writers = list(writers)

    @property
    def info(self) -> dict[str, Any]:  # type: ignore[override]
        return {k: v for w in self.writers for k, v in w.info.items()}

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write(step, metrics)

    def write_evaluation(self, results: TestResults) -> None:
        for w in self.writers:
            w.write_evaluation(results)

    def write_checkpoint(self, path: Path, metadata: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write_checkpoint(path, metadata)

    def message(self, text: str) -> None:
        for w in self.writers:
            w.message(text)

    def close(self, status: str, summary: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.close(status, summary)
