"""What a person watching training sees: a live bar on a terminal, plain lines in a log."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from mnist_jax.metrics import metric_key
from mnist_jax.writers import Writer

TRAIN_LOSS, TRAIN_ACCURACY = metric_key("train", "loss"), metric_key("train", "accuracy")
RATE = metric_key("train", "examples_per_sec")
TEST_LOSS, TEST_ACCURACY = metric_key("test", "loss"), metric_key("test", "accuracy")
TEST_F1 = metric_key("test", "f1_macro")


class Progress(Writer):
    """A rich progress bar when stdout is a terminal, else one plain line per log event.

    Also a context manager (the live bar owns the terminal while it runs) with `advance`, which
    training calls after every compiled call.
    """

    def __init__(self, total_steps: int, steps_per_epoch: int, live: bool | None = None) -> None:
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.live = sys.stdout.isatty() if live is None else live
        self._bar = None
        self._task = None

    def __enter__(self) -> Progress:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total_steps, epoch=1, stats="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start_at(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, epoch=step // self.steps_per_epoch + 1)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if TEST_ACCURACY in metrics:
            self.message(
                f"epoch {metrics['epoch']}: train loss {metrics[TRAIN_LOSS]:.4f}  "
                f"test loss {metrics[TEST_LOSS]:.4f}  "
                f"test accuracy {metrics[TEST_ACCURACY]:.4f}  "
                f"macro F1 {metrics[TEST_F1]:.4f}"
            )
            return
        stats = (
            f"loss {metrics[TRAIN_LOSS]:.4f}  acc {metrics[TRAIN_ACCURACY]:.4f}  "
            f"{metrics[RATE]:,.0f} ex/s"
        )
        if self._bar is not None:
            self._bar.update(self._task, stats=stats)
        else:
            epoch = step / self.steps_per_epoch
            print(f"step {step}/{self.total_steps}  epoch {epoch:.2f}  {stats}", flush=True)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, flush=True)
