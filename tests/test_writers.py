"""Writers: the fan-out, the TensorBoard writer, and what the train events say."""

from __future__ import annotations

import importlib.util
import json
import struct
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax import steps, train
from mnist_jax.errors import UserError
from mnist_jax.writers import Background, MultiWriter, TestResults, Writer


class Recorder(Writer):
    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls
        self.info = {f"{name}/id": name}

    def write(self, step, metrics):
        self.calls.append((self.name, "write", step, dict(metrics)))

    def write_checkpoint(self, path, metadata):
        self.calls.append((self.name, "checkpoint", str(path), dict(metadata)))

    def close(self, status, summary):
        self.calls.append((self.name, "close", status, dict(summary)))


def test_multiwriter_fans_every_call_out_in_order_and_merges_info():
    calls: list = []
    writer = MultiWriter([Recorder("a", calls), Writer(), Recorder("b", calls)])
    writer.write(3, {"train/loss": 0.5})
    writer.write_checkpoint(Path("ckpt"), {"test/accuracy": 0.9})
    writer.write_evaluation(
        TestResults(np.ones((1, 2)), np.zeros(1), np.zeros((1, 2)), ("x",), None)
    )
    writer.close("completed", {"status": "completed"})
    assert calls == [
        ("a", "write", 3, {"train/loss": 0.5}),
        ("b", "write", 3, {"train/loss": 0.5}),
        ("a", "checkpoint", "ckpt", {"test/accuracy": 0.9}),
        ("b", "checkpoint", "ckpt", {"test/accuracy": 0.9}),
        ("a", "close", "completed", {"status": "completed"}),
        ("b", "close", "completed", {"status": "completed"}),
    ]
    assert writer.info == {"a/id": "a", "b/id": "b"}


class Opening(Recorder):
    """A destination that takes its time to open, on whichever thread opens it."""

    def __init__(self, name: str, calls: list, go: threading.Event) -> None:
        assert go.wait(10)
        super().__init__(name, calls)
        self.threads = {threading.get_ident()}

    def write(self, step, metrics):
        self.threads.add(threading.get_ident())
        super().write(step, metrics)


def test_background_writer_opens_and_writes_off_the_caller_thread_in_call_order():
    calls: list = []
    go = threading.Event()
    opened: list[Opening] = []

    def open_writer():
        opened.append(Opening("w", calls, go))
        return opened[0]

    writer = Background(open_writer, {"w/id": "early"})
    # The destination is still opening: nothing waited for it, nothing has reached it.
    assert writer.info == {"w/id": "early"} and calls == []
    event = {"train/loss": 0.5}
    writer.write(1, event)
    event["train/loss"] = 9.0  # the caller's dict may change once the call returned
    writer.write(2, {"train/loss": 0.25})
    writer.write_checkpoint(Path("ckpt"), {"test/accuracy": 0.9})
    assert calls == []
    go.set()
    writer.wait_open()
    assert writer.info == {"w/id": "w"}
    writer.close("completed", {"status": "completed"})  # returns once every call is done
    assert calls == [
        ("w", "write", 1, {"train/loss": 0.5}),
        ("w", "write", 2, {"train/loss": 0.25}),
        ("w", "checkpoint", "ckpt", {"test/accuracy": 0.9}),
        ("w", "close", "completed", {"status": "completed"}),
    ]
    assert threading.get_ident() not in opened[0].threads and len(opened[0].threads) == 1


def test_background_writer_that_cannot_open_or_write_reports_one_line_and_never_raises(capsys):
    def cannot_open():
        raise ConnectionError("no service\nsecond line")

    writer = Background(cannot_open, {"w/id": "early"})
    writer.write(1, {"train/loss": 0.5})
    writer.close("completed", {})
    assert writer.info == {"w/id": None}  # what was said early no longer stands
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "a metrics destination could not start (ConnectionError: no service); "
        "training goes on without it"
    ]

    calls: list = []

    class Failing(Recorder):
        def write(self, step, metrics):
            if step == 1:
                raise OSError("disk full")
            super().write(step, metrics)

    writer = Background(lambda: Failing("f", calls), {})
    writer.write(1, {"a": 1})
    writer.write(2, {"a": 2})  # a failed call does not stop the ones after it
    writer.close("completed", {})
    assert calls == [("f", "write", 2, {"a": 2}), ("f", "close", "completed", {})]
    assert capsys.readouterr().err.splitlines() == [
        "a metrics destination failed in write (OSError: disk full); training goes on"
    ]


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_events_average_exactly_the_steps_since_the_last_event(tiny_config, tmp_path):
    """512 images in batches of 64 (8 steps an epoch), logged every 3 steps: each train event's
    loss is the mean of the per-step losses since the previous event, as a plain loop of the
    pure step computes them."""
    config = tiny_config(tmp_path, name="intervals", steps_per_call=1)
    assert train.fit(config) == 0
    run_events = events(tmp_path / "intervals")
    logged = {e["step"]: e["train/loss"] for e in run_events if "test/accuracy" not in e}
    assert sorted(logged) == [3, 6, 8, 9, 12, 15, 16]

    dataset = train.load_data(config)
    built = steps.build(config, dataset.spec, total_steps=16)
    state, step_fn = jax.jit(built.init)(config.seed), jax.jit(built.train_step)
    images, labels = jnp.asarray(dataset.train.images), jnp.asarray(dataset.train.labels)
    losses = []
    for step in range(16):
        epoch, index = divmod(step, 8)
        rows = steps.epoch_permutation(config.seed, epoch, 512)[index * 64 : (index + 1) * 64]
        state, out = step_fn(state, (images[rows], labels[rows]), steps.step_key(config.seed, step))
        losses.append(float(out["loss"]))
    previous = 0
    for step in sorted(logged):
        expected = np.mean(losses[previous:step])
        assert logged[step] == pytest.approx(expected, rel=1e-5), step
        previous = step


def read_tensorboard_scalars(directory: Path) -> dict[tuple[str, int], float]:
    """Every scalar in the TFRecord event files under `directory`, decoded by hand."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        blob, offset = path.read_bytes(), 0
        while offset < len(blob):
            (length,) = struct.unpack("<Q", blob[offset : offset + 8])
            record = blob[offset + 12 : offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = value.simple_value
    return scalars


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboardX") is None,
    reason='the tensorboard extra is not installed (pip install -e ".[tensorboard]")',
)
def test_tensorboard_holds_every_numeric_metric_of_every_event(tiny_config, tmp_path):
    config = tiny_config(tmp_path, name="board", epochs=1, tensorboard=True)
    assert train.fit(config) == 0
    run = tmp_path / "board"
    scalars = read_tensorboard_scalars(run / "tensorboard")
    expected = {
        (key, event["step"]): value
        for event in events(run)
        for key, value in event.items()
        if key not in ("step", "epoch") and isinstance(value, (int, float)) and value is not None
    }
    assert expected and set(scalars) == set(expected)
    for key, value in expected.items():
        assert scalars[key] == pytest.approx(value, rel=1e-6), key


def test_tensorboard_without_its_extra_is_one_line_before_anything_is_written(
    tiny_config, tmp_path, monkeypatch
):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboardX" else find_spec(name, *a),
    )
    config = tiny_config(tmp_path / "runs", name="board", tensorboard=True)
    with pytest.raises(UserError, match=r'pip install "mnist-jax\[tensorboard\]"'):
        train.fit(config)
    assert not (tmp_path / "runs").exists()
