"""The fault suite: the real CLI, in subprocesses, through every way a run can go wrong.

Each case asserts the exit code, the one `error:` line (and no traceback), and that nothing
written before is lost or changed. Runs are tiny (2,048 images, a narrow CNN), so the whole
suite takes a few minutes; cases that train for real are marked `slow` and still run in CI.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# 32 steps an epoch, 2 epochs, an event every 3 steps: long enough that a signal sent right
# after a given line lands mid-run, short enough to train in seconds.
TINY = (
    "--train-examples", "2048", "--test-examples", "300", "--conv-features", "8,16",
    "--dense-features", "32", "--batch-size", "64", "--eval-batch-size", "128",
    "--log-every", "3", "--epochs", "2", "--wandb", "disabled",
)  # fmt: skip


def environment(changes: dict | None) -> dict:
    """The test's environment with `changes` applied (a None value removes the variable)."""
    merged = {**os.environ, **(changes or {})}
    return {k: v for k, v in merged.items() if v is not None}


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=environment(env),
        timeout=timeout,
    )


def train_args(mnist_dir: Path, runs: Path, name: str) -> list[str]:
    return ["train", "--data-dir", str(mnist_dir), "--runs-dir", str(runs), "--name", name]


def start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-u", "-m", "cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(env),
    )


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> list[str]:
    """Reads stdout until a line starts with `prefix`; returns the lines read."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no line starting with {prefix!r}: {''.join(lines)}")


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def assert_one_error(code: int, out: str, err: str, expected_code: int, fragment: str) -> str:
    assert code == expected_code, (code, out, err)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in out + err, err
    return errors[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` by its content hash: what must survive a fault unchanged."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def final_metrics(run: Path) -> dict:
    values = summary(run)
    return {k: v for k, v in values.items() if k.startswith(("test/", "train/loss"))}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, mnist_dir) -> Path:
    """One uninterrupted run: what every interrupted-then-resumed run must end equal to."""
    runs = tmp_path_factory.mktemp("straight")
    result = cli(*train_args(mnist_dir, runs, "straight"), *TINY)
    assert result.returncode == 0, result.stderr
    return runs / "straight"


def resume_and_compare(run: Path, straight: Path) -> None:
    result = cli("train", "--resume", str(run))
    assert result.returncode == 0, result.stderr
    assert summary(run)["status"] == "completed"
    assert final_metrics(run) == final_metrics(straight)
    np.testing.assert_array_equal(
        np.load(run / "predictions.npz")["probs"], np.load(straight / "predictions.npz")["probs"]
    )


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--lr", "nope"], "--lr"),
        (["--no-such-flag", "1"], "No such option"),
        (["--epochs", "0"], "epochs must be a positive integer"),
        (["--model", "transformer"], "unknown model 'transformer'"),
        (["--config", "experiments/missing.toml"], "does not exist"),
        (["--epochs", "99999999999"], "choose fewer --epochs"),  # past the int32 step counter
    ],
)
def test_bad_flags_and_files_are_one_line_and_write_nothing(tmp_path, mnist_dir, args, fragment):
    runs = tmp_path / "runs"
    code, out, err = (
        (r := cli(*train_args(mnist_dir, runs, "bad"), *args)).returncode,
        r.stdout,
        r.stderr,
    )
    assert_one_error(code, out, err, 2, fragment)
    assert not runs.exists() or not list(runs.iterdir())


def test_a_malformed_experiment_file_is_one_line(tmp_path, mnist_dir):
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = [unclosed\n")
    r = cli(*train_args(mnist_dir, tmp_path / "runs", "bad"), "--config", str(bad))
    assert_one_error(r.returncode, r.stdout, r.stderr, 2, "not valid TOML")


def test_a_runs_dir_that_cannot_exist_is_one_line(tmp_path, mnist_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = cli(*train_args(mnist_dir, blocker / "runs", "x"), *TINY)
    assert_one_error(r.returncode, r.stdout, r.stderr, 2, "cannot create run directory")
    assert blocker.read_text() == "not a directory"


# ---------------------------------------------------------------------------------------------
# Signals: SIGINT and SIGTERM stop with a checkpoint; SIGKILL leaves the last one; resume
# ends exactly where an uninterrupted run ends
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "seed"), [(signal.SIGINT, 0), (signal.SIGTERM, 1), (signal.SIGINT, 2)]
)
def test_a_stop_signal_at_a_random_moment_then_resume(tmp_path, mnist_dir, straight, sig, seed):
    """The signal lands after a random log line: mid-epoch, or right after an epoch's line,
    while that epoch's checkpoints are being written."""
    proc = start([*train_args(mnist_dir, tmp_path, "cut"), *TINY])
    wait_for_line(proc, random.Random(seed).choice(["step 3/", "step 18/", "epoch 1:", "step 45/"]))
    proc.send_signal(sig)
    code, out, err = finish(proc)
    assert code == 130, (out, err)
    assert "Traceback" not in out + err
    run = tmp_path / "cut"
    assert summary(run)["status"] == "interrupted"
    resume_and_compare(run, straight)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["step 45/", "epoch 1:"], ids=["mid-epoch", "checkpointing"])
