"""Data-parallel training: sharded against unsharded, one process against two (gloo on
127.0.0.1), errors in every process, and a lost process that stops the run instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mnist_jax import parallel
from mnist_jax.config import Config
from mnist_jax.errors import UserError
from mnist_jax.record import FollowerRecord, RunRecord

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--train-examples", "512", "--test-examples", "300", "--conv-features", "8,16",
    "--dense-features", "32", "--batch-size", "64", "--eval-batch-size", "150",
    "--log-every", "4", "--wandb", "disabled",
]  # fmt: skip
TIMEOUT = 150  # seconds any one subprocess may take


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    env.pop("XLA_FLAGS", None)
    return env


def train(args: list[str], out: Path) -> subprocess.Popen:
    """`mnist-jax train` in a subprocess, stdout and stderr into files beside `out`."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), "train", *TINY, *args],
        stdout=out.with_suffix(".out").open("w"),
        stderr=out.with_suffix(".err").open("w"),
        env=environment(),
        cwd=REPO,
    )


def train_distributed(
    tmp_path: Path, args: list[str], processes: int = 2
) -> list[subprocess.Popen]:
    port = free_port()
    common = ["--distributed", "--coordinator", f"127.0.0.1:{port}"]
    common += ["--num-processes", str(processes), "--runs-dir", str(tmp_path / "runs"), *args]
    return [train([*common, "--process-id", str(i)], tmp_path / f"p{i}") for i in range(processes)]


def finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[int]:
    """Every process's exit code; none outlives `timeout` (the rest are killed)."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def text(tmp_path: Path, name: str) -> str:
    return (tmp_path / name).read_text()


# -- fast ----------------------------------------------------------------------------------------


def test_indivisible_batch_names_sizes_that_divide(monkeypatch):
    monkeypatch.setattr(parallel, "devices_in_use", lambda: [None] * 8)
    parallel.require_divisible(96)
    with pytest.raises(UserError, match="does not divide among 8 devices.*e.g. 96 or 104"):
        parallel.require_divisible(100)


def test_multi_process_flags_need_distributed():
    with pytest.raises(UserError, match="--coordinator.*add --distributed"):
        Config(coordinator="127.0.0.1:1234")
    with pytest.raises(UserError, match="HOST:PORT"):
        Config(distributed=True, coordinator="localhost")
    with pytest.raises(UserError, match="not below num_processes"):
        Config(distributed=True, num_processes=2, process_id=2)
    Config(distributed=True, coordinator="10.0.0.1:1234", num_processes=2, process_id=1)


def test_distributed_start_is_refused_once_jax_runs():
    parallel.fetch(parallel.place(1))  # the backend is running now
    with pytest.raises(UserError, match="before JAX computes anything"):
        parallel.initialize_distributed("127.0.0.1:1", 2, 0)


def test_a_follower_record_writes_nothing(tmp_path):
    record = RunRecord.create(tmp_path, "run", {"seed": 0}, {})
    follower = FollowerRecord.open(record.dir)
    with follower.writer_lock(), record.writer_lock():  # the lock is process 0's alone
        before = {p.name: p.read_bytes() for p in record.dir.iterdir()}
        follower.log({"step": 1, "train/loss": 1.0})
        follower.update_summary(status="completed")
        follower.truncate_events(0)
        after = {p.name: p.read_bytes() for p in record.dir.iterdir()}
    assert follower.summary["status"] == "completed"
    assert after == before


def test_errors_are_not_lost_peers_outside_a_distributed_run():
    assert parallel.lost_peer(ValueError("Gloo all-reduce failed")) is None


# -- slow: real processes ------------------------------------------------------------------------


@pytest.mark.slow
def test_sharded_and_unsharded_steps_agree(tmp_path):
    """The same compiled train chunk and evaluation over 2 simulated CPU devices and over one,
    and over 2 devices from programs exported and then kept (`parallel.compile_program`).
    XLA:CPU's simulated devices can deadlock in a collective on a busy machine (the classic CNN
    always did); this test-sized one has not, and gets a second try if it does."""
    script = tmp_path / "compare.py"
    script.write_text(
        "import json, sys\n"
        "from pathlib import Path\n"
        "from mnist_jax import parallel\n"
        "from mnist_jax.config import Config\n"
        "from mnist_jax.train import load_data\n"
        "from mnist_jax.trainer import Trainer\n"
        f"c = Config(data_dir={os.environ.get('MNIST_JAX_DATA_DIR', '')!r} or None,"
        " train_examples=256, test_examples=100, conv_features=(8, 16), dense_features=32,"
        " batch_size=32, eval_batch_size=50, epochs=1, wandb='disabled')\n"
        "data, out = load_data(c), []\n"
        "for devices, kept in ((None, None), (2, None), (2, 'exported'), (2, 'kept')):\n"
        "    if devices:\n"
        "        parallel.use_devices(devices)\n"
        f"    parallel._programs_dir = kept and Path({str(tmp_path / 'programs')!r})\n"
        "    with parallel.count_compilations() as counts:\n"
        "        t = Trainer(c, data)\n"
        "    assert counts['traced'] == (0 if kept == 'kept' else 5), counts\n"
        "    t.run(4)\n"
        "    e = parallel.fetch(t.evaluate())\n"
        "    s = parallel.fetch(t.take_interval())\n"
        "    out.append([float(e.sums.loss_sum), e.sums.confusion.tolist(),"
        " float(s.loss_sum), int(s.correct), e.probs_NxC.tolist()])\n"
        "print(json.dumps(out))\n"
    )
    env = {**environment(), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = None
    for _ in range(2):  # one more try: a rendezvous XLA:CPU lost on a loaded machine
        try:
            done = subprocess.run(
                [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
            )
            break
        except subprocess.TimeoutExpired:
            continue
    if done is None:
        pytest.fail("XLA:CPU's simulated devices deadlocked in a collective, twice")
    assert done.returncode == 0, done.stderr[-2000:]
    one, two, exported, kept = json.loads(done.stdout.splitlines()[-1])
    assert exported == kept
    np.testing.assert_allclose(exported[4], two[4], atol=1e-6)
    assert two[0] == pytest.approx(one[0], rel=1e-5)
    assert two[1] == one[1]  # confusion counts
    assert two[2] == pytest.approx(one[2], rel=1e-5)
    assert two[3] == one[3]
    assert np.allclose(two[4], one[4], atol=1e-5)  # probabilities


@pytest.mark.slow
def test_two_processes_train_like_one_and_write_one_record(tmp_path):
    single = train(["--runs-dir", str(tmp_path / "one"), "--name", "one"], tmp_path / "single")
    assert finish([single]) == [0], text(tmp_path, "single.err")
    procs = train_distributed(tmp_path, ["--name", "two"])
    codes = finish(procs)
    assert codes == [0, 0], text(tmp_path, "p0.err") + text(tmp_path, "p1.err")
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["two"]
    assert "run directory" in text(tmp_path, "p0.out")
    assert "run directory" not in text(tmp_path, "p1.out")  # only process 0 reports and writes
    one = RunRecord.open(tmp_path / "one" / "one")
    two = RunRecord.open(tmp_path / "runs" / "two")
    environment_ = two.read_config()["environment"]
    assert (environment_["device_count"], environment_["process_count"]) == (2, 2)
    for key in ("train/loss", "test/loss", "test/accuracy"):
        assert two.summary[key] == pytest.approx(one.summary[key], rel=1e-4), key
    lines = two.metrics_path.read_text().splitlines()
    assert len(lines) == len(one.metrics_path.read_text().splitlines())  # each event once


@pytest.mark.slow
def test_an_indivisible_batch_is_one_line_in_every_process(tmp_path):
    procs = train_distributed(tmp_path, ["--batch-size", "63"])
    assert finish(procs, timeout=90) == [2, 2]
    for i in range(2):
        err = text(tmp_path, f"p{i}.err")
        assert "--batch-size 63 does not divide among 2 devices" in err, err
        assert "e.g. 62 or 64" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_killed_process_stops_the_other_within_a_minute(tmp_path):
    procs = train_distributed(tmp_path, ["--epochs", "200", "--name", "killed"])
    try:
        deadline = time.monotonic() + TIMEOUT
        while "epoch 1:" not in text(tmp_path, "p0.out"):  # training is under way
            assert time.monotonic() < deadline and procs[0].poll() is None, text(tmp_path, "p0.err")
            time.sleep(0.5)
        procs[1].kill()
        killed = time.monotonic()
        code = procs[0].wait(60)
        assert time.monotonic() - killed < 60
    finally:
        finish(procs, timeout=1)
    err = text(tmp_path, "p0.err")
    assert code == 1, err
    assert "another process of this distributed run stopped" in err, err
    assert "Traceback" not in err and "Check failure" not in err, err
    assert err.count("error:") == 1
    summary = RunRecord.open(tmp_path / "runs" / "killed").summary
    assert summary["status"] == "failed" and "--resume" in summary["message"]


@pytest.mark.slow
def test_ctrl_c_in_one_process_stops_both_at_one_checkpoint_and_resume_finishes(tmp_path):
    epochs = ["--epochs", "12"]
    single = train([*epochs, "--runs-dir", str(tmp_path / "one"), "--name", "one"], tmp_path / "s")
    procs = train_distributed(tmp_path, [*epochs, "--name", "two"])
    try:
        deadline = time.monotonic() + TIMEOUT
        while "epoch 1:" not in text(tmp_path, "p0.out"):  # training is under way
            assert time.monotonic() < deadline and procs[0].poll() is None, text(tmp_path, "p0.err")
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGINT)  # only the process that writes nothing
        codes = finish(procs, timeout=90)
    finally:
        finish(procs, timeout=1)
    assert codes == [130, 130], text(tmp_path, "p0.err") + text(tmp_path, "p1.err")
    run = tmp_path / "runs" / "two"
    summary = RunRecord.open(run).summary
    assert summary["status"] == "interrupted" and 8 <= summary["step"] < 96, summary
    stopped_at = summary["step"]
    port = free_port()
    resumed = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO / "cli.py"),
                "train",
                "--resume",
                str(run),
                "--distributed",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            stdout=(tmp_path / f"r{i}.out").open("w"),
            stderr=(tmp_path / f"r{i}.err").open("w"),
            env=environment(),
            cwd=REPO,
        )  # fmt: skip
        for i in range(2)
    ]
    assert finish(resumed) == [0, 0], text(tmp_path, "r0.err") + text(tmp_path, "r1.err")
    assert f"resuming {run} at step {stopped_at}" in text(tmp_path, "r0.out")
    assert finish([single]) == [0], text(tmp_path, "s.err")
    one, two = RunRecord.open(tmp_path / "one" / "one"), RunRecord.open(run)
    assert two.summary["status"] == "completed" and two.summary["step"] == 96
    for key in ("train/loss", "test/loss", "test/accuracy"):
        assert two.summary[key] == pytest.approx(one.summary[key], rel=1e-4), key
    steps = [json.loads(line)["step"] for line in two.metrics_path.read_text().splitlines()]
    assert len(steps) == len(one.metrics_path.read_text().splitlines())  # each event once
