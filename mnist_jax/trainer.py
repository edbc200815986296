"""`Trainer`: the train state, the data placed on the device, and the compiled calls.

It knows nothing of files, logging or signals: `run(n)` advances training by n steps,
`take_interval()` / `take_epoch()` hand over the training sums kept on the device, and
`evaluate()` runs the whole test split with every metric. Model initialisation, each train chunk
size and evaluation are each compiled once, ahead of time, through `mnist_jax.parallel`, which
keeps them in the compilation cache under a key of what they depend on (`_program_key`), so that
a later run neither traces nor compiles them again; the hyperparameters' values are arguments of
those programs, so a trainer can reuse another's, and several trials can train as one program
mapped over a trial axis.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import checkpoint, parallel, steps
from mnist_jax.config import Config
from mnist_jax.models.cnn import stem_matmul

STEPS_PER_CALL_ACCELERATOR = 50


def steps_per_call(config: Config, backend: str, steps_per_epoch: int) -> int:
    """Training steps per compiled call (never more than an epoch's: a call never runs past
    an epoch's end). Measured: on XLA:CPU one step per call is fastest (a scanned convolution
    gradient is ~25x slower there); on GPU/TPU per-call dispatch dominates, so scan many steps
    per call: 50, or the largest divisor of the epoch from 25 to 50 where there is one, so that
    every call runs a whole chunk and the one-step program is not compiled at all."""
    if config.steps_per_call:
        return min(config.steps_per_call, steps_per_epoch)
    if backend == "cpu":
        return 1
    most = STEPS_PER_CALL_ACCELERATOR
    divisors = [k for k in range(most, most // 2 - 1, -1) if steps_per_epoch % k == 0]
    return divisors[0] if divisors else min(most, steps_per_epoch)


CONV_CHUNK_CPU = 8
CONV_CHUNK_CPU_MATMUL_STEM = 16
MAX_CONV_CHUNKS = 32


def conv_chunk(config: Config, backend: str) -> int | None:
    """Examples per pass through the convolutions in a train step (None: the whole batch).

    Measured on a 2-core CPU: the classic CNN's train step at batch 128 ran ~2x faster in
    chunks of 4 or 8 examples (16: 1.4x), whose activations stay in the caches. With the first
    block as a matrix product (`models.cnn.stem_matmul`), fast.toml's training (batch 64) ran
    as fast in chunks of 16 as of 8 (7,455 and 7,571 examples/s) and compiled 2-3 s faster,
    since each unrolled chunk adds its own patches to the program. With jax 0.12, whose XLA:CPU
    hands convolutions to YNNPACK, chunks of 8 were still the fastest of 4 to 128 (3,168 /
    3,268 / 3,097 / 2,340 / 1,960 examples/s for 4 / 8 / 16 / 32 / 128). On GPU/TPU chunks
    only serialise the work. Batch normalisation needs the whole batch. Auto on CPU: the smallest
    divisor of the batch from 8 (16 with the matrix-product first block) up that keeps the
    unrolled chunks at most 32."""
    batch = config.batch_size
    if config.conv_chunk:
        return config.conv_chunk if config.conv_chunk < batch else None
    if backend != "cpu" or config.norm == "batch":
        return None
    smallest = (
        CONV_CHUNK_CPU_MATMUL_STEM
        if stem_matmul(config.stem, config.pool, backend)
        else CONV_CHUNK_CPU
    )
    for size in range(smallest, batch):
        if batch % size == 0 and batch // size <= MAX_CONV_CHUNKS:
            return size
    return None


def describe_execution(config: Config, backend: str, num_train: int) -> dict[str, Any]:
    """What `backend` makes of `config`'s auto execution fields for `num_train` training
    images, for the run record."""
    return {
        "steps_per_call": steps_per_call(config, backend, num_train // config.batch_size),
        "conv_chunk": conv_chunk(config, backend) or config.batch_size,
        "stem": "matmul" if stem_matmul(config.stem, config.pool, backend) else "conv",
    }


def checkpoint_bytes(config: Config, spec: Any) -> int:
    """The size of one checkpoint of this config's training (state and sums), computed from
    shapes alone."""
    built = steps.build(config, spec, total_steps=1)
    abstract = jax.eval_shape(
        lambda: {"state": built.init(config.seed), "sums": steps.Sums.zeros()}
    )
    return checkpoint.payload_bytes(abstract)


class Programs(NamedTuple):
    """A trainer's compiled programs. They depend on the config's structure and the data's
    shapes, not on `Hyper`'s values: trainers of configs with the same `steps.structure` (a
    sweep's trials, run one after another) share them."""

    init: Any  # (seed) -> state
    permutation: Any  # (seed, epoch) -> the epoch's order
    learning_rate: Any  # (step, lr) -> rate
    # steps per call -> (state, sums, data, order, index, hyper, active); one step's program
    # only where an epoch does not divide into whole chunks, or once a resumed run needs it
    chunks: dict[int, Any]
    evaluate: Any  # (state, test) -> Evaluation


