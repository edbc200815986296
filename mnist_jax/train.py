"""`fit(config)`: the phases of a training run, tied together and nothing else.

In order: load the data, open the run record, build the `Trainer` (compiled once), open the
writers, train epoch by epoch (evaluate, log, checkpoint at each epoch end), then write the
final record. Ctrl-C or SIGTERM stops at the next step boundary with a checkpoint; a non-finite
loss stops the run as `failed` and keeps the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import platform
import subprocess
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mnist_jax import data as data_lib
from mnist_jax import metrics, models, parallel
from mnist_jax.checkpoint import COPIES_AT_ONCE, Checkpoints, require_space
from mnist_jax.config import PLACEMENT_FIELDS, Config, build_config
from mnist_jax.errors import UserError
from mnist_jax.files import atomic_write, storage_problem, write_json_atomic
from mnist_jax.record import FollowerRecord, RunRecord, default_run_name
from mnist_jax.signals import StopRequest, stop_on_signals
from mnist_jax.trainer import Trainer, checkpoint_bytes, describe_execution
from mnist_jax.writers import MultiWriter, TestResults, Writer
from mnist_jax.writers.progress import Progress
from mnist_jax.writers.record import RecordWriter

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
MAX_STEPS = 2**31 - 1  # the step is an int32 on the device
RESUME_OVERRIDES = ("data_dir", "source", "wandb", "log_every", *PLACEMENT_FIELDS)
TEST_ACCURACY = metrics.metric_key("test", "accuracy")
RATE = metrics.metric_key("train", "examples_per_sec")
TEST_PREFIX = metrics.metric_key("test", "")


class Stop(Exception):
    """Training ends early: `status` is "interrupted" or "failed"."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status

    @classmethod
    def interrupted(cls, step: int) -> Stop:
        return cls("interrupted", f"stopped by a signal at step {step}")


def fit(config: Config, stop: StopRequest | None = None) -> int:
    """Trains `config` into a new run directory; returns the process exit code.

    `stop` is the caller's when it already listens for SIGINT/SIGTERM (the CLI does, from
    before its imports); otherwise `fit` listens itself.
    """
    from mnist_jax.writers.wandb import resolve_mode

    with listening(stop) as stop:
        start_backend(config)
        resolve_mode(config.wandb)  # a bad $WANDB_MODE is reported before anything is written
        dataset = load_data(config)
        model = models.describe(config, dataset.spec)  # an unknown model, too
        if config.tensorboard:
            from mnist_jax.writers.tensorboard import require_tensorboardx

            require_tensorboardx()
        require_disk_space(config, dataset, config.runs_dir)
        announce_backend(config)
        environment = describe_environment(config, len(dataset.train.labels))
        stop.raise_if_requested()  # Ctrl-C before the run exists: nothing to record
        # Every process of a distributed run takes process 0's name: one run, one directory.
        name = parallel.broadcast_text(config.name or default_run_name(config.dataset))
        config = config.replace(name=name)
        record = _in_main_process(
            lambda: RunRecord.create(config.runs_dir, name, config.to_dict(), environment, model),
            FollowerRecord.follow(Path(config.runs_dir) / name),
        )
        with record.writer_lock():
            if parallel.is_main_process():
                print(f"run directory: {record.dir}", flush=True)
            return _run(config, dataset, record, environment, stop, resume=False)


def resume(run_dir: str | Path, flags: Mapping[str, Any], stop: StopRequest | None = None) -> int:
    """Continues an interrupted or failed run from its last checkpoint."""
    record = RunRecord.open(run_dir)
    with listening(stop) as stop, contextlib.ExitStack() as held:
        given = resume_flags(flags, "the run with its own config")
        if record.summary.get("status") == "completed":
            raise UserError(f"run {record.dir} already completed; start a new run instead")
        saved = record.read_config()
        # Where the run computes is this start's to say, not the first segment's.
        kept = {k: v for k, v in saved["config"].items() if k not in PLACEMENT_FIELDS}
        config = build_config(kept, given)
        start_backend(config)
        if not parallel.is_main_process():
            record = FollowerRecord.open(run_dir)
        _in_main_process(lambda: held.enter_context(record.writer_lock()), None)
        if last_checkpoint_step(record) is None:  # found here: `_run` would mark the run failed
            raise UserError(f"run {record.dir} has no checkpoint to resume from; start a new run")
        dataset = load_data(config)
        require_disk_space(config, dataset, record.dir)
        announce_backend(config)
        stop.raise_if_requested()
        if set(given) - set(PLACEMENT_FIELDS) and parallel.is_main_process():
            # e.g. the data moved: evaluate and analyze should find it there too
            write_json_atomic(record.config_path, {**saved, "config": config.to_dict()})
        return _run(config, dataset, record, saved.get("environment", {}), stop, resume=True)


