"""`fit(config)`: the training loop that ties data, steps, metrics, checkpoints and tracking.

The phases, in order: load the data, open the run record, build and compile the steps, train
epoch by epoch (evaluate, log, checkpoint at each epoch end), then write the final record.
Ctrl-C or SIGTERM stops at the next step boundary with a checkpoint; a non-finite loss stops the
run as `failed` and keeps the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import platform
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import data as data_lib
from mnist_jax import metrics, steps
from mnist_jax.checkpoint import Checkpoints
from mnist_jax.config import Config, build_config
from mnist_jax.errors import UserError
from mnist_jax.files import write_json_atomic
from mnist_jax.progress import Progress
from mnist_jax.record import RunRecord, default_run_name

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
RESUME_OVERRIDES = ("data_dir", "source", "wandb", "log_every")


def default_steps_per_call(backend: str) -> int:
    """Measured: on XLA:CPU one step per call is fastest (a scanned convolution gradient is
    ~25x slower there); on GPU/TPU per-call dispatch dominates, so scan many steps per call."""
    return 1 if backend == "cpu" else 50


@dataclasses.dataclass
class Position:
    """Where training stands; everything else (epoch, index in epoch) derives from `step`."""

    step: int
    steps_per_epoch: int
    best_accuracy: float = -1.0
    best_step: int = -1

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def index_in_epoch(self) -> int:
        return self.step % self.steps_per_epoch


class Stop(Exception):
    """Training ends early: `status` is "interrupted" or "failed"."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status

    @classmethod
    def interrupted(cls, step: int) -> Stop:
        return cls("interrupted", f"stopped by a signal at step {step}")


def fit(config: Config) -> int:
    """Trains `config` into a new run directory; returns the process exit code."""
    from mnist_jax.wandb_mirror import resolve_mode

    resolve_mode(config.wandb)  # a bad $WANDB_MODE is reported before anything is written
    dataset = load_data(config)
    environment = describe_environment()
    name = config.name or default_run_name(config.dataset)
    config = config.replace(name=name)
    record = RunRecord.create(config.runs_dir, name, config.to_dict(), environment)
    print(f"run directory: {record.dir}", flush=True)
    return _run(config, dataset, record, environment, resume=False)


def resume(run_dir: str | Path, flags: Mapping[str, Any]) -> int:
    """Continues an interrupted or failed run from its last checkpoint."""
    record = RunRecord.open(run_dir)
    given = {k: v for k, v in flags.items() if v is not None}
    fixed = sorted(set(given) - set(RESUME_OVERRIDES))
    if fixed:
        raise UserError(
            f"--resume continues the run with its own config; drop {', '.join(fixed)} "
            f"(only {', '.join(RESUME_OVERRIDES)} may change)"
        )
    if record.summary.get("status") == "completed":
        raise UserError(f"run {record.dir} already completed; start a new run instead")
    saved = record.read_config()
    config = build_config(saved["config"], given)
    dataset = load_data(config)
    if given:  # e.g. the data moved: evaluate and analyze should find it there too
        write_json_atomic(record.config_path, {**saved, "config": config.to_dict()})
    return _run(config, dataset, record, saved.get("environment", {}), resume=True)


def load_data(config: Config) -> data_lib.Dataset:
    dataset = data_lib.load_dataset(config.dataset, config.data_dir, config.source)
    if config.train_examples or config.test_examples:
        dataset = data_lib.subset(
            dataset,
            config.train_examples or len(dataset.train.labels),
            config.test_examples or len(dataset.test.labels),
        )
    if config.batch_size > len(dataset.train.labels):
        raise UserError(
            f"batch_size {config.batch_size} is larger than the {len(dataset.train.labels)} "
            "training images; choose a smaller --batch-size"
        )
    return dataset