class Trainer:
    """Training on the device: state + placed data + compiled calls.

    One run's, or, with `trials`, several runs' at once: configs of one structure whose values
    (`steps.Hyper`) differ, trained as one program mapped over a leading trial axis of the
    state, the sums and the values. Everything the trainer hands back then has that axis too.
    """

    def __init__(
        self,
        config: Config,
        dataset: Any,
        *,
        trials: Sequence[Config] | None = None,
        programs: Programs | None = None,
    ) -> None:
        self.config = config
        self.trials = None if trials is None else len(trials)
        self.spec = dataset.spec
        self.num_train = len(dataset.train.labels)
        self.steps_per_epoch = self.num_train // config.batch_size
        self.total_steps = self.steps_per_epoch * config.epochs
        backend = parallel.backend()
        self.conv_chunk = conv_chunk(config, backend)
        self.steps = steps.build(config, dataset.spec, self.total_steps, self.conv_chunk)
        self.steps_per_call = steps_per_call(config, backend, self.steps_per_epoch)
        self.step = 0
        t0 = time.perf_counter()
        self.train_images, self.train_labels = parallel.place(
            (dataset.train.images, np.asarray(dataset.train.labels, np.int32))
        )
        test = steps.eval_data(dataset.test.images, dataset.test.labels, config.eval_batch_size)
        # Eval batches split over the devices; the training set replicated, since every batch
        # is gathered from all of it by a permutation.
        test_arrays = parallel.place_batches(tuple(test[:3]), axis=1)
        self.test = steps.EvalData(*test_arrays, test.num_examples)
        # The values are arguments, not constants: one program serves every seed and rate, so a
        # sweep (or a second run with a warm compilation cache) compiles nothing more.
        hyper = steps.Hyper.of(config) if trials is None else steps.Hyper.stack(trials)
        self.hyper = parallel.place(hyper)
        self.active = parallel.place(self._stacked(np.bool_(True)))
        self._key = self._program_key(test.num_examples)
        self.programs = programs or self._compile(test.num_examples)
        self.state = self.programs.init(self.hyper.seed)
        self.sums = parallel.place(self._stacked(steps.Sums.zeros()))
        self._permutation = (0, self.programs.permutation(self.hyper.seed, np.int32(0)))
        self.compile_seconds = time.perf_counter() - t0

    def _stacked(self, tree: Any) -> Any:
        """`tree` (host arrays) as it is for one trial, or repeated along the trial axis."""
        if self.trials is None:
            return tree
        return jax.tree.map(lambda x: np.repeat(np.asarray(x)[None], self.trials, 0), tree)

    def _mapped(self, fn: Any, in_axes: tuple[int | None, ...]) -> Any:
        """`fn`, mapped over the trial axis of the arguments `in_axes` marks, with trials."""
        if self.trials is None:
            return fn
        mapped = jax.vmap(fn, in_axes=in_axes)
        mapped.__name__ = fn.__name__
        return mapped

    def _compile(self, num_test: int) -> Programs:
        rate = self._mapped(self.steps.schedule, (None, 0))
        evaluate = self._mapped(steps.evaluate(self.steps, num_test), (0, None))
        seed, epoch = self.hyper.seed, np.int32(0)
        sizes = {self.steps_per_call}
        if self.steps_per_epoch % self.steps_per_call:
            sizes.add(1)  # the rest of every epoch
        with parallel.compiling_together():  # the largest first: it compiles longest
            chunks = {k: self._compile_chunk(k) for k in sorted(sizes, reverse=True)}
            return Programs(
                evaluate=self._compiled(evaluate, lambda: (self._state_shape, self.test)),
                init=self._compiled(self._init, lambda: (seed,), once=True),
                permutation=self._compiled(self._permute, lambda: (seed, epoch), once=True),
                learning_rate=self._compiled(rate, lambda: (np.int32(0), self.hyper.lr), once=True),
                chunks=chunks,
            )

    @functools.cached_property
    def _init(self) -> Any:
        return self._mapped(self.steps.init, (0,))

    @functools.cached_property
    def _permute(self) -> Any:
        def permutation(seed: jax.Array, epoch: jax.Array) -> jax.Array:
            return steps.epoch_permutation(seed, epoch, self.num_train)

        return self._mapped(permutation, (0, None))

    @functools.cached_property
    def _state_shape(self) -> Any:
        """The train state's shapes; traced only when a program that takes it is not kept."""
        return jax.eval_shape(self._init, self.hyper.seed)

    def _compiled(self, fn: Any, example_args: Any, **options: Any) -> Any:
        return parallel.compile_program(fn, example_args, key=self._key, **options)

    def _compile_chunk(self, k: int) -> Any:
        """The program of k train steps per call."""
        fn = steps.train_chunk(self.steps, k, parallel.shard_batch)
        run = self._mapped(fn, (0, 0, None, None, 0, None, 0))

        def train_chunk(state, sums, images, labels, order, index, hyper, active):
            new = run(state, sums, images, labels, order, index, hyper)
            if self.trials is None:  # a single run stops as a whole instead
                return new
            # A trial no longer active (its loss turned non-finite) keeps its state.
            return jax.tree.map(functools.partial(_where, active), new, (state, sums))

        train_chunk.__name__ = f"train_chunk_{k}"

        def example() -> tuple[Any, ...]:
            order = jax.eval_shape(self._permute, self.hyper.seed, np.int32(0))
            sums = self._stacked(steps.Sums.zeros())
            data = (self.train_images, self.train_labels, order, np.int32(0))
            return (self._state_shape, sums, *data, self.hyper, self.active)

        return self._compiled(train_chunk, example, donate=(0, 1))

    def _program_key(self, num_test: int) -> dict[str, Any]:
        """What this trainer's programs depend on besides the code, the devices and XLA's
        options (`parallel.compile_program` adds those): the config's structure (`Hyper`'s
        values are arguments), the data's shapes and the execution choices."""
        data = (self.train_images, self.train_labels, self.test, self.hyper, self.active)
        return {
            **steps.program_key(self.config, self.spec),
            "num_test": num_test,
            "total_steps": self.total_steps,
            "steps_per_call": self.steps_per_call,
            "conv_chunk": self.conv_chunk,
            "trials": self.trials,
            "data": parallel.signature(data),
        }

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def steps_left_in_epoch(self) -> int:
        return self.steps_per_epoch - self.step % self.steps_per_epoch

    def run(self, num_steps: int) -> int:
        """Trains `num_steps` steps (never past the end of the epoch); returns the new step.

        Whole chunks of `steps_per_call` steps run as one call each, the rest one step a call,
        so that at most two train programs are ever compiled.
        """
        num_steps = min(num_steps, self.steps_left_in_epoch)
        permutation = self._epoch_permutation()
        while num_steps > 0:
            size = self.steps_per_call if num_steps >= self.steps_per_call else 1
            if size not in self.programs.chunks:  # e.g. resumed between two whole chunks
                self.programs.chunks[size] = self._compile_chunk(size)
            index = np.int32(self.step % self.steps_per_epoch)
            self.state, self.sums = self.programs.chunks[size](
                self.state,
                self.sums,
                self.train_images,
                self.train_labels,
                permutation,
                index,
                self.hyper,
                self.active,
            )
            self.step += size
            num_steps -= size
        return self.step

    def take_interval(self) -> steps.TrainSums:
        """The sums since the last call (on the host), and a fresh start for the next interval."""
        interval = parallel.fetch(self.sums.interval)
        zeros = parallel.place(self._stacked(steps.TrainSums.zeros()))
        self.sums = self.sums._replace(interval=zeros)
        return interval

    def take_epoch(self) -> steps.TrainSums:
        """The sums of the epoch just ended (on the host); the next epoch starts from zero."""
        epoch = parallel.fetch(self.sums.epoch)
        self.sums = parallel.place(self._stacked(steps.Sums.zeros()))
        return epoch

    def evaluate(self) -> steps.Evaluation:
        """The whole test split with every metric, in one compiled call (results on device)."""
        return self.programs.evaluate(self.state, self.test)

    def learning_rate(self) -> Any:
        """The learning rate of the next step: a float, or one per trial."""
        rate = parallel.fetch(self.programs.learning_rate(np.int32(self.step), self.hyper.lr))
        return float(rate) if self.trials is None else rate

    def deactivate(self, trial: int) -> None:
        """Trial `trial` stops updating; the others carry on."""
        active = np.array(parallel.fetch(self.active))
        active[trial] = False
        self.active = parallel.place(active)

    def payload(self) -> dict[str, Any]:
        """What a checkpoint holds: the state and the running sums."""
        return {"state": self.state, "sums": self.sums}

    def load(self, payload: dict[str, Any], step: int) -> None:
        """Continues from a checkpoint's payload, taken at `step`."""
        self.state, self.sums = parallel.place((payload["state"], payload["sums"]))
        self.step = step

    def _epoch_permutation(self) -> Any:
        if self._permutation[0] != self.epoch:
            order = self.programs.permutation(self.hyper.seed, np.int32(self.epoch))
            self._permutation = (self.epoch, order)
        return self._permutation[1]


def _where(active_K: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """`new` for the active trials, `old` for the others (arrays with a leading trial axis)."""
    active = active_K.reshape(active_K.shape + (1,) * (new.ndim - 1))
    return jnp.where(active, new, old)
