"""Stop requests: SIGINT and SIGTERM ask a run to stop at its next step boundary.

Installed by the `train` command before anything heavy is imported, so a Ctrl-C at any moment
of a run is seen: raised as KeyboardInterrupt wherever Python happens to be, it could land in a
callback (a garbage-collection hook of jax's) and be lost. Standard library only.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any


class StopRequest:
    """Whether SIGINT or SIGTERM asked this run to stop. Each run has its own, so a request
    can never outlive the run it was meant for."""

    def __init__(self) -> None:
        self.signals: list[int] = []

    def __call__(self) -> bool:
        return bool(self.signals)

    def raise_if_requested(self) -> None:
        """Before the run exists there is nothing to save: stop as Ctrl-C always does."""
        if self.signals:
            raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """From here on, SIGINT and SIGTERM are recorded in the request instead of raising."""
    request = StopRequest()

    def handler(signum: int, frame: Any) -> None:
        request.signals.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
