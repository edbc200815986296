"""Training a sweep: its trials, grouped by program, each writing a complete run record.

Trials whose configs have the same structure (`steps.structure`: every field but the values of
`steps.Hyper`) share their compiled programs. On an accelerator up to `max_parallel` of them
train as one program mapped over a trial axis, since one small CNN fills a sliver of a GPU; on
XLA:CPU a mapped convolution is slower per example than one trial's (measured in
benchmarks/bench_sweep.py), so there they train one after another, reusing one program. Each
trial is a `train.Loop` of its own: its record, checkpoints, writers and stops are exactly those
of `mnist-jax train`, so `evaluate`, `predict`, `analyze` and `train --resume` work on a trial
unchanged.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mnist_jax import models, parallel, steps
from mnist_jax.errors import UserError
from mnist_jax.files import write_json_atomic
from mnist_jax.record import RunRecord
from mnist_jax.signals import StopRequest
from mnist_jax.sweep import table
from mnist_jax.sweep.spec import Sweep, Trial, load_spec
from mnist_jax.train import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Clock,
    Loop,
    Stop,
    abort,
    announce_backend,
    describe_environment,
    last_checkpoint_step,
    listening,
    load_data,
    require_disk_space,
    require_trainable,
    resume_flags,
    start_backend,
)
from mnist_jax.trainer import Trainer, describe_execution
from mnist_jax.writers.progress import TEST_ACCURACY, Progress

ACCELERATOR_PARALLEL = 16  # trials mapped at once on a GPU/TPU unless --max-parallel says


def default_max_parallel(backend: str) -> int:
    """Measured (benchmarks/bench_sweep.py): on XLA:CPU a mapped step costs more per example
    than one trial's, so trials run one at a time there; accelerators map many at once."""
    return 1 if backend == "cpu" else ACCELERATOR_PARALLEL


def sweep(
    spec: str | Path | None,
    flags: Mapping[str, Any],
    *,
    name: str | None = None,
    max_parallel: int = 0,
    resume: str | Path | None = None,
    stop: StopRequest | None = None,
) -> int:
    """`mnist-jax sweep`: a new sweep from `spec` (flags on its base recipe), or the sweep in
    directory `resume` continued; returns the process exit code."""
    if max_parallel < 0:
        raise UserError(
            f"--max-parallel must be 0 (chosen per backend) or positive, got {max_parallel}"
        )
    # Trials share one device: a sweep spreads over several devices or hosts only by running
    # one sweep per device (say, one spec per GPU), not yet by sharding its trial axis.
    if flags.get("distributed"):
        raise UserError("sweep runs in one process; --distributed is for train")
    if flags.get("devices") not in (None, 1):
        raise UserError("sweep trains its trials on one device; drop --devices")
    flags = {**flags, "devices": 1}
    with listening(stop) as stop:
        if resume is not None:
            if spec is not None or name is not None:
                raise UserError("--resume continues a saved sweep: drop the spec and --name")
            planned = resume_sweep(resume, flags)
        elif spec is None:
            raise UserError(
                "give a sweep spec (e.g. experiments/lr_sweep.toml), or --resume a sweep directory"
            )
        else:
            planned = load_spec(spec, flags, name)
        return run_sweep(planned, stop, max_parallel=max_parallel, resume=resume is not None)