def last_checkpoint_step(record: RunRecord) -> int | None:
    """The step of the run's last checkpoint (None: there is none), read without writing."""
    checkpoints = Checkpoints(record.checkpoints_dir, read_only=True)
    try:
        return checkpoints.latest_step("last")
    finally:
        checkpoints.close()


def resume_flags(flags: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The flags given (not None) with `--resume`, which continues `what`: only those in
    `RESUME_OVERRIDES` (where the data is, how it is reported and placed) may change."""
    given = {k: v for k, v in flags.items() if v is not None}
    fixed = sorted(set(given) - set(RESUME_OVERRIDES))
    if fixed:
        raise UserError(
            f"--resume continues {what}; drop {', '.join(fixed)} "
            f"(only {', '.join(RESUME_OVERRIDES)} may change)"
        )
    return given


def _in_main_process(fn: Callable[[], Any], default: Any) -> Any:
    """`fn()` in process 0 (the one that writes the record), `default` in the others; an error
    there stops every process, so that none waits for the others."""
    result, error = default, None
    if parallel.is_main_process():
        try:
            result = fn()
        except UserError as e:
            error = e
    parallel.share_outcome(error)
    return result


def listening(stop: StopRequest | None) -> contextlib.AbstractContextManager[StopRequest]:
    return contextlib.nullcontext(stop) if stop is not None else stop_on_signals()


def load_data(config: Config) -> data_lib.Dataset:
    dataset = data_lib.load_dataset(config.dataset, config.data_dir, config.source)
    if config.train_examples or config.test_examples:
        dataset = data_lib.subset(
            dataset,
            config.train_examples or len(dataset.train.labels),
            config.test_examples or len(dataset.test.labels),
        )
    require_trainable(config, len(dataset.train.labels))
    return dataset


def require_trainable(config: Config, num_train: int) -> None:
    """A batch larger than the data, or more steps than the step counter holds, is found
    before the run exists."""
    if config.batch_size > num_train:
        raise UserError(
            f"batch_size {config.batch_size} is larger than the {num_train} training images; "
            "choose a smaller --batch-size"
        )
    total = num_train // config.batch_size * config.epochs
    if total > MAX_STEPS:
        raise UserError(
            f"{config.epochs} epochs of {num_train // config.batch_size} steps is {total:,} "
            f"steps, more than the {MAX_STEPS:,} a run counts; choose fewer --epochs"
        )


def start_backend(config: Config) -> None:
    """What must be settled before JAX computes anything (determinism, the compilation cache,
    joining the other processes of a distributed run), then the devices to train on."""
    if config.deterministic:
        parallel.use_deterministic_ops()
    parallel.use_compilation_cache()
    if config.distributed:
        parallel.initialize_distributed(config.coordinator, config.num_processes, config.process_id)
    parallel.use_devices(config.devices)
    parallel.require_divisible(config.batch_size)


def announce_backend(config: Config) -> None:
    """Which backend runs, said out loud (and loudly when it looks like the wrong one)."""
    devices = parallel.describe_devices()
    processes = devices["process_count"]
    print(
        f"backend: {devices['backend']}, {devices['device_count']} x {devices['device_kind']}"
        + (f" in {processes} processes" if processes > 1 else "")
        + (" (deterministic)" if config.deterministic else ""),
        flush=True,
    )
    if hint := parallel.accelerator_hint():
        warnings.warn(f"JAX is running on the CPU, but {hint}", stacklevel=2)


def require_disk_space(
    config: Config, dataset: data_lib.Dataset, directory: str | Path, runs: int = 1
) -> None:
    """A disk too small for the checkpoints of the run (or of `runs` runs of the config's
    shape) is found now, not at the first epoch end."""
    nbytes = runs * COPIES_AT_ONCE * checkpoint_bytes(config, dataset.spec)
    try:
        require_space(Path(directory), nbytes, "checkpoints")
    except OSError as e:
        raise UserError(
            f"cannot train into {directory}: {storage_problem(e)}; free some space or choose "
            "another --runs-dir",
            exit_code=EXIT_FAILED,
        ) from None


def describe_environment(config: Config, num_train: int) -> dict[str, Any]:
    import flax
    import jax
    import optax

    import mnist_jax

    return {
        "mnist_jax": mnist_jax.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        **parallel.describe_devices(),
        "execution": describe_execution(config, parallel.backend(), num_train),
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
    stop: StopRequest,
    *,
    resume: bool,
) -> int:
    """The phases of a run whose record exists and whose writer lock is held."""
    loop = None
    try:
        with parallel.count_compilations() as compiled:  # programs XLA really compiled
            clock = Clock()  # the run's time includes compiling
            loop = Loop(config, dataset, record, Trainer(config, dataset), clock=clock)
            loop.open(environment, resume=resume)
            status, message = loop.train(stop)
            return loop.finish(status, message, compiled)
    except BaseException as e:
        abort(record, loop.writer if loop is not None else MultiWriter([]), e)
        raise
    finally:
        if loop is not None and not parallel.peer_lost():
            loop.checkpoints.close()


def abort(record: RunRecord, writer: Writer, error: BaseException) -> None:
    """Not a planned stop: the record says so (where the disk still lets it) before the error
    goes on up. A disk that refuses to write, or a lost peer process of a distributed run, is
    the user's to fix: one line (a `UserError`)."""
    problem, lost = storage_problem(error), parallel.lost_peer(error)
    message = f"{type(error).__name__}: {error}"
    if lost is not None:
        message = (
            f"{lost}; the run stopped at its last checkpoint: continue it with "
            f"`mnist-jax train --resume {record.dir}` in every process"
        )
        parallel.exit_after_peer_loss(EXIT_FAILED)
    elif problem is not None:
        message = (
            f"cannot write the run record in {record.dir}: {problem}; free some space, "
            f"then continue the run with `mnist-jax train --resume {record.dir}`"
        )
    with contextlib.suppress(OSError):
        record.update_summary(status="failed", message=message)
    writer.close("failed", record.summary)
    if problem is not None or lost is not None:
        raise UserError(message, exit_code=EXIT_FAILED) from None


def open_writers(
    config: Config, record: RunRecord, environment: Mapping[str, Any], progress: Progress
) -> MultiWriter:
    """The destinations of this run's metrics: the record and the progress display always,
    TensorBoard when asked, W&B unless disabled (a resumed run continues its W&B run)."""
    from mnist_jax.writers.wandb import start_mirror_in_background

    writers: list[Writer] = [RecordWriter(record), progress]
    if config.tensorboard:
        from mnist_jax.writers.tensorboard import TensorBoardWriter

        writers.append(TensorBoardWriter(record.dir))
    resume_id = record.summary.get("wandb/run_id")
    writers.append(start_mirror_in_background(config, record.dir, dict(environment), resume_id))
    return MultiWriter(writers)


@dataclasses.dataclass
class Clock:
    """The run's wall-clock accounts, over all its segments (a resumed run has several)."""

    seconds_before: float = 0.0  # wall time of earlier segments
    train_seconds: float = 0.0
    eval_seconds: float = 0.0  # evaluations of the test split, results on the host
    started: float = dataclasses.field(default_factory=time.perf_counter)
    mark_time: float = 0.0
    mark_step: int = 0
    lap_start: float | None = None

    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def mark(self, step: int) -> None:
        """Rates are measured from here: steps run in this process since the mark."""
        self.mark_time, self.mark_step = time.perf_counter(), step

    def go(self, step: int) -> None:
        """Training (re)starts at `step`: time counts as training time until `pause`."""
        self.lap_start = time.perf_counter()
        self.mark(step)

    def pause(self) -> None:
        if self.lap_start is not None:
            self.train_seconds += time.perf_counter() - self.lap_start
            self.lap_start = None

    def examples_per_sec(self, step: int, batch_size: int) -> float:
        seconds = time.perf_counter() - self.mark_time
        return (step - self.mark_step) * batch_size / seconds if seconds > 0 else float("nan")

    def totals(self, step: int, batch_size: int, compile_seconds: float) -> dict[str, Any]:
        """The run's timings over all its segments, for the summary."""
        seconds = self.train_seconds
        return {
            "step": step,
            metrics.COMPILE_SECONDS: compile_seconds,
            metrics.TRAIN_SECONDS: seconds,
            metrics.EVAL_SECONDS: self.eval_seconds,
            metrics.TOTAL_SECONDS: self.elapsed(),
            RATE: step * batch_size / seconds if seconds else None,
        }


@dataclasses.dataclass
class Loop:
    """One run between its phases: the trainer, the record, the writers and what to keep
    (best accuracy, timings, the last evaluation)."""

    config: Config
    dataset: data_lib.Dataset
    record: RunRecord
    trainer: Trainer
    writer: MultiWriter = dataclasses.field(default_factory=lambda: MultiWriter([]))
    best_accuracy: float = -1.0
    best_step: int = -1
    clock: Clock = dataclasses.field(default_factory=Clock)
    last_eval: Any = None

    progress: Progress | None = None

    def __post_init__(self) -> None:
        self.checkpoints = Checkpoints(self.record.checkpoints_dir)
        self.saved: tuple[str, int] | None = None  # the kind and step this process saved last
        if self.progress is None:
            self.progress = Progress(self.trainer.total_steps, self.trainer.steps_per_epoch)

    # Phase: open: restore the checkpoint of a resumed run, open the writers.
    def open(self, environment: Mapping[str, Any], *, resume: bool) -> None:
        if resume:
            self.restore()
        if parallel.is_main_process():  # the others of a distributed run write nothing
            self.writer = open_writers(self.config, self.record, environment, self.progress)
        self.record.update_summary(status="running", message=None, **self.writer.info)

    def restore(self) -> None:
        """The last checkpoint (`resume` and a sweep's `_pending` found that there is one)."""
        payload, meta = self.checkpoints.restore("last", self.trainer.payload())
        self.trainer.load(payload, int(meta["step"]))
        self.best_accuracy, self.best_step = meta["best_accuracy"], meta["best_step"]
        self.clock.train_seconds = meta.get("train_seconds", 0.0)
        self.clock.eval_seconds = meta.get("eval_seconds", 0.0)
        self.clock.seconds_before = meta.get("elapsed_seconds", 0.0)
        self.record.truncate_events(self.trainer.step)
        print(f"resuming {self.record.dir} at step {self.trainer.step}", flush=True)

    # Phase: train to the end; returns (status, message).
    def train(self, stop: Callable[[], bool]) -> tuple[str, str | None]:
        trainer = self.trainer
        with self.progress:
            self.begin()
            try:
                while trainer.step < trainer.total_steps:
                    if parallel.any_process(stop()):
                        raise Stop.interrupted(trainer.step)
                    before = trainer.step
                    trainer.run(trainer.steps_per_call)
                    self.after_steps(before)
            except Stop as e:
                return self.stopped(e)
            finally:
                self.clock.pause()
        return "completed", None

    def begin(self) -> None:
        self.progress.start_at(self.trainer.step)
        self.clock.go(self.trainer.step)

    def after_steps(self, before: int) -> None:
        """What follows the trainer's advance from step `before`: the progress display, a train
        event at each log interval, and the epoch's end (evaluate, log, checkpoint) when it
        came. Raises `Stop` when the loss turned non-finite."""
        step = self.trainer.step
        self.progress.advance(step)
        at_epoch_end = step % self.trainer.steps_per_epoch == 0
        if step // self.config.log_every != before // self.config.log_every or at_epoch_end:
            self.log_train()
        if at_epoch_end:
            self.clock.pause()  # evaluation and checkpoints are not training time
            self.end_epoch()
            self.clock.go(step)

    def stopped(self, stop: Stop) -> tuple[str, str]:
        """An early end: an interrupted run is checkpointed where it stands."""
        self.clock.pause()
        if stop.status == "interrupted":
            self.save("last")
        self.writer.message(f"{stop.status}: {stop}")
        return stop.status, str(stop)

    # Phase: the end: the final record of a completed run, the summary, the writers closed.
    def finish(self, status: str, message: str | None, compiled: Mapping[str, int]) -> int:
        """Returns the process exit code for `status`."""
        if status == "completed" and parallel.is_main_process():
            write_final_record(self)
        elif status == "completed" and self.last_eval is None:
            self.evaluate()  # the collective process 0 runs in write_final_record
        trainer = self.trainer
        totals = self.clock.totals(trainer.step, self.config.batch_size, trainer.compile_seconds)
        totals[metrics.COMPILED_PROGRAMS] = compiled["programs"]
        totals[metrics.COMPILE_CACHE_HITS] = compiled["cache_hits"]
        totals[metrics.TRACED_PROGRAMS] = compiled["traced"]
        self.writer.wait_open()
        self.record.update_summary(status=status, message=message, **totals, **self.writer.info)
        self.checkpoints.close()
        self.writer.close(status, self.record.summary)
        if parallel.is_main_process():
            print(f"{status}: {self.record.dir}", flush=True)
        return {"completed": EXIT_OK, "interrupted": EXIT_INTERRUPTED}.get(status, EXIT_FAILED)

    def log_train(self) -> None:
        """A train event over the steps since the last one; catches a non-finite loss."""
        sums, step = self.trainer.take_interval(), self.trainer.step
        if sums.first_bad_step >= 0:
            kept = self.checkpoints.latest_step("last")
            raise Stop(
                "failed",
                f"the training loss became non-finite at step {int(sums.first_bad_step)} "
                f"(found at step {step}); the learning rate ({self.config.lr}) is likely too "
                f"high for {self.config.optimizer}: try a smaller --lr or --grad-clip 1.0 "
                + (
                    f"(the last good checkpoint, at step {kept}, is kept)"
                    if kept is not None
                    else "(no checkpoint was saved: it diverged within the first epoch)"
                ),
            )
        event = {
            "epoch": step / self.trainer.steps_per_epoch,
            **metrics.train_record(sums.loss_sum, sums.correct, sums.count),
            metrics.metric_key("train", "lr"): self.trainer.learning_rate(),
            RATE: self.clock.examples_per_sec(step, self.config.batch_size),
        }
        self.clock.mark(step)
        self.writer.write(step, event)

    # Phase: epoch end: evaluate, log, checkpoint.
    def end_epoch(self) -> None:
        step, epoch = self.trainer.step, self.trainer.epoch
        sums = self.trainer.take_epoch()
        train = metrics.train_record(sums.loss_sum, sums.correct, sums.count)
        test = self.evaluate()
        event = {"epoch": epoch, **train, **test}
        event.pop(metrics.metric_key("test", "confusion_matrix"), None)
        self.writer.write(step, event)
        if test[TEST_ACCURACY] > self.best_accuracy:
            self.best_accuracy, self.best_step = test[TEST_ACCURACY], step
            self.save("best")
        self.save("last")
        self.record.update_summary(
            step=step,
            epoch=epoch,
            **train,
            **test,
            **{metrics.BEST_TEST_ACCURACY: self.best_accuracy, metrics.BEST_STEP: self.best_step},
            **self.writer.info,  # a writer opening in the background adds its facts when open
        )

    def evaluate(self) -> dict[str, Any]:
        """The whole test split, every metric; keeps the outputs for the final record."""
        t0 = time.perf_counter()
        self.last_eval = parallel.fetch(self.trainer.evaluate())
        self.clock.eval_seconds += time.perf_counter() - t0
        sums = self.last_eval.sums
        loss = float(sums.loss_sum) / int(sums.count)
        return metrics.to_record("test", self.last_eval.summary, sums.confusion, loss)

    def save(self, kind: str) -> None:
        step = self.trainer.step
        if self.checkpoints.latest_step(kind) == step:
            return  # e.g. a signal right at an epoch end, whose checkpoint is already written
        meta = {
            "step": step,
            "best_accuracy": self.best_accuracy,
            "best_step": self.best_step,
            "train_seconds": self.clock.train_seconds,
            "eval_seconds": self.clock.eval_seconds,
            "elapsed_seconds": self.clock.elapsed(),
        }
        # An epoch's best checkpoint that is also its last is saved once and copied.
        twin = self.saved[0] if self.saved is not None and self.saved[1] == step else None
        self.checkpoints.save(kind, step, self.trainer.payload(), meta, same_as=twin)
        self.saved = (kind, step)


def write_final_record(loop: Loop) -> None:
    """Phase: the end of a completed run: test predictions, and the last evaluation and the
    best checkpoint for the writers that keep them (W&B)."""
    if loop.last_eval is None:  # resumed after the last epoch's checkpoint: nothing ran
        loop.evaluate()
    probs = np.asarray(loop.last_eval.probs_NxC, np.float32)
    test = loop.dataset.test
    labels = np.asarray(test.labels, np.int32)
    with atomic_write(loop.record.predictions_path) as f:
        np.savez_compressed(
            f, probs=probs, labels=labels, indices=np.arange(len(labels), dtype=np.int32)
        )
    confusion = np.asarray(loop.last_eval.sums.confusion)
    classes = loop.dataset.class_names
    curves = loop.last_eval.curves
    loop.writer.write_evaluation(
        TestResults(probs, labels, test.images, classes, confusion, curves)
    )
    best = loop.checkpoints.directory / "best" / str(loop.best_step)
    metadata = {k: v for k, v in loop.record.summary.items() if k.startswith(TEST_PREFIX)}
    loop.writer.write_checkpoint(best, metadata)
