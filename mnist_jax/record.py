"""The run directory (see docs/run-record.md): the one place that knows its layout.

Two ways in, one way of parsing. `RunRecord` is the writer's view (training, resume, evaluate): a
missing or damaged file is a one-line `UserError`. `load_run` is the reader's view (analysis, the
W&B mirror): a run that is still running, was interrupted, failed, or lost a file comes back with
what could be read and a list of `problems`, never an exception. Both parse JSON and the event log
through the same functions.

Files are small and written often, so each write is atomic (temp file + rename) or an appended,
flushed line: a run killed at any moment leaves readable files behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import math
import secrets
import shutil
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mnist_jax.errors import UserError, first_line
from mnist_jax.files import finite, storage_problem, write_json_atomic, write_text_atomic
from mnist_jax.metrics import metric_key

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PREDICTIONS_FILE = "predictions.npz"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".lock"
# The status analysis shows for a run whose summary says "running" but whose process is gone.
STALE = "stale"
CHECKPOINT_KINDS = ("last", "best")

# An epoch event is the one that carries the test accuracy; training events carry the train loss.
_EPOCH_KEY = metric_key("test", "accuracy")
_STEP_KEY = metric_key("train", "loss")


def default_run_name(dataset: str) -> str:
    """A unique, sortable name: dataset, UTC time, and a random suffix against collisions."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{dataset}-{stamp}-{secrets.token_hex(2)}"


# ============================================================================================
# Parsing (shared by the writer and the reader)
# ============================================================================================


def _load_json(path: Path) -> Any:
    """The JSON value in `path`. Raises OSError (FileNotFoundError when absent) or ValueError
    (not UTF-8, not JSON)."""
    return json.loads(path.read_text(encoding="utf-8"))


def _parse_events(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON-object lines of an event log, and how many non-blank lines were not one (a line
    cut short by a crash). Raises OSError."""
    events, unreadable = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            unreadable += 1
            continue
        if isinstance(event, dict):
            events.append(event)
        else:
            unreadable += 1
    return events, unreadable


def read_json(path: Path) -> Any:
    """The JSON in `path`; a missing or damaged file is a one-line error."""
    try:
        return _load_json(path)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; is {path.parent} a run directory?") from None
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}); the run record is damaged") from None


# ============================================================================================
# The writer's view
# ============================================================================================


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
        if model is not None:
            saved["model"] = dict(model)
        try:
            write_json_atomic(record.config_path, saved)
            record.update_summary(status="running")
        except OSError as e:
            # A directory without its record would block the name and could not be resumed.
            shutil.rmtree(run_dir, ignore_errors=True)
            problem = storage_problem(e) or e.strerror or str(e)
            raise UserError(
                f"cannot write the run record in {run_dir}: {problem}; free some space or "
                "choose another --runs-dir",
                exit_code=1,
            ) from None
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
            f.write(json.dumps(finite(dict(event)), sort_keys=True) + "\n")

    def read_events(self) -> list[dict[str, Any]]:
        """The logged events; a line cut short by a crash is skipped."""
        if not self.metrics_path.is_file():
            return []
        return _parse_events(self.metrics_path)[0]

    def truncate_events(self, after_step: int) -> None:
        """Drops events logged after `after_step`, so a resumed run does not log them twice."""
        kept = [e for e in self.read_events() if e.get("step", 0) <= after_step]
        write_text_atomic(
            self.metrics_path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in kept)
        )

    def update_summary(self, **values: Any) -> None:
        self.summary.update(values)
        write_json_atomic(self.summary_path, self.summary)


class FollowerRecord(RunRecord):
    """The run record as every process but the first of a multi-process run sees it: the same
    directory and what it holds, but nothing written (process 0 writes the one record, and
    holds its writer lock)."""

    @classmethod
    def follow(cls, run_dir: str | Path) -> FollowerRecord:
        """The record process 0 creates in `run_dir` (which may not exist yet)."""
        return cls(Path(run_dir))

    def writer_lock(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def log(self, event: Mapping[str, Any]) -> None:
        pass

    def truncate_events(self, after_step: int) -> None:
        pass

    def update_summary(self, **values: Any) -> None:
        self.summary.update(values)  # kept, as process 0 keeps it, but not written


# ============================================================================================
# The reader's view: tolerant
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class Predictions:
    """`predictions.npz`: the final model's test-split outputs."""

    probs_NxC: np.ndarray
    labels_N: np.ndarray
    indices_N: np.ndarray


@dataclasses.dataclass
class Run:
    """One run directory as found on disk; whatever could not be read is listed in `problems`."""

    path: Path
    name: str
    config: dict[str, Any]
    environment: dict[str, Any]
    summary: dict[str, Any]
    events: list[dict[str, Any]]
    predictions: Predictions | None
    checkpoints: dict[str, list[int]]
    problems: list[str]
    model: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def status(self) -> str:
        """The summary's status, or `unknown` when the summary is missing or unreadable."""
        status = self.summary.get("status")
        return status if isinstance(status, str) and status else "unknown"

    @property
    def epoch_events(self) -> list[dict[str, Any]]:
        """The per-epoch evaluation events (the ones that carry `test/accuracy`), by step."""
        events = [e for e in self.events if _EPOCH_KEY in e]
        return sorted(events, key=lambda e: number(e.get("step")) or 0)

    @property
    def step_events(self) -> list[dict[str, Any]]:
        """The training events logged every `log_every` steps, by step."""
        events = [e for e in self.events if _EPOCH_KEY not in e and _STEP_KEY in e]
        return sorted(events, key=lambda e: number(e.get("step")) or 0)

    def final_metrics(self) -> dict[str, Any]:
        """The latest `test/*` numbers: the summary's, else those of the last epoch event."""
        if number(self.summary.get(_EPOCH_KEY)) is not None:
            return self.summary
        epochs = self.epoch_events
        return {**self.summary, **epochs[-1]} if epochs else self.summary


def looks_like_run(path: Path) -> bool:
    """A run directory, or a damaged one: no config.json, but files only training writes."""
    written = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, CHECKPOINTS_DIR, PREDICTIONS_FILE)
    return path.is_dir() and any((path / name).exists() for name in written)


