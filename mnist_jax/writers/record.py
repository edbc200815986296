"""The run record as a writer: each log event becomes one line of metrics.jsonl."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mnist_jax.record import RunRecord
from mnist_jax.writers import Writer


class RecordWriter(Writer):
    def __init__(self, record: RunRecord) -> None:
        self.record = record

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.record.log({**metrics, "step": step})
