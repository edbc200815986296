"""Where a run's metrics go: one `Writer` interface, many destinations, one fan-out.

The run record (always), the progress display (always), Weights & Biases and TensorBoard (when
asked) are each a `Writer`; training talks to one `MultiWriter` and never to a destination by
name. A new destination is one module here with a `Writer` subclass, and one line in
`mnist_jax.train.open_writers`. A writer must never stop training: destinations that can fail
(a network, a full disk of their own) catch their errors and say so once, and one that is slow to
start or to write (W&B) runs in `Background`, beside training rather than in its way.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mnist_jax.errors import describe


@dataclasses.dataclass(frozen=True)
class TestResults:
    """The final evaluation of the test split, on the host."""

    __test__ = False  # the name is not a pytest test class's

    probs_NxC: np.ndarray
    labels_N: np.ndarray
    images_NxHxW: np.ndarray
    class_names: tuple[str, ...]
    confusion_CxC: np.ndarray
    curves: Any = None  # the evaluation's `metrics.OneVsRestCurves`; None: computed from probs


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

    def wait_open(self) -> None:
        """Returns once the destination is open and `info` complete (see `Background`)."""

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

    def wait_open(self) -> None:
        for w in self.writers:
            w.wait_open()

    def close(self, status: str, summary: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.close(status, summary)


class Background(Writer):
    """A destination opened and written on a worker thread, so that training never waits for it.

    `open_writer` (say, starting a W&B run: seconds of imports and a service to spawn) and every
    later call run on one worker thread that all `Background` writers of the process share, in
    the order they were made: the destination sees exactly the calls, in the order, that it would
    see on the main thread, and never two at once. Training waits only in `close` (for what is
    still queued) and in `wait_open`. `info` is `early_info` until the writer is open, then the
    open writer's (where it lacks a fact of `early_info`, that fact is None). An exception from
    `open_writer` or a call is reported as one line; one from `open_writer` leaves the no-op
    writer.
    """

    def __init__(self, open_writer: Callable[[], Writer], early_info: Mapping[str, Any]) -> None:
        self._early_info = dict(early_info)
        self._opened = _worker().submit(_opened_or_noop, open_writer)
        self._last: concurrent.futures.Future[Any] = self._opened

    @property
    def info(self) -> dict[str, Any]:  # type: ignore[override]
        if not self._opened.done():
            return dict(self._early_info)
        # A destination that did not start leaves its early facts empty, not standing.
        return {**dict.fromkeys(self._early_info), **self._opened.result().info}

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._call("write", step, dict(metrics))

    def write_evaluation(self, results: TestResults) -> None:
        self._call("write_evaluation", results)

    def write_checkpoint(self, path: Path, metadata: Mapping[str, Any]) -> None:
        self._call("write_checkpoint", path, dict(metadata))

    def message(self, text: str) -> None:
        self._call("message", text)

    def wait_open(self) -> None:
        self._opened.result()

    def close(self, status: str, summary: Mapping[str, Any]) -> None:
        self._call("close", status, dict(summary))
        self._last.result()

    def _call(self, method: str, *args: Any) -> None:
        def call() -> None:
            try:
                getattr(self._opened.result(), method)(*args)
            except Exception as e:  # noqa: BLE001 - a destination never stops training
                _report(f"a metrics destination failed in {method}", e, "training goes on")

        self._last = _worker().submit(call)


_background: concurrent.futures.ThreadPoolExecutor | None = None


def _worker() -> concurrent.futures.ThreadPoolExecutor:
    global _background
    if _background is None:
        _background = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="writers")
    return _background


def _opened_or_noop(open_writer: Callable[[], Writer]) -> Writer:
    try:
        return open_writer()
    except Exception as e:  # noqa: BLE001 - a destination never stops training
        _report("a metrics destination could not start", e, "training goes on without it")
        return Writer()


def _report(what: str, error: Exception, outcome: str) -> None:
    print(f"{what} ({describe(error)}); {outcome}", file=sys.stderr, flush=True)
