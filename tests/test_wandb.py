"""The W&B mirror, checked by reading back the run's `.wandb` file (no network anywhere).

A `.wandb` file is a LevelDB-style log: a 7-byte file header, then 32 KiB blocks of records,
each with a 7-byte header (crc32 of type+data, length, type FULL/FIRST/MIDDLE/LAST) framing a
`wandb_internal_pb2.Record` protobuf. `read_run` parses it independently of wandb's reader.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import types
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sklearn.metrics
import yaml
from PIL import Image

# W&B is installed with the package; a machine without it (a bare accelerator image) skips.
pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")

from mnist_jax.config import Config  # noqa: E402
from mnist_jax.errors import UserError  # noqa: E402
from mnist_jax.writers import Background, TestResults, Writer  # noqa: E402
from mnist_jax.writers import wandb as wandb_mirror  # noqa: E402
from mnist_jax.writers.wandb import start_mirror  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"
CLASS_NAMES = ("zero", "one", "two", "three")
ENVIRONMENT = {"jax": "0.10.2", "backend": "cpu", "device_count": 1, "git_commit": None}


# ---------------------------------------------------------------------------------------------
# Reading a .wandb file
# ---------------------------------------------------------------------------------------------


def read_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    block, pos, records, pending = 32768, 7, [], b""
    while pos < len(data):
        if block - pos % block < 7:  # a block's trailer is too short for a record header
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"bad checksum at byte {pos}"
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _key(item: Any) -> tuple[str, ...]:
    return tuple(item.nested_key) or (item.key,)


@dataclasses.dataclass
class LoggedRun:
    """What a `.wandb` file says was logged."""

    run_id: str
    run: Any  # the RunRecord: project, name, tags, group, notes
    files_dir: Path
    config: dict[str, Any]
    history: list[dict[str, Any]]  # one dict per row; nested keys joined with "."
    summary: dict[str, Any]
    artifacts: list[Any]
    exit_code: int | None

    def row(self, step: int) -> dict[str, Any]:
        (row,) = [r for r in self.history if r["_step"] == step]
        return row

    def table(self, key: str) -> list[list[Any]]:
        path = self.files_dir / self.summary[key]["path"]
        return json.loads(path.read_text())["data"]


def read_run(run_dir: Path, pattern: str = "*run-*") -> LoggedRun:
    """Reads the one W&B run under `run_dir`, once wandb has closed its files.

    `run.finish()` returns before the service has written the run's last records; shutting
    the service down waits for them.
    """
    import wandb

    wandb.teardown()
    (path,) = (run_dir / "wandb").glob(f"{pattern}/run-*.wandb")
    config: dict[str, Any] = {}
    history, summary, artifacts, exit_code, run = [], {}, [], None, None
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = run or record.run
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        else:
            updates = []
        for item in updates:
            _set_nested(config, _key(item), json.loads(item.value_json))
        if kind == "history":
            history.append(
                {".".join(_key(i)): json.loads(i.value_json) for i in record.history.item}
            )
        elif kind == "summary":
            for item in record.summary.update:
                summary[".".join(_key(item))] = json.loads(item.value_json)
        elif kind == "artifact":
            artifacts.append(record.artifact)
        elif kind == "exit":
            exit_code = record.exit.exit_code
    # Media and tables are logged as several leaf keys; put them back together.
    summary = _regroup(summary)
    history = [_regroup(row) for row in history]
    return LoggedRun(
        run.run_id, run, path.parent / "files", config, history, summary, artifacts, exit_code
    )


def _set_nested(target: dict, keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = value


def _regroup(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        head, _, leaf = key.partition(".")
        if leaf and not head.startswith("_"):
            out.setdefault(head, {})[leaf] = value
        else:
            out[key] = value
    return out


def same(a: Any, b: Any) -> bool:
    """Equality where NaN equals NaN or null (how the run record's JSON spells NaN)."""

    def missing(v: Any) -> bool:
        return v is None or (isinstance(v, float) and math.isnan(v))

    return missing(a) and missing(b) if missing(a) or missing(b) else a == b


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_wandb_env(tmp_path, monkeypatch):
    """No credentials, no user settings, a private HOME; a fresh wandb session per test.

    wandb reads its environment once per process, so each test tears the session down.
    """
    for var in list(os.environ):
        if var.startswith("WANDB_") or var == "NETRC":
            monkeypatch.delenv(var)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    yield home
    if "wandb" in sys.modules:
        import wandb

        wandb.teardown()


@pytest.fixture
def run_dir(tmp_path) -> Path:
    path = tmp_path / "runs" / "mnist-test-run"
    path.mkdir(parents=True)
    return path


def offline_config(**changes: Any) -> Config:
    return Config(
        wandb="offline",
        wandb_tags=("ci", "mirror"),
        wandb_group="tests",
        wandb_notes="synthetic",
        **changes,
    )


def epoch_event(step: int, epoch: int, accuracy: float) -> dict[str, Any]:
    return {
        "step": step,
        "epoch": epoch,
        "train/loss": 0.5 / epoch,
        "train/accuracy": 0.8 + epoch / 100,
        "test/loss": 0.4 / epoch,
        "test/accuracy": accuracy,
        "test/auroc/3": float("nan"),  # a class with no test example
        "test/precision/0": 0.25 * epoch,
    }


def train_event(step: int, steps_per_epoch: int) -> dict[str, Any]:
    return {
        "step": step,
        "epoch": step / steps_per_epoch,
        "train/loss": 1.0 / step,
        "train/accuracy": 0.5 + step / 1000,
        "train/lr": 0.001 * step,
        "train/examples_per_sec": 1000.0 + step,
    }


def synthetic_events() -> list[dict[str, Any]]:
    """Train events every 5 steps and an epoch event at each epoch end (20 steps), the way the
    training loop logs them: the epoch event comes after a train event at the same step."""
    events = []
    for epoch in (1, 2, 3):
        for step in range(20 * epoch - 15, 20 * epoch + 1, 5):
            events.append(train_event(step, 20))
        events.append(epoch_event(20 * epoch, epoch, 0.9 + epoch / 100))
    return events


def synthetic_evaluation(n: int = 600, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = len(CLASS_NAMES)
    labels_N = rng.integers(0, c, n).astype(np.int32)
    logits_NxC = rng.normal(size=(n, c))
    logits_NxC[np.arange(n), labels_N] += 1.5
    # Rounded so that some scores tie, as real softmax outputs in float32 do.
    probs_NxC = np.round(np.exp(logits_NxC) / np.exp(logits_NxC).sum(1, keepdims=True), 3)
    probs_NxC = probs_NxC.astype(np.float32)
    images_NxHxW = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    confusion_CxC = sklearn.metrics.confusion_matrix(labels_N, probs_NxC.argmax(1), labels=range(c))
    return probs_NxC, labels_N, images_NxHxW, confusion_CxC


def fake_checkpoint(root: Path) -> Path:
    ckpt = root / "checkpoints" / "best" / "60"
    (ckpt / "state").mkdir(parents=True)
    (ckpt / "state" / "params.bin").write_bytes(bytes(range(256)) * 40)
    (ckpt / "_CHECKPOINT_METADATA").write_text('{"step": 60}')
    return ckpt


# ---------------------------------------------------------------------------------------------
# Mode resolution and the disabled mirror (no wandb)
# ---------------------------------------------------------------------------------------------


def write_netrc(home: Path, host: str) -> None:
    path = home / ".netrc"
    path.write_text(f"machine {host}\n  login user\n  password {FAKE_KEY}\n")
    path.chmod(0o600)


def test_mode_comes_from_config_then_env_then_credentials(clean_wandb_env, monkeypatch):
    home = clean_wandb_env
    assert wandb_mirror.resolve_mode(None)[0] == "offline"
    assert "wandb login" in wandb_mirror.resolve_mode(None)[1]
    write_netrc(home, "example.org")  # an entry for another host is not a W&B key
    assert wandb_mirror.resolve_mode(None)[0] == "offline"
    write_netrc(home, "api.wandb.ai")
    assert wandb_mirror.resolve_mode(None) == ("online", None)
    assert wandb_mirror.configured_api_key() == FAKE_KEY
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_mirror.resolve_mode(None)[0] == "offline"
    write_netrc(home, "wandb.example.org")
    assert wandb_mirror.resolve_mode(None)[0] == "online"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_mirror.resolve_mode(None) == ("offline", None)
    assert wandb_mirror.resolve_mode("disabled") == ("disabled", None)
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(UserError, match="WANDB_MODE"):
        wandb_mirror.resolve_mode(None)


def test_login_host_from_wandb_settings_file_and_key_from_env(clean_wandb_env, monkeypatch):
    home = clean_wandb_env
    settings = home / ".config" / "wandb" / "settings"
    settings.parent.mkdir(parents=True)
    settings.write_text("[default]\nbase_url = https://self-hosted.example.org\n")
    write_netrc(home, "self-hosted.example.org")
    assert wandb_mirror.resolve_mode(None)[0] == "online"
    (home / ".netrc").unlink()
    assert wandb_mirror.resolve_mode(None)[0] == "offline"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert wandb_mirror.resolve_mode(None)[0] == "online"


def test_disabled_mirror_does_nothing_writes_nothing_and_never_imports_wandb(run_dir):
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        import numpy as np
        from mnist_jax.config import Config
        from mnist_jax.writers import TestResults, Writer
        from mnist_jax.writers.wandb import start_mirror, start_mirror_in_background
        run_dir = Path({str(run_dir)!r})
        background = start_mirror_in_background(Config(wandb="disabled"), run_dir, {{}})
        assert type(background) is Writer and background.info == {{}}
        mirror = start_mirror(Config(wandb="disabled"), run_dir, {{}})
        assert type(mirror) is Writer and mirror.info == {{}}
        mirror.write(1, {{"step": 1, "train/loss": 1.0}})
        results = TestResults(np.ones((2, 2)), np.zeros(2), np.zeros((2, 3, 3)), ("a", "b"),
                              np.eye(2))
        mirror.write_evaluation(results)
        mirror.write_checkpoint(Path("missing"), {{}})
        mirror.close("completed", {{"status": "completed"}})
        assert "wandb" not in sys.modules, "wandb was imported"
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert all_files(run_dir) == []


# ---------------------------------------------------------------------------------------------
# The offline mirror, read back
# ---------------------------------------------------------------------------------------------


def test_offline_mirror_records_config_history_evaluation_checkpoint_and_summary(
    run_dir, clean_wandb_env, capsys
):
    config = offline_config(lr=0.003, batch_size=64, conv_features=(8, 16))
    events = synthetic_events()
    probs, labels, images, confusion = synthetic_evaluation()
    ckpt = fake_checkpoint(run_dir)
    metadata = {"test/accuracy": 0.93, "test/auroc/3": float("nan"), "step": np.int64(60)}
    summary = {
        "status": "completed",
        "step": 60,
        "test/accuracy": 0.93,
        "train/examples_per_sec": 1234.5,  # differs from the last train event's value
        "test/confusion_matrix": confusion.tolist(),
        "best/test/accuracy": 0.93,
    }

    mirror = start_mirror(config, run_dir, ENVIRONMENT)
    for event in events:
        mirror.write(event["step"], event)
    mirror.write_evaluation(TestResults(probs, labels, images, CLASS_NAMES, confusion))
    mirror.write_checkpoint(ckpt, metadata)
    mirror.close("completed", summary)

    logged = read_run(run_dir)
    assert mirror.info == {
        "wandb/run_id": logged.run_id,
        "wandb/mode": "offline",
        "wandb/dir": str(logged.files_dir.parent),
    }
    assert logged.exit_code == 0
    assert (logged.run.project, logged.run.display_name, logged.run.job_type) == (
        "mnist-jax",
        run_dir.name,
        "train",
    )
    assert (list(logged.run.tags), logged.run.run_group, logged.run.notes) == (
        ["ci", "mirror"],
        "tests",
        "synthetic",
    )

    # Config: every Config field plus the environment, as given.
    expected_config = {**config.to_dict(), "environment": ENVIRONMENT}
    assert {k: v for k, v in logged.config.items() if k != "_wandb"} == expected_config

    # History: one row per step, holding every event logged at that step. W&B keeps one value
    # per key and step, so a second event's colliding split/name keys go to split_epoch/name:
    # train/loss stays the interval's at an epoch end too.
    expected_rows: dict[int, dict[str, Any]] = {}
    for event in events:
        row = expected_rows.setdefault(event["step"], {})
        for key, value in event.items():
            if key in row and "/" in key:
                split, name = key.split("/", 1)
                key = f"{split}_epoch/{name}"
            row[key] = value
    assert [row["_step"] for row in logged.history] == sorted(expected_rows)
    for step, expected in expected_rows.items():
        row = logged.row(step)
        for key, value in expected.items():
            if key != "step":
                assert same(value, row[key]), (step, key, value, row[key])
    for epoch_ev in (e for e in events if "test/accuracy" in e):
        assert logged.row(epoch_ev["step"])["test/accuracy"] == epoch_ev["test/accuracy"]

    # Summary: the final summary wins over the last row's values.
    for key, value in summary.items():
        assert logged.summary[key] == value, key

    # Evaluation: tables and charts at the last step.
    last = logged.row(60)
    assert {"test/confusion_chart_table", "test/roc_curve_table", "test/pr_curve_table"} <= set(
        last
    )
    visualize = logged.config["_wandb"]["visualize"]
    assert visualize["test/confusion_chart"]["panel_config"]["panelDefId"] == (
        "wandb/confusion_matrix/v1"
    )
    for chart in ("test/roc_curve", "test/pr_curve"):
        panel = visualize[chart]["panel_config"]
        assert panel["panelDefId"] == "wandb/area-under-curve/v0"
        assert panel["userQuery"]["queryFields"][0]["fields"][3]["args"][0]["value"] == (
            f"{chart}_table"
        )
    assert_confusion_table(logged.table("test/confusion_chart_table"), confusion)
    assert_roc_table(logged.table("test/roc_curve_table"), probs, labels)
    assert_pr_table(logged.table("test/pr_curve_table"), probs, labels)
    assert_misclassified(logged, last["test/misclassified"], probs, labels, images)

    # The checkpoint as a model artifact, files and digests intact.
    (model,) = [a for a in logged.artifacts if a.type == "model"]
    assert model.name == f"model-{logged.run_id}"
    assert "best" in model.aliases
    assert json.loads(model.metadata) == {"test/accuracy": 0.93, "test/auroc/3": None, "step": 60}
    files = {p.relative_to(ckpt).as_posix(): p for p in all_files(ckpt)}
    entries = {entry.path: entry for entry in model.manifest.contents}
    assert set(entries) == set(files) == {"state/params.bin", "_CHECKPOINT_METADATA"}
    for name, entry in entries.items():
        md5 = base64.b64encode(hashlib.md5(files[name].read_bytes()).digest()).decode()
        assert entry.digest == md5 and entry.size == files[name].stat().st_size
        assert Path(entry.local_path).is_relative_to(run_dir / "wandb")

    # Everything W&B wrote is inside the run directory; nothing in HOME; env put back.
    home = clean_wandb_env
    assert all_files(home) == []
    assert {p.relative_to(run_dir).parts[0] for p in all_files(run_dir)} == {"wandb", "checkpoints"}
    assert "WANDB_CACHE_DIR" not in os.environ and "WANDB_DATA_DIR" not in os.environ

    # Explicit offline: wandb is silenced and one line says where the run went.
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"wandb sync {mirror.info['wandb/dir']}" in err[0]


def assert_confusion_table(rows: list[list[Any]], confusion_CxC: np.ndarray) -> None:
    assert len(rows) == confusion_CxC.size
    for actual, predicted, count in rows:
        assert count == confusion_CxC[CLASS_NAMES.index(actual), CLASS_NAMES.index(predicted)]


def curve_points(rows: list[list[Any]], k: int) -> np.ndarray:
    return np.array([[x, y] for name, x, y in rows if name == CLASS_NAMES[k]])


def assert_on_curve(points_Px2: np.ndarray, reference_Rx2: np.ndarray) -> None:
    """Every point lies on the reference curve, and the points keep its order."""
    distance_PxR = np.abs(points_Px2[:, None, :] - reference_Rx2[None, :, :]).max(-1)
    assert distance_PxR.min(1).max() < 1e-6
    assert np.all(np.diff(distance_PxR.argmin(1)) > 0)


def assert_roc_table(rows, probs_NxC, labels_N) -> None:
    for k in range(len(CLASS_NAMES)):
        fpr, tpr, _ = sklearn.metrics.roc_curve(
            labels_N == k, probs_NxC[:, k], drop_intermediate=False
        )
        points = curve_points(rows, k)
        assert 20 < len(points) <= wandb_mirror.CURVE_POINTS + 2
        assert_on_curve(points, np.stack([fpr, tpr], 1))
        np.testing.assert_allclose(points[[0, -1]], [[0, 0], [1, 1]])


def assert_pr_table(rows, probs_NxC, labels_N) -> None:
    for k in range(len(CLASS_NAMES)):
        precision, recall, _ = sklearn.metrics.precision_recall_curve(
            labels_N == k, probs_NxC[:, k], drop_intermediate=False
        )
        reference = np.stack([recall, precision], 1)
        points = curve_points(rows, k)
        assert_on_curve(points, reference)
        np.testing.assert_allclose(points[[0, -1]], reference[[0, -1]], atol=1e-6)


def assert_misclassified(logged, media, probs_NxC, labels_N, images_NxHxW) -> None:
    preds = probs_NxC.argmax(1)
    wrong = [i for i in range(len(labels_N)) if preds[i] != labels_N[i]]
    worst = sorted(wrong, key=lambda i: (-probs_NxC[i, preds[i]], i))[:32]
    assert media["_type"] == "images/separated" and media["count"] == 32
    assert media["captions"] == [
        f"true {CLASS_NAMES[labels_N[i]]}, predicted {CLASS_NAMES[preds[i]]} "
        f"({probs_NxC[i, preds[i]]:.2f})"
        for i in worst
    ]
    for i, filename in zip(worst, media["filenames"], strict=True):
        pixels = np.asarray(Image.open(logged.files_dir / filename))
        np.testing.assert_array_equal(pixels, images_NxHxW[i])


def test_thin_curve_keeps_endpoints_and_shape():
    x = np.sort(np.random.default_rng(1).random(5000)) ** 3
    y = np.sqrt(np.linspace(0, 1, 5000))
    tx, ty = wandb_mirror.thin_curve(x, y, max_points=100)
    assert len(tx) <= 102 and (tx[0], ty[0], tx[-1], ty[-1]) == (x[0], y[0], x[-1], y[-1])
    assert set(zip(tx, ty, strict=True)) <= set(zip(x, y, strict=True))
    assert np.trapezoid(ty, tx) == pytest.approx(np.trapezoid(y, x), abs=2e-3)
    short = np.array([0.0, 0.5, 1.0])
    assert wandb_mirror.thin_curve(short, short)[0] is short


def test_float_images_are_stretched_to_grey_levels():
    images = np.array([[[-1.0, 0.0], [0.5, 1.0]]])
    np.testing.assert_array_equal(wandb_mirror._as_uint8(images), [[[0, 128], [191, 255]]])
    uint8 = np.zeros((1, 2, 2, 1), np.uint8)
    assert wandb_mirror._as_uint8(uint8).shape == (1, 2, 2)


def test_first_failure_is_reported_once_then_the_mirror_is_quiet(run_dir, capsys):
    mirror = start_mirror(offline_config(), run_dir, ENVIRONMENT)
    capsys.readouterr()
    mirror.write(5, train_event(5, 20))
    mirror.write_checkpoint(run_dir / "no-such-checkpoint", {})  # fails: nothing to upload
    mirror.write(10, train_event(10, 20))
    mirror.write_evaluation(TestResults(*synthetic_evaluation(40)[:3], CLASS_NAMES, np.eye(4)))
    mirror.close("completed", {"status": "completed"})
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "could not log the checkpoint" in err[0] and "no-such-checkpoint" in err[0]
    logged = read_run(run_dir)
    assert [row["_step"] for row in logged.history] == [5]
    assert logged.exit_code == 1  # the W&B run is closed, marked as not completed
    assert "status" not in logged.summary
    assert "WANDB_DATA_DIR" not in os.environ


def test_a_failing_wandb_call_never_reaches_training(run_dir, capsys, monkeypatch):
    mirror = start_mirror(offline_config(), run_dir, ENVIRONMENT)
    run = mirror._run

    def broken(*args, **kwargs):
        raise RuntimeError("service went away")

    monkeypatch.setattr(run, "log", broken)
    for step in (5, 10, 15):
        mirror.write(step, train_event(step, 20))
    mirror.close("failed", {"status": "failed"})
    err = [line for line in capsys.readouterr().err.splitlines() if "W&B mirror" in line]
    assert err == [
        "W&B mirror stopped: could not log metrics (RuntimeError: service went away); "
        "training goes on and the run directory stays complete"
    ]
    assert read_run(run_dir).exit_code == 1


def test_resume_continues_the_same_wandb_run(tmp_path, run_dir):
    first = start_mirror(offline_config(), run_dir, ENVIRONMENT)
    first.write(5, train_event(5, 20))
    first.close("interrupted", {"status": "interrupted"})
    import wandb

    wandb.teardown()
    second_dir = tmp_path / "elsewhere"  # only to read the two offline files apart
    second_dir.mkdir()
    resumed = start_mirror(offline_config(), second_dir, ENVIRONMENT, first.info["wandb/run_id"])
    resumed.write(10, train_event(10, 20))
    resumed.close("completed", {"status": "completed"})
    assert resumed.info["wandb/run_id"] == first.info["wandb/run_id"]
    logged = read_run(second_dir)
    assert logged.run_id == first.info["wandb/run_id"]
    assert [row["_step"] for row in logged.history] == [10]


def test_background_mirror_names_its_wandb_run_before_wandb_starts(run_dir):
    """Started on the writers' thread, the mirror's run id is known at once (the run summary
    holds it from the start, for a resume), and it is the id the W&B run gets."""
    go = threading.Event()
    ahead = Background(lambda: Writer() if go.wait(10) else None, {})  # holds the worker
    mirror = wandb_mirror.start_mirror_in_background(offline_config(), run_dir, ENVIRONMENT)
    early = mirror.info
    assert list(early) == ["wandb/run_id"] and re.fullmatch("[a-z0-9]{8}", early["wandb/run_id"])
    assert not (run_dir / "wandb").exists()  # W&B has not started yet
    go.set()
    mirror.write(5, train_event(5, 20))
    mirror.close("completed", {"status": "completed"})
    ahead.close("completed", {})
    logged = read_run(run_dir)
    assert logged.run_id == early["wandb/run_id"]
    assert mirror.info == {
        "wandb/run_id": logged.run_id,
        "wandb/mode": "offline",
        "wandb/dir": str(logged.files_dir.parent),
    }
    assert [row["_step"] for row in logged.history] == [5] and logged.exit_code == 0
    assert len({wandb_mirror.new_run_id() for _ in range(1000)}) == 1000


def test_api_key_never_reaches_the_run_directory(run_dir, clean_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    environment = {
        **ENVIRONMENT,
        "WANDB_API_KEY": FAKE_KEY,
        "command": f"mnist-jax train --key={FAKE_KEY}",
        "nested": {"auth_token": "t", "host": "cpu"},
    }
    mirror = start_mirror(offline_config(), run_dir, environment)
    mirror.write(5, train_event(5, 20))
    mirror.write_checkpoint(fake_checkpoint(run_dir), {"api_key": FAKE_KEY, "test/accuracy": 0.9})
    mirror.close("completed", {"status": "completed", "note": FAKE_KEY})
    logged = read_run(run_dir)
    assert logged.config["environment"] == {**ENVIRONMENT, "nested": {"host": "cpu"}}
    leaks = [
        p
        for p in all_files(run_dir) + all_files(clean_wandb_env)
        if FAKE_KEY.encode() in p.read_bytes()
    ]
    assert leaks == []


# ---------------------------------------------------------------------------------------------
# An unreachable server (a subprocess: a fresh wandb session with its own environment)
# ---------------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_unreachable_server_falls_back_to_offline_quickly_and_reports_once(tmp_path, run_dir):
    script = textwrap.dedent(
        f"""
        import json
        from pathlib import Path
        from mnist_jax.config import Config
        from mnist_jax.writers.wandb import start_mirror
        mirror = start_mirror(Config(wandb="online"), Path({str(run_dir)!r}), {{"jax": "x"}})
        for step in (5, 10):
            mirror.write(step, {{"train/loss": 1.0 / step}})
        mirror.close("completed", {{"status": "completed"}})
        print(json.dumps(mirror.info))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        HOME=str(tmp_path / "home"),
        WANDB_API_KEY=FAKE_KEY,
        WANDB_BASE_URL=f"http://127.0.0.1:{closed_port()}",
        WANDB_INIT_TIMEOUT="3",
    )
    t0 = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    elapsed = time.perf_counter() - t0
    assert result.returncode == 0, result.stderr
    assert elapsed < 30
    (info_line,) = [line for line in result.stdout.splitlines() if line.startswith("{")]
    info = json.loads(info_line)
    assert info["wandb/mode"] == "offline"
    ours = [line for line in result.stderr.splitlines() if "could not start" in line]
    assert len(ours) == 1 and f"wandb sync {info['wandb/dir']}" in ours[0], result.stderr
    logged = read_run(run_dir, "offline-run-*")
    assert logged.run_id == info["wandb/run_id"]
    assert [row["_step"] for row in logged.history] == [5, 10]
    leaks = [p for p in all_files(tmp_path) if FAKE_KEY.encode() in p.read_bytes()]
    assert leaks == []


# ---------------------------------------------------------------------------------------------
# The sweep definition
# ---------------------------------------------------------------------------------------------


def sweep_samples(spec: dict[str, Any]) -> list[Any]:
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    return [spec["min"], spec["max"], math.sqrt(spec["min"] * spec["max"])]


def test_sweep_trials_parse_as_train_flags(monkeypatch):
    from typer.testing import CliRunner
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    import cli

    sweep = yaml.safe_load((REPO / "experiments" / "sweep.yaml").read_text())
    assert sweep["method"] == "bayes"
    assert sweep["metric"] == {"name": "test/accuracy", "goal": "maximize"}
    assert sweep["parameters"]["epochs"] == {"value": 3}
    assert sweep["parameters"]["lr"]["distribution"] == "log_uniform_values"
    assert (REPO / sweep["program"]).is_file()
    assert sweep["command"][:2] == ["mnist-jax", "train"] and "${args}" in sweep["command"]

    configs: list[Config] = []
    fake_train = types.ModuleType("mnist_jax.train")
    fake_train.fit = lambda config, stop=None: configs.append(config) or 0
    monkeypatch.setitem(sys.modules, "mnist_jax.train", fake_train)
    params = sweep["parameters"]
    longest = max(len(sweep_samples(spec)) for spec in params.values())
    for i in range(longest):
        trial = {
            name: sweep_samples(spec)[i % len(sweep_samples(spec))] for name, spec in params.items()
        }
        args = create_sweep_command_args({"args": {k: {"value": v} for k, v in trial.items()}})
        command = [
            a for c in sweep["command"][2:] for a in (args["args"] if c == "${args}" else [c])
        ]
        result = CliRunner().invoke(cli.app, ["train", *command])
        assert result.exit_code == 0, (command, result.output)
        for name, value in trial.items():
            assert getattr(configs[-1], name.replace("-", "_")) == value, (name, command)


# ---------------------------------------------------------------------------------------------
# End to end: a tiny real training run mirrored offline
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_run_is_mirrored_exactly(tmp_path, tiny_config, clean_wandb_env, monkeypatch):
    from mnist_jax import metrics, parallel, train
    from mnist_jax.record import RunRecord

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)  # present, but the run is offline
    jitted, jit = [], parallel.jit
    monkeypatch.setattr(parallel, "jit", lambda fn: jitted.append(fn) or jit(fn))
    config = tiny_config(tmp_path / "runs", name="mirrored", wandb="offline")
    assert train.fit(config) == 0
    record = RunRecord.open(tmp_path / "runs" / "mirrored")
    events, summary = record.read_events(), record.summary
    logged = read_run(record.dir)

    assert summary["wandb/run_id"] == logged.run_id and summary["wandb/mode"] == "offline"
    assert logged.exit_code == 0
    assert {k: v for k, v in logged.config.items() if k not in ("_wandb", "environment")} == (
        record.read_config()["config"]
    )
    # Every event is in the history exactly. An epoch event shares its step with the last
    # interval's train event: W&B keeps one value per key and step, so the epoch's train means
    # go under train_epoch/ and train/ stays the interval's, as in every other row.
    assert [row["_step"] for row in logged.history] == sorted({e["step"] for e in events})
    epoch_events = [e for e in events if "test/accuracy" in e]
    assert len(epoch_events) == 2
    for event in events:
        row = logged.row(event["step"])
        is_epoch = event in epoch_events
        for key, value in event.items():
            if key == "step" or (is_epoch and key == "epoch"):
                continue
            moved = is_epoch and key.startswith("train/")
            name = key.replace("train/", "train_epoch/") if moved else key
            assert same(value, row[name]), (key, value, row[name])
    # The summary holds summary.json's test metrics (and the rest of it).
    test_keys = [k for k in summary if k.startswith("test/")]
    assert "test/confusion_matrix" in test_keys and len(test_keys) > 50
    for key, value in summary.items():
        assert same(value, logged.summary[key]), (key, value, logged.summary[key])
    # The final evaluation and the best checkpoint.
    last = logged.row(events[-1]["step"])
    assert last["test/roc_curve_table"]["nrows"] > 10 and "test/misclassified" in last
    # Its curves are the final evaluation's, not ranked again.
    assert metrics.one_vs_rest_curves not in jitted
    predictions = np.load(record.dir / "predictions.npz")
    names = tuple(sorted({row[0] for row in logged.table("test/roc_curve_table")}, key=int))
    for table, recomputed in zip(
        ("test/roc_curve_table", "test/pr_curve_table"),
        wandb_mirror.curve_rows(predictions["probs"], predictions["labels"], names),
        strict=True,
    ):
        assert logged.table(table) == recomputed
    confusion = np.array(summary["test/confusion_matrix"])
    rows = logged.table("test/confusion_chart_table")
    assert [row[2] for row in rows] == confusion.reshape(-1).tolist()
    (model,) = [a for a in logged.artifacts if a.type == "model"]
    best = record.checkpoints_dir / "best" / str(summary["best/step"])
    assert {e.path for e in model.manifest.contents} == {
        p.relative_to(best).as_posix() for p in all_files(best)
    }
    assert json.loads(model.metadata)["test/accuracy"] == summary["test/accuracy"]
    leaks = [p for p in all_files(tmp_path) if FAKE_KEY.encode() in p.read_bytes()]
    assert leaks == []


@pytest.mark.slow
def test_the_run_summary_names_the_wandb_run_before_wandb_has_started(
    tmp_path, tiny_config, monkeypatch
):
    """W&B starts beside training; the summary on disk holds the run's W&B id before that
    start ends (so a run killed meanwhile resumes into the same W&B run), and its mode and
    directory once W&B is up."""
    from mnist_jax import train

    config = tiny_config(tmp_path / "runs", name="early", wandb="offline")
    summary = tmp_path / "runs" / "early" / "summary.json"
    seen: dict[str, Any] = {}

    class Started(Writer):
        info = {"wandb/run_id": "x", "wandb/mode": "offline", "wandb/dir": "somewhere"}

    def slow_start(config, run_dir, environment, resume_id=None, *, run_id=None):
        seen["run_id"] = run_id
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # W&B is "starting" until the summary has the id
            with contextlib.suppress(OSError, ValueError):
                seen["summary"] = json.loads(summary.read_text()).get("wandb/run_id")
                if seen["summary"]:
                    break
            time.sleep(0.01)
        Started.info = {**Started.info, "wandb/run_id": run_id}
        return Started()

    monkeypatch.setattr(wandb_mirror, "start_mirror", slow_start)
    assert train.fit(config) == 0
    assert seen["summary"] == seen["run_id"] and re.fullmatch("[a-z0-9]{8}", seen["run_id"])
    final = json.loads(summary.read_text())
    assert (final["wandb/run_id"], final["wandb/mode"], final["wandb/dir"]) == (
        seen["run_id"],
        "offline",
        "somewhere",
    )


@pytest.mark.slow
def test_each_sweep_trial_is_its_own_wandb_run_in_the_sweeps_group(
    tmp_path, mnist_dir, clean_wandb_env
):
    """Trials trained as one mapped program still log as separate W&B runs, grouped."""
    from mnist_jax.record import RunRecord
    from mnist_jax.signals import StopRequest
    from mnist_jax.sweep.run import sweep

    spec = tmp_path / "spec.toml"
    spec.write_text(
        "[base]\ntrain_examples = 256\ntest_examples = 200\nconv_features = [4, 8]\n"
        "dense_features = 16\nbatch_size = 64\neval_batch_size = 100\nepochs = 1\n"
        'log_every = 2\nwandb = "offline"\n[grid]\nlr = [1e-3, 3e-3]\n'
    )
    flags = {"data_dir": str(mnist_dir), "runs_dir": str(tmp_path / "runs")}
    assert sweep(spec, flags, name="grouped", max_parallel=2, stop=StopRequest()) == 0
    ids = set()
    for trial, lr in (("trial-00", 1e-3), ("trial-01", 3e-3)):
        record = RunRecord.open(tmp_path / "runs" / "grouped" / trial)
        logged = read_run(record.dir)
        assert logged.run.run_group == "grouped" and logged.exit_code == 0
        assert logged.config["lr"] == lr and logged.run_id == record.summary["wandb/run_id"]
        last = logged.row(record.read_events()[-1]["step"])
        assert same(last["test/accuracy"], record.summary["test/accuracy"])
        ids.add(logged.run_id)
    assert len(ids) == 2
