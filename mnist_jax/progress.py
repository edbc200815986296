"""What a person watching training sees: a live bar on a terminal, plain lines in a log."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any


class Progress:
    """A rich progress bar when stdout is a terminal, else one plain line per log event."""

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

    def train_event(self, event: Mapping[str, Any]) -> None:
        stats = (
            f"loss {event['train/loss']:.4f}  acc {event['train/accuracy']:.4f}  "
            f"{event['train/examples_per_sec']:,.0f} ex/s"
        )
        if self._bar is not None:
            self._bar.update(self._task, stats=stats)
        else:
            print(f"step {event['step']}/{self.total_steps}  epoch {event['epoch']:.2f}  {stats}")

    def epoch_event(self, event: Mapping[str, Any]) -> None:
        self.message(
            f"epoch {event['epoch']}: train loss {event['train/loss']:.4f}  "
            f"test loss {event['test/loss']:.4f}  test accuracy {event['test/accuracy']:.4f}  "
            f"macro F1 {event['test/f1_macro']:.4f}"
        )

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, flush=True)