def describe_environment() -> dict[str, Any]:
    import flax
    import optax

    import mnist_jax

    devices = jax.devices()
    return {
        "mnist_jax": mnist_jax.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "git_commit": _git_commit(),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _git_commit() -> str | None:
    """The project's commit (with `-dirty` for local changes) when it runs from a checkout."""
    repo = Path(__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) or None


def _run(
    config: Config,
    dataset: data_lib.Dataset,
    record: RunRecord,
    environment: Mapping[str, Any],
    *,
    resume: bool,
) -> int:
    from mnist_jax.wandb_mirror import Mirror, start_mirror

    mirror, loop = Mirror(), None
    with record.writer_lock(), _stop_on_signals() as stop:
        try:
            loop = _Loop(config, dataset, record)
            if resume:
                loop.restore()
            mirror = loop.mirror = start_mirror(
                config, record.dir, dict(environment), resume_id=record.summary.get("wandb/run_id")
            )
            record.update_summary(status="running", message=None, **mirror.info)
            status, message = _train(loop, stop)
            if status == "completed":
                loop.finish()
            record.update_summary(status=status, message=message, **loop.timings())
        except BaseException as e:
            # Not a planned stop: the record says so before the error goes on up.
            record.update_summary(status="failed", message=f"{type(e).__name__}: {e}")
            mirror.finish(record.summary, "failed")
            raise
        finally:
            if loop is not None:
                loop.checkpoints.close()
    mirror.finish(record.summary, status)
    print(f"{status}: {record.dir}", flush=True)
    return {"completed": EXIT_OK, "interrupted": EXIT_INTERRUPTED}.get(status, EXIT_FAILED)


def _train(loop: _Loop, stop: Callable[[], bool]) -> tuple[str, str | None]:
    """Compiles, then trains epoch by epoch; returns (status, message)."""
    loop.compile()
    with Progress(loop.total_steps, loop.steps_per_epoch) as progress:
        loop.progress = progress
        progress.start_at(loop.position.step)
        try:
            while loop.position.step < loop.total_steps:
                if stop():
                    raise Stop.interrupted(loop.position.step)
                loop.train_epoch(stop)
                loop.end_epoch()
        except Stop as e:
            if e.status == "interrupted":
                loop.save("last")
            progress.message(f"{e.status}: {e}")
            return e.status, str(e)
    return "completed", None


class _Loop:
    """The state of one training run between phases: device data, compiled calls, sums."""

    def __init__(self, config: Config, dataset: data_lib.Dataset, record: RunRecord) -> None:
        self.config, self.dataset, self.record = config, dataset, record
        self.n_train = len(dataset.train.labels)
        self.steps_per_epoch = self.n_train // config.batch_size
        self.total_steps = self.steps_per_epoch * config.epochs
        self.built = steps.build(config, dataset.num_classes, self.total_steps)
        self.checkpoints = Checkpoints(record.checkpoints_dir)
        self.state = self.built.init_state
        self.epoch_sums = steps.TrainSums.zeros()
        self.log_sums_at = (0, 0.0, 0)  # (step, loss sum, correct) at the last train event
        self.position = Position(0, self.steps_per_epoch)
        # Time spent in earlier segments of a resumed run counts towards the run's totals.
        self.t_segment = time.perf_counter()
        self.seconds_before = 0.0
        self.train_seconds = 0.0
        self.compile_seconds = 0.0
        self.last_eval: dict[str, Any] | None = None
        self.mirror: Any = None
        self.progress: Progress | None = None

    # Phase: restore.
    def restore(self) -> None:
        step = self.checkpoints.latest_step("last")
        if step is None:
            raise UserError(
                f"run {self.record.dir} has no checkpoint to resume from; start a new run"
            )
        payload, meta = self.checkpoints.restore("last", self._payload())
        self.state, self.epoch_sums = payload["state"], payload["epoch_sums"]
        self.position = Position(
            int(meta["step"]), self.steps_per_epoch, meta["best_accuracy"], meta["best_step"]
        )
        self.train_seconds = meta.get("train_seconds", 0.0)
        self.seconds_before = meta.get("elapsed_seconds", 0.0)
        self.log_sums_at = tuple(meta["log_sums_at"])
        self.record.truncate_events(self.position.step)
        print(f"resuming {self.record.dir} at step {self.position.step}", flush=True)

    # Phase: data onto the device once, compile ahead of time.
    def compile(self) -> None:
        config, dataset = self.config, self.dataset
        self.train_images = jnp.asarray(dataset.train.images)
        self.train_labels = jnp.asarray(dataset.train.labels, jnp.int32)
        self.test = steps.eval_data(
            dataset.test.images, dataset.test.labels, config.eval_batch_size
        )
        k = config.steps_per_call or default_steps_per_call(jax.default_backend())
        self.k = min(k, self.steps_per_epoch)
        t0 = time.perf_counter()
        permutation = steps.epoch_permutation(config.seed, 0, self.n_train)
        args = (
            self.state,
            self.epoch_sums,
            self.train_images,
            self.train_labels,
            permutation,
            jnp.int32(0),
        )
        sizes = {self.k, 1} if self.steps_per_epoch % self.k else {self.k}
        self.chunks = {
            size: steps.make_train_chunk(self.built, config, size).lower(*args).compile()
            for size in sizes
        }
        self.evaluate = steps.make_evaluate(self.built, self.state, self.test)
        n_test, c = self.test.num_examples, self.dataset.num_classes
        self.summarize = (
            jax.jit(metrics.classification_summary)
            .lower(
                jax.ShapeDtypeStruct((c, c), jnp.int32),
                jax.ShapeDtypeStruct((n_test, c), jnp.float32),
                jax.ShapeDtypeStruct((n_test,), jnp.int32),
            )
            .compile()
        )
        self.compile_seconds = time.perf_counter() - t0

    # Phase: one epoch of training (or what is left of it).
    def train_epoch(self, stop: Callable[[], bool]) -> None:
        config, position = self.config, self.position
        permutation = steps.epoch_permutation(config.seed, position.epoch, self.n_train)
        t0 = time.perf_counter()
        self._t_log = t0
        while True:
            remaining = self.steps_per_epoch - position.index_in_epoch
            size = self.k if remaining >= self.k else 1
            self.state, self.epoch_sums = self.chunks[size](
                self.state,
                self.epoch_sums,
                self.train_images,
                self.train_labels,
                permutation,
                jnp.int32(position.index_in_epoch),
            )
            position.step += size
            self.progress.advance(position.step)
            at_epoch_end = position.index_in_epoch == 0
            crossed_log = position.step // config.log_every != (position.step - size) // (
                config.log_every
            )
            if crossed_log or at_epoch_end:
                self._log_train()
            if at_epoch_end:
                break
            if stop():
                self.train_seconds += time.perf_counter() - t0
                raise Stop.interrupted(position.step)
        self.train_seconds += time.perf_counter() - t0

    def _log_train(self) -> None:
        """A train event over the steps since the last one; catches a non-finite loss."""
        sums = jax.device_get(self.epoch_sums)
        if sums.first_bad_step >= 0:
            raise Stop(
                "failed",
                f"the training loss became non-finite at step {int(sums.first_bad_step)}; "
                f"the learning rate ({self.config.lr}) is likely too high for "
                f"{self.config.optimizer}: try a smaller --lr or --grad-clip 1.0 "
                "(the last good checkpoint is kept)",
            )
        step0, loss0, correct0 = self.log_sums_at
        position = self.position
        steps_done = position.step - step0
        examples = steps_done * self.config.batch_size
        # The epoch sums restart at each epoch: the previous event's values count from zero then.
        epoch_start = position.step - (position.index_in_epoch or self.steps_per_epoch)
        if step0 <= epoch_start:
            examples = (position.step - epoch_start) * self.config.batch_size
            loss0, correct0 = 0.0, 0
        now = time.perf_counter()
        event = {
            "step": position.step,
            "epoch": position.step / self.steps_per_epoch,
            metrics.metric_key("train", "loss"): (float(sums.loss_sum) - loss0) / examples,
            metrics.metric_key("train", "accuracy"): (int(sums.correct) - correct0) / examples,
            metrics.metric_key("train", "lr"): float(self.built.schedule(position.step)),
            metrics.metric_key("train", "examples_per_sec"): steps_done
            * self.config.batch_size
            / (now - self._t_log),
        }
        self._t_log = now
        self.log_sums_at = (position.step, float(sums.loss_sum), int(sums.correct))
        self.record.log(event)
        self.mirror.log(event)
        self.progress.train_event(event)

    # Phase: epoch end: evaluate, log, checkpoint.
    def end_epoch(self) -> None:
        position = self.position
        sums = jax.device_get(self.epoch_sums)
        test_record = self._evaluate()
        train = {
            metrics.metric_key("train", "loss"): float(sums.loss_sum) / int(sums.count),
            metrics.metric_key("train", "accuracy"): int(sums.correct) / int(sums.count),
        }
        event = {"step": position.step, "epoch": position.epoch, **train, **test_record}
        event.pop(metrics.metric_key("test", "confusion_matrix"), None)
        self.record.log(event)
        self.mirror.log(event)
        self.progress.epoch_event(event)
        self.epoch_sums = steps.TrainSums.zeros()
        accuracy = test_record[metrics.metric_key("test", "accuracy")]
        if accuracy > position.best_accuracy:
            position.best_accuracy, position.best_step = accuracy, position.step
            self.save("best")
        self.save("last")
        self.record.update_summary(
            step=position.step,
            epoch=position.epoch,
            **train,
            **test_record,
            **{"best/test/accuracy": position.best_accuracy, "best/step": position.best_step},
        )

    def _evaluate(self) -> dict[str, Any]:
        """The whole test split: counts, then every metric; keeps the outputs for the end."""
        eval_sums, probs_NxC = self.evaluate(self.state, self.test)
        labels = self.test.labels_KxB.reshape(-1)[: self.test.num_examples]
        summary = self.summarize(eval_sums.confusion, probs_NxC, labels)
        loss = float(eval_sums.loss_sum) / int(eval_sums.count)
        self.last_eval = {"probs": probs_NxC, "confusion": eval_sums.confusion}
        return metrics.to_record("test", jax.device_get(summary), eval_sums.confusion, loss)

    # Phase: final record.
    def finish(self) -> None:
        if self.last_eval is None:  # resumed after the last epoch's checkpoint: nothing ran
            self._evaluate()
        probs = np.asarray(self.last_eval["probs"], np.float32)
        labels = np.asarray(self.dataset.test.labels, np.int32)
        tmp = self.record.dir / ".predictions.tmp.npz"
        np.savez_compressed(
            tmp, probs=probs, labels=labels, indices=np.arange(len(labels), dtype=np.int32)
        )
        tmp.replace(self.record.predictions_path)
        self.mirror.log_evaluation(
            probs,
            labels,
            self.dataset.test.images,
            self.dataset.class_names,
            np.asarray(self.last_eval["confusion"]),
        )
        best = self.checkpoints.directory / "best" / str(self.position.best_step)
        metadata = {k: v for k, v in self.record.summary.items() if k.startswith("test/")}
        self.mirror.log_checkpoint(best, metadata)

    def save(self, kind: str) -> None:
        if self.checkpoints.latest_step(kind) == self.position.step:
            return  # e.g. a signal right at an epoch end, whose checkpoint is already written
        meta = {
            "step": self.position.step,
            "best_accuracy": self.position.best_accuracy,
            "best_step": self.position.best_step,
            "log_sums_at": list(self.log_sums_at),
            "train_seconds": self.train_seconds,
            "elapsed_seconds": self.elapsed_seconds(),
        }
        self.checkpoints.save(kind, self.position.step, self._payload(), meta)

    def _payload(self) -> dict[str, Any]:
        return {"state": self.state, "epoch_sums": self.epoch_sums}

    def elapsed_seconds(self) -> float:
        """Wall time of the run so far, over all its segments (a resumed run has several)."""
        return self.seconds_before + time.perf_counter() - self.t_segment

    def timings(self) -> dict[str, Any]:
        """The run's totals over all its segments."""
        examples = self.position.step * self.config.batch_size
        return {
            "step": self.position.step,
            "time/compile_seconds": self.compile_seconds,
            "time/train_seconds": self.train_seconds,
            "time/total_seconds": self.elapsed_seconds(),
            metrics.metric_key("train", "examples_per_sec"): (
                examples / self.train_seconds if self.train_seconds else None
            ),
        }


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[Any]:
    """SIGINT and SIGTERM ask the loop to stop at the next step boundary."""
    requested = []

    def handler(signum: int, frame: Any) -> None:
        requested.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requested)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