def run_sweep(
    sweep: Sweep, stop: StopRequest, *, max_parallel: int = 0, resume: bool = False
) -> int:
    """Trains every trial of `sweep` not yet done; returns the process exit code."""
    first = sweep.trials[0].config
    if first.distributed:
        raise UserError("sweep runs in one process; distributed = true is for train")
    start_backend(first)
    from mnist_jax.writers.wandb import resolve_mode

    resolve_mode(first.wandb)
    dataset = load_data(first)
    described = {}
    for trial in sweep.trials:  # an unknown model is found before anything is written
        require_trainable(trial.config, len(dataset.train.labels))
        key = _structure_key(trial.config)
        if key not in described:
            described[key] = models.describe(trial.config, dataset.spec)
    width = max_parallel or default_max_parallel(parallel.backend())
    announce_backend(first)
    pending = _pending(sweep, resume)
    require_disk_space(first, dataset, sweep.directory, runs=len(pending))
    _create_or_check(sweep, resume)
    environment = describe_environment(first, len(dataset.train.labels))
    batches = plan(pending, width)
    print(
        f"sweep {sweep.name}: {len(pending)} of {len(sweep.trials)} trials to train, "
        f"{len(batches)} program run(s), up to {width} trial(s) at once: {sweep.directory}",
        flush=True,
    )
    programs: dict[Any, Any] = {}
    interrupted = False
    for batch in batches:
        if stop():
            interrupted = True
            break
        statuses = run_batch(batch, dataset, described, environment, stop, programs)
        interrupted = "interrupted" in statuses
        if interrupted:
            break
    rows, summary = table.write_tables(sweep.directory, sweep.to_dict())
    print(table.format_table(rows), flush=True)
    if any(row["trials"] > 1 for row in summary):
        print("\ntest accuracy over seeds, per swept value:", flush=True)
        print(table.format_table(summary), flush=True)
    print(f"sweep table: {sweep.directory / table.TABLE_FILE}", flush=True)
    if interrupted:
        print(f"interrupted: continue with `mnist-jax sweep --resume {sweep.directory}`")
        return EXIT_INTERRUPTED
    return EXIT_OK if any(row["status"] == "completed" for row in rows) else EXIT_FAILED


def resume_sweep(directory: str | Path, flags: Mapping[str, Any]) -> Sweep:
    """The sweep saved in `directory`, with the flags a resumed run may change applied."""
    saved = table.read_sweep(directory)
    given = resume_flags(flags, "the sweep with its own spec")
    file = Path(directory) / table.SWEEP_FILE
    try:
        sweep = Sweep.from_dict(Path(directory), saved)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise UserError(
            f"{file} is damaged ({type(e).__name__}: {e}); its trials are still runs "
            "(train --resume each), or start the sweep again under another --name"
        ) from None
    if not sweep.trials:
        raise UserError(f"{file} lists no trials; the sweep record is damaged")
    trials = tuple(
        Trial(t.name, t.values, t.config.replace(**given, runs_dir=str(directory)))
        for t in sweep.trials
    )
    return Sweep(sweep.name, Path(directory), sweep.swept, trials)


class Pending:
    """A trial still to train: fresh, or resumed from its last checkpoint at `step`."""

    def __init__(self, trial: Trial, record: RunRecord | None, step: int) -> None:
        self.trial, self.record, self.step = trial, record, step


def _pending(sweep: Sweep, resume: bool) -> list[Pending]:
    """The trials to train: all of a new sweep; on --resume, those not completed or failed."""
    out = []
    for trial in sweep.trials:
        run_dir = sweep.directory / trial.name
        if not (resume and run_dir.is_dir()):
            out.append(Pending(trial, None, -1))
            continue
        record = RunRecord.open(run_dir)
        status = record.summary.get("status")
        if status in ("completed", "failed"):
            if status == "failed":
                print(
                    f"{trial.name} failed before ({record.summary.get('message')}); not "
                    f"retried (continue it alone with `mnist-jax train --resume {run_dir}`)",
                    flush=True,
                )
            continue
        step = last_checkpoint_step(record)
        out.append(Pending(trial, record, -1 if step is None else step))
    return out