def test_sigkill_leaves_the_last_checkpoint_a_stale_status_and_a_resumable_run(
    tmp_path, mnist_dir, straight, moment
):
    from mnist_jax.record import load_run

    proc = start([*train_args(mnist_dir, tmp_path, "killed"), *TINY])
    wait_for_line(proc, moment)
    proc.kill()
    finish(proc)
    run = tmp_path / "killed"
    assert summary(run)["status"] == "running"  # the killed process could not say otherwise,
    assert load_run(run).status == "stale"  # but its writer lock is free: analyze tells
    assert not list(run.rglob("*orbax-checkpoint-tmp*")) or moment == "epoch 1:"
    saved = [p for p in (run / "checkpoints" / "last").glob("*") if p.name.isdigit()]
    if saved or moment != "epoch 1:":
        resume_and_compare(run, straight)
    else:  # killed while the first checkpoint was written: nothing complete to resume from
        r = cli("train", "--resume", str(run))
        assert_one_error(r.returncode, r.stdout, r.stderr, 2, "no checkpoint to resume from")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_early_ctrl_c_is_never_lost(tmp_path, mnist_dir, seed):
    """SIGINT while the process starts, loads data or compiles: it stops, never trains on."""
    proc = start([*train_args(mnist_dir, tmp_path, "early"), *TINY, "--epochs", "20"])
    time.sleep(random.Random(seed).uniform(0.5, 4.0))
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    assert code == 130, (out, err)
    assert "Traceback" not in out + err
    run = tmp_path / "early"
    if run.exists():
        assert summary(run)["status"] == "interrupted"


# ---------------------------------------------------------------------------------------------
# One writer per run
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_writer_is_refused_before_it_writes_anything(tmp_path, mnist_dir):
    proc = start([*train_args(mnist_dir, tmp_path, "busy"), *TINY, "--epochs", "100"])
    try:
        wait_for_line(proc, "step 3/")
        run = tmp_path / "busy"
        config_before = (run / "config.json").read_bytes()
        elsewhere = tmp_path / "elsewhere"
        shutil.copytree(mnist_dir, elsewhere)
        r = cli("train", "--resume", str(run), "--data-dir", str(elsewhere))
        assert_one_error(r.returncode, r.stdout, r.stderr, 2, "being written by another")
        assert (run / "config.json").read_bytes() == config_before
    finally:
        proc.send_signal(signal.SIGTERM)
        finish(proc)


# ---------------------------------------------------------------------------------------------
# The disk says no: full, or read-only
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(root: Path, megabytes: int) -> Iterator[Path]:
    """A tmpfs of `megabytes` (root only), unmounted afterwards."""
    mount = root / "small-disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a small tmpfs needs root"
)


@needs_root
def test_a_disk_too_small_at_start_is_one_line_and_leaves_nothing(tmp_path, mnist_dir):
    with small_disk(tmp_path, 3) as disk:
        earlier = disk / "earlier"
        earlier.mkdir()
        (earlier / "notes.txt").write_text("an earlier run's file")
        before = snapshot(disk)
        # The default CNN's checkpoints need ~30 MB: refused before anything is written.
        r = cli(
            *train_args(mnist_dir, disk, "big"), "--train-examples", "512", "--wandb", "disabled"
        )
        line = assert_one_error(r.returncode, r.stdout, r.stderr, 1, "no space left")
        assert "free some space or choose another --runs-dir" in line
        assert snapshot(disk) == before and not (disk / "big").exists()


