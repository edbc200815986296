"""The local run record (see docs/run-record.md): the source of truth for every run.

Files are small and written often, so each write is atomic (temp file + rename) or an appended,
flushed line: a run killed at any moment leaves readable files behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import re
import secrets
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mnist_jax.errors import UserError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PREDICTIONS_FILE = "predictions.npz"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".lock"


def default_run_name(dataset: str) -> str:
    """A unique, sortable name: dataset, UTC time, and a random suffix against collisions."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{dataset}-{stamp}-{secrets.token_hex(2)}"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Writes JSON so that readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(dumps(payload) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_NUMBER_LIST = re.compile(r"\[\s+((?:-?[\d.eE+-]+|null)(?:,\s+(?:-?[\d.eE+-]+|null))*)\s+\]")


def dumps(payload: Any) -> str:
    """Indented, sorted JSON with lists of numbers kept on one line (a confusion matrix reads
    as a matrix); non-finite floats become null."""
    text = json.dumps(_finite(payload), indent=2, sort_keys=True)
    return _NUMBER_LIST.sub(lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; is {path.parent} a run directory?") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); the run record is damaged") from None


class RunRecord:
    """One run directory: config.json, metrics.jsonl, summary.json, checkpoints/."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir)
        self.summary: dict[str, Any] = {}

    @classmethod
    def create(
        cls,
        runs_dir: str | Path,
        name: str,
        config: Mapping[str, Any],
        environment: Mapping,
        model: Mapping[str, Any] | None = None,
    ) -> RunRecord:
        """Makes a new run directory; an existing run is never overwritten. `model` is the
        model's own description (layers, parameters, FLOPs)."""
        run_dir = Path(runs_dir) / name
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise UserError(
                f"run directory {run_dir} already exists; choose another --name, "
                f"or continue it with --resume {run_dir}"
            ) from None
        except OSError as e:
            raise UserError(f"cannot create run directory {run_dir}: {e.strerror}") from None
        record = cls(run_dir)
        saved = {"config": dict(config), "environment": dict(environment)}
        write_json_atomic(record.config_path, {**saved, "model": dict(model or {})})
        record.update_summary(status="running")
        return record

    @classmethod
    def open(cls, run_dir: str | Path) -> RunRecord:
        """Opens an existing run (for resume, evaluate, analysis)."""
        record = cls(Path(run_dir))
        if not record.config_path.is_file():
            raise UserError(f"{run_dir} is not a run directory: it has no {CONFIG_FILE}")
        if record.summary_path.is_file():
            record.summary = read_json(record.summary_path)
            if not isinstance(record.summary, dict):
                raise UserError(
                    f"{record.summary_path} is not a JSON object; the record is damaged"
                )
        return record

    @property
    def config_path(self) -> Path:
        return self.dir / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.dir / METRICS_FILE

    @property
    def summary_path(self) -> Path:
        return self.dir / SUMMARY_FILE

    @property
    def predictions_path(self) -> Path:
        return self.dir / PREDICTIONS_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.dir / CHECKPOINTS_DIR

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Only one process writes a run at a time (a second `--resume` is refused)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no advisory locks on this platform
            yield
            return
        with (self.dir / LOCK_FILE).open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(
                    f"run {self.dir} is being written by another mnist-jax process; "
                    "wait for it to finish or stop it first"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def read_config(self) -> dict[str, Any]:
        saved = read_json(self.config_path)
        if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
            raise UserError(f'{self.config_path} has no "config" object; the run record is damaged')
        return saved

    def log(self, event: Mapping[str, Any]) -> None:
        """Appends one event to metrics.jsonl (flushed, so a crash loses at most this line)."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(_finite(dict(event)), sort_keys=True) + "\n")

    def read_events(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        events = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        return events

    def truncate_events(self, after_step: int) -> None:
        """Drops events logged after `after_step`, so a resumed run does not log them twice."""
        kept = [e for e in self.read_events() if e.get("step", 0) <= after_step]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in kept))
        os.replace(tmp, self.metrics_path)

    def update_summary(self, **values: Any) -> None:
        self.summary.update(values)
        write_json_atomic(self.summary_path, self.summary)


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: non-finite floats are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