def plan(pending: Sequence[Pending], width: int) -> list[list[Pending]]:
    """Batches of at most `width` trials that train as one program: the same structure and
    the same step to start from. A group too large for one batch is cut into batches as equal
    as can be (10 trials at width 8: 5 and 5), so that one compiled program serves them all."""
    groups: dict[Any, list[Pending]] = {}
    for p in pending:
        groups.setdefault((_structure_key(p.trial.config), max(p.step, 0)), []).append(p)
    batches = []
    for group in groups.values():
        count = -(-len(group) // width)
        size = -(-len(group) // count)
        batches += [group[i : i + size] for i in range(0, len(group), size)]
    return batches


def _structure_key(config: Any) -> str:
    shape = steps.structure(config)
    shape.pop("name")
    return json.dumps(shape, sort_keys=True)


def _create_or_check(sweep: Sweep, resume: bool) -> None:
    path = sweep.directory / table.SWEEP_FILE
    if resume:
        return
    if sweep.directory.exists() and any(sweep.directory.iterdir()):
        hint = (
            f"continue it with `mnist-jax sweep --resume {sweep.directory}`"
            if path.exists()
            else "it holds other files"
        )
        raise UserError(
            f"sweep directory {sweep.directory} already exists ({hint}); choose another --name"
        )
    try:
        write_json_atomic(path, sweep.to_dict())
    except OSError as e:
        raise UserError(f"cannot create the sweep in {sweep.directory}: {e.strerror}") from None


def run_batch(
    batch: Sequence[Pending],
    dataset: Any,
    described: Mapping[str, Any],
    environment: Mapping[str, Any],
    stop: Callable[[], bool],
    programs: dict[Any, Any],
) -> list[str]:
    """Trains a batch of trials together; returns their statuses."""
    configs = [p.trial.config for p in batch]
    key = (_structure_key(configs[0]), len(batch) if len(batch) > 1 else None)
    names = ", ".join(p.trial.name for p in batch)
    print(f"training {names}", flush=True)
    with contextlib.ExitStack() as held:
        records = []
        for p, config in zip(batch, configs, strict=True):
            record = p.record or RunRecord.create(
                config.runs_dir,
                config.name,
                config.to_dict(),
                {
                    **environment,
                    "execution": describe_execution(
                        config, parallel.backend(), len(dataset.train.labels)
                    ),
                },
                described[_structure_key(config)],
            )
            held.enter_context(record.writer_lock())
            if p.record is not None and p.step < 0:  # died before its first checkpoint
                record.truncate_events(0)
            records.append(record)
        loops: list[Loop] = []
        try:
            with parallel.count_compilations() as compiled:
                clocks = [Clock() for _ in batch]  # a trial's time includes compiling
                trainer, views = _trainers(configs, dataset, programs.get(key))
                programs[key] = trainer.programs
                for p, config, record, view, clock in zip(
                    batch, configs, records, views, clocks, strict=True
                ):
                    progress = TrialProgress(
                        config.name, trainer.total_steps, trainer.steps_per_epoch
                    )
                    loop = Loop(config, dataset, record, view, clock=clock, progress=progress)
                    loops.append(loop)
                    loop.open(environment, resume=p.step >= 0)
                outcomes = drive(trainer, loops, stop)
                for loop, (status, message) in zip(loops, outcomes, strict=True):
                    loop.finish(status, message, compiled)
                return [status for status, _ in outcomes]
        except BaseException as e:
            for loop, record in zip(loops, records, strict=False):
                with contextlib.suppress(Exception):
                    abort(record, loop.writer, e)
            raise
        finally:
            for loop in loops:
                loop.checkpoints.close()


def _trainers(configs: Sequence[Any], dataset: Any, programs: Any) -> tuple[Any, list[Any]]:
    """One trainer for the batch, and what each trial's `Loop` sees as its trainer."""
    if len(configs) == 1:
        trainer = Trainer(configs[0], dataset, programs=programs)
        return trainer, [trainer]
    trainer = Trainer(configs[0], dataset, trials=configs, programs=programs)
    shared = SharedResults(trainer)
    return trainer, [TrialView(shared, i) for i in range(len(configs))]


def drive(trainer: Any, loops: Sequence[Loop], stop: Callable[[], bool]) -> list[tuple]:
    """Trains the batch to its end: after each compiled call every live trial logs, evaluates
    and checkpoints as a run of its own. A trial whose loss turned non-finite ends `failed` and
    stops updating while the others carry on; a stop request checkpoints every live trial."""
    outcomes: list[tuple[str, str | None]] = [("completed", None)] * len(loops)
    live = list(range(len(loops)))
    for loop in loops:
        loop.begin()
    try:
        while live and trainer.step < trainer.total_steps:
            if stop():
                for i in live:
                    outcomes[i] = loops[i].stopped(Stop.interrupted(trainer.step))
                break
            before = trainer.step
            trainer.run(trainer.steps_per_call)
            for i in list(live):
                try:
                    loops[i].after_steps(before)
                except Stop as e:
                    outcomes[i] = loops[i].stopped(e)
                    live.remove(i)
                    if trainer.trials is not None:
                        trainer.deactivate(i)
    finally:
        for loop in loops:
            loop.clock.pause()
    return outcomes


class SharedResults:
    """What a mapped trainer hands back, fetched once per step for all its trials: the first
    trial to ask takes (and resets) the sums of every trial, the others read their row."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self._cache: dict[tuple[str, int], Any] = {}

    def get(self, what: str, make: Callable[[], Any]) -> Any:
        key = (what, self.trainer.step)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[1] == key[1]}
            self._cache[key] = make()
        return self._cache[key]

    def payload(self) -> Any:
        return self.get(
            "payload", lambda: jax.tree.map(np.array, parallel.fetch(self.trainer.payload()))
        )

    def load(self, trial: int, payload: Any, step: int) -> None:
        """Puts one trial's checkpoint into its row of the mapped state."""
        if step != self.trainer.step and self.trainer.step != 0:
            raise ValueError(
                f"trials of one batch resume at one step, not {step} and {self.trainer.step}"
            )
        full = self.payload()
        jax.tree.map(lambda rows, row: rows.__setitem__(trial, np.asarray(row)), full, payload)
        self.trainer.load(full, step)
        self._cache.clear()


class TrialView:
    """Trial `index` of a mapped trainer, as a `Trainer` of its own for its `Loop`."""

    def __init__(self, shared: SharedResults, index: int) -> None:
        self.shared, self.index = shared, index

    def __getattr__(self, name: str) -> Any:  # step, epoch, steps_per_epoch, total_steps, ...
        return getattr(self.shared.trainer, name)

    def _row(self, tree: Any) -> Any:
        return jax.tree.map(lambda x: np.asarray(x[self.index]), tree)

    def take_interval(self) -> steps.TrainSums:
        return self._row(self.shared.get("interval", self.shared.trainer.take_interval))

    def take_epoch(self) -> steps.TrainSums:
        return self._row(self.shared.get("epoch", self.shared.trainer.take_epoch))

    def evaluate(self) -> steps.Evaluation:
        make = lambda: parallel.fetch(self.shared.trainer.evaluate())  # noqa: E731
        return self._row(self.shared.get("evaluate", make))

    def learning_rate(self) -> float:
        return float(self.shared.get("lr", self.shared.trainer.learning_rate)[self.index])

    def payload(self) -> dict[str, Any]:
        return self._row(self.shared.payload())

    def load(self, payload: dict[str, Any], step: int) -> None:
        self.shared.load(self.index, payload, step)


class TrialProgress(Progress):
    """A trial's progress among many: its epoch results and messages, one line each, named."""

    def __init__(self, name: str, total_steps: int, steps_per_epoch: int) -> None:
        super().__init__(total_steps, steps_per_epoch, live=False)
        self.name = name

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if TEST_ACCURACY in metrics:
            super().write(step, metrics)

    def message(self, text: str) -> None:
        super().message(f"{self.name}: {text}")