@needs_root
@pytest.mark.slow
def test_a_disk_that_fills_during_training_then_resume(tmp_path, mnist_dir):
    """The disk fills during the second epoch: the next checkpoint is refused in one line, the
    checkpoints and record written before stay intact, and after freeing space the resumed run
    ends exactly like an uninterrupted one."""
    args = [*TINY, "--epochs", "6"]
    assert cli(*train_args(mnist_dir, tmp_path, "straight6"), *args).returncode == 0
    with small_disk(tmp_path, 4) as disk:
        proc = start([*train_args(mnist_dir, disk, "filled"), *args])
        wait_for_line(proc, "step 36/")  # epoch 1's checkpoints are written by now
        filler = disk / "filler"
        with filler.open("wb") as f:  # all but 64 KiB: events and summaries fit, checkpoints not
            f.write(b"\0" * max(0, shutil.disk_usage(disk).free - (64 << 10)))
        code, out, err = finish(proc)
        run = disk / "filled"
        line = assert_one_error(code, out, err, 1, "no space left")
        assert f"--resume {run}" in line
        assert summary(run)["status"] == "failed" and "no space left" in summary(run)["message"]
        saved = [p.name for p in (run / "checkpoints" / "last").iterdir()]
        assert len(saved) == 1 and saved[0].isdigit(), saved
        assert not list(run.rglob("*orbax-checkpoint-tmp*")), "a partial checkpoint was left"
        filler.unlink()
        resume_and_compare(run, tmp_path / "straight6")


def test_analyze_into_an_unwritable_place_is_one_line(tmp_path, mnist_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = ["--no-runs", "--data-dir", str(mnist_dir), "--out", str(blocker / "out")]
    r = cli("analyze", *args)
    assert_one_error(r.returncode, r.stdout, r.stderr, 2, str(blocker / "out"))
    assert blocker.read_text() == "x"


# ---------------------------------------------------------------------------------------------
# The record tells the truth
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_loss_that_diverges_in_the_first_epoch_promises_no_checkpoint(tmp_path, mnist_dir):
    args = [*TINY, "--optimizer", "sgd", "--schedule", "constant", "--lr", "1e12"]
    r = cli(*train_args(mnist_dir, tmp_path, "nan"), *args)
    assert r.returncode == 1, r.stderr
    values = summary(tmp_path / "nan")
    assert values["status"] == "failed"
    assert "non-finite" in values["message"] and "no checkpoint was saved" in values["message"]
    assert "last good checkpoint" not in values["message"]
    assert f"found at step {values['step']}" in values["message"]
    assert values["time/train_seconds"] > 0 and values["train/examples_per_sec"] > 0
    assert not (tmp_path / "nan" / "checkpoints" / "last").exists() or not list(
        (tmp_path / "nan" / "checkpoints" / "last").iterdir()
    )


@pytest.mark.slow
def test_evaluate_says_loudly_when_the_best_checkpoint_is_damaged(tmp_path, mnist_dir, straight):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    best = run / "checkpoints" / "best"
    for data_file in (p for p in best.rglob("*") if p.is_file() and "ocdbt" in str(p)):
        data_file.write_bytes(b"damaged")
    r = cli("evaluate", str(run), "--data-dir", str(mnist_dir))
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, r.stderr
    assert "could not be restored" in warnings[0] and "using last/" in warnings[0]
    assert "Error" in warnings[0], "the warning names the real error"
    assert "WARNING:absl" not in r.stderr
    assert json.loads((run / "eval.json").read_text())["checkpoint"] == "last"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_an_unreachable_wandb_server_costs_one_line_and_no_colour(tmp_path, mnist_dir):
    pytest.importorskip("wandb")
    env = {
        "WANDB_MODE": None,
        "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",
        "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}",
        "WANDB_DIR": None,
        "HOME": str(tmp_path / "home"),
    }
    args = [a if a != "disabled" else "online" for a in TINY] + ["--epochs", "1"]
    r = cli(*train_args(mnist_dir, tmp_path, "offline"), *args, env=env)
    assert r.returncode == 0, r.stderr
    ours = [line for line in r.stderr.splitlines() if "could not start the online W&B run" in line]
    assert len(ours) == 1 and "unreachable" in ours[0], r.stderr
    assert "\x1b[" not in r.stdout + r.stderr
    assert summary(tmp_path / "offline")["wandb/mode"] == "offline"