def writer_alive(run_dir: Path) -> bool:
    """Whether a process is writing the run: it holds the run's writer lock while it lives,
    and the system releases the lock when the process dies, however it dies (even SIGKILL).
    Where advisory locks or the lock file do not exist, every run counts as alive."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no advisory locks on this platform
        return True
    try:
        with (Path(run_dir) / LOCK_FILE).open("rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no lock file (a hand-made or copied run): nothing to tell by
        return True
    return False


def load_run(path: str | Path) -> Run:
    """Reads a run directory, noting (not raising) anything missing, partial or damaged."""
    path = Path(path)
    problems: list[str] = []
    config_file = _read_json_object(path / CONFIG_FILE, problems) or {}
    config = config_file.get("config")
    if config_file and not isinstance(config, dict):
        problems.append(f"{CONFIG_FILE} has no 'config' object")
    environment = config_file.get("environment")
    model = config_file.get("model")  # written by newer training; older runs lack it
    summary = _read_json_object(path / SUMMARY_FILE, problems) or {}
    if summary.get("status") == "running" and not writer_alive(path):
        summary = {**summary, "status": STALE}
        problems.append(
            "its summary says running, but no process holds its writer lock: the training "
            f"process died; continue it with `mnist-jax train --resume {path}`"
        )
    return Run(
        path=path,
        name=path.resolve().name,
        config=config if isinstance(config, dict) else {},
        environment=environment if isinstance(environment, dict) else {},
        summary=summary,
        events=_read_events(path / METRICS_FILE, problems),
        predictions=_read_predictions(path / PREDICTIONS_FILE, problems),
        checkpoints=_find_checkpoints(path / CHECKPOINTS_DIR, problems),
        problems=problems,
        model=model if isinstance(model, dict) else {},
    )


def _read_json_object(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        problems.append(f"no {path.name}")
        return None
    try:
        value = _load_json(path)
    except ValueError as e:
        problems.append(f"{path.name} is not valid JSON ({first_line(e)})")
        return None
    except OSError as e:
        problems.append(f"{path.name} cannot be read ({e.strerror})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path.name} does not hold a JSON object")
        return None
    return value


def _read_events(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        problems.append(f"no {path.name}")
        return []
    try:
        events, unreadable = _parse_events(path)
    except OSError as e:
        problems.append(f"{path.name} cannot be read ({e.strerror})")
        return []
    if not events and not unreadable:
        problems.append(f"{path.name} is empty")
    if unreadable:
        problems.append(f"{unreadable} unreadable line(s) in {path.name}")
    if events and not any(_EPOCH_KEY in e for e in events):
        problems.append(f"no epoch has finished: no epoch events in {path.name}")
    return events


def _read_predictions(path: Path, problems: list[str]) -> Predictions | None:
    if not path.is_file():
        problems.append(f"no {path.name} (written when training ends)")
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            probs = np.asarray(npz["probs"], np.float32)
            labels = np.asarray(npz["labels"], np.int64)
            indices = np.asarray(npz["indices"], np.int64)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        problems.append(f"{path.name} cannot be read ({first_line(e)})")
        return None
    n = labels.shape[0] if labels.ndim == 1 else -1
    if probs.ndim != 2 or n != probs.shape[0] or indices.shape != labels.shape or n == 0:
        problems.append(
            f"{path.name} has inconsistent shapes: probs {probs.shape}, labels {labels.shape}, "
            f"indices {indices.shape}"
        )
        return None
    if labels.min() < 0 or labels.max() >= probs.shape[1] or not np.isfinite(probs).all():
        problems.append(f"{path.name} holds labels out of range or non-finite probabilities")
        return None
    return Predictions(probs, labels, indices)


def _find_checkpoints(path: Path, problems: list[str]) -> dict[str, list[int]]:
    found = {}
    for kind in CHECKPOINT_KINDS:
        folder = path / kind
        steps = (
            sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
            if folder.is_dir()
            else []
        )
        if steps:
            found[kind] = steps
    if not found:
        problems.append("no checkpoint")
    return found


def number(value: Any) -> float | None:
    """A finite number from JSON, or None (missing, null, NaN, or not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None
