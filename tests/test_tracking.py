"""The local run record: atomic JSON, the event log, and its repair on resume."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mnist_jax.errors import UserError
from mnist_jax.files import dumps, write_json_atomic
from mnist_jax.record import RunRecord, read_json

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


def finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


@given(json_values)
def test_dumps_round_trips_and_writes_non_finite_floats_as_null(value):
    assert json.loads(dumps(value)) == finite(value)


def test_a_confusion_matrix_is_written_one_row_per_line(tmp_path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"test/confusion_matrix": [[5, 0], [1, 4]]})
    assert "[5, 0]" in path.read_text() and "[1, 4]" in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left


def test_events_survive_a_line_cut_short_and_are_truncated_for_resume(tmp_path):
    record = RunRecord.create(tmp_path, "run", {"lr": 0.1}, {"jax": "x"})
    for step in (1, 2, 3):
        record.log({"step": step, "train/loss": 1.0 / step})
    with record.metrics_path.open("a") as f:
        f.write('{"step": 4, "train/lo')  # a crash mid-write
    assert [e["step"] for e in record.read_events()] == [1, 2, 3]
    record.truncate_events(after_step=2)
    assert [e["step"] for e in record.read_events()] == [1, 2]
    reopened = RunRecord.open(tmp_path / "run")
    assert reopened.summary == {"status": "running"}
    assert reopened.read_config() == {"config": {"lr": 0.1}, "environment": {"jax": "x"}}


def test_damaged_or_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        RunRecord.open(tmp_path)
    bad = tmp_path / "summary.json"
    bad.write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        read_json(bad)


def test_a_record_holding_json_of_the_wrong_shape_is_a_one_line_error(tmp_path):
    record = RunRecord.create(tmp_path, "run", {"lr": 0.1}, {})
    record.summary_path.write_text("[1, 2]")
    with pytest.raises(UserError, match="not a JSON object"):
        RunRecord.open(record.dir)
    record.summary_path.write_text("{}")
    record.config_path.write_text("[]")
    with pytest.raises(UserError, match='no "config" object'):
        RunRecord.open(record.dir).read_config()


def test_a_run_being_written_cannot_be_written_by_a_second_process(tmp_path):
    import subprocess
    import sys

    record = RunRecord.create(tmp_path, "run", {}, {})
    code = (
        "import sys; from mnist_jax.record import RunRecord\n"
        "from mnist_jax.errors import UserError\n"
        f"r = RunRecord.open({str(record.dir)!r})\n"
        "try:\n"
        "    with r.writer_lock(): print('locked')\n"
        "except UserError as e: print(e)\n"
    )
    with record.writer_lock():
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
        assert "being written by another mnist-jax process" in out
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.strip() == "locked"


def test_storage_failures_are_told_apart_from_other_errors():
    import errno

    from mnist_jax.files import storage_problem

    assert storage_problem(OSError(errno.ENOSPC, "No space left on device")) == (
        "no space left on the device"
    )
    assert storage_problem(OSError(errno.ENOSPC, "checkpoints: about 3 MB needed")) == (
        "no space left on the device (checkpoints: about 3 MB needed)"
    )
    orbax_style = ValueError('RESOURCE_EXHAUSTED: Failed writing "x": No space left on device')
    assert storage_problem(orbax_style) == "no space left on the device"
    assert storage_problem(OSError(errno.EDQUOT, "Disk quota exceeded")) is not None
    assert storage_problem(ValueError("shapes do not match")) is None
    assert storage_problem(OSError(errno.ENOENT, "No such file")) is None


def test_a_run_whose_writer_died_reads_as_stale(tmp_path):
    import fcntl

    from mnist_jax.record import load_run

    record = RunRecord.create(tmp_path, "run", {"lr": 0.1}, {})
    with record.writer_lock():
        assert load_run(record.dir).status == "running"
        # Another process's view: a second open file description sees the lock held.
        with (record.dir / ".lock").open("rb") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    stale = load_run(record.dir)
    assert stale.status == "stale"
    assert any("no process holds its writer lock" in p for p in stale.problems)
    assert json.loads((record.dir / "summary.json").read_text())["status"] == "running"
