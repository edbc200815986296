"""`Trainer`: the train state, the data placed on the device, and the compiled calls.

It knows nothing of files, logging or signals: `run(n)` advances training by n steps,
`take_interval()` / `take_epoch()` hand over the training sums kept on the device, and
`evaluate()` runs the whole test split with every metric. Model initialisation, each train chunk
size and evaluation are each compiled once, ahead of time, through `mnist_jax.parallel`.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import numpy as np

from mnist_jax import checkpoint, parallel, steps
from mnist_jax.config import Config


def default_steps_per_call(backend: str) -> int:
    """Measured: on XLA:CPU one step per call is fastest (a scanned convolution gradient is
    ~25x slower there); on GPU/TPU per-call dispatch dominates, so scan many steps per call."""
    return 1 if backend == "cpu" else 50


def checkpoint_bytes(config: Config, spec: Any) -> int:
    """The size of one checkpoint of this config's training (state and sums), computed from
    shapes alone."""
    built = steps.build(config, spec, total_steps=1)
    abstract = jax.eval_shape(
        lambda: {"state": built.init(config.seed), "sums": steps.Sums.zeros()}
    )
    return checkpoint.payload_bytes(abstract)


class Trainer:
    """One run's training on the device: state + placed data + compiled calls."""

    def __init__(self, config: Config, dataset: Any) -> None:
        self.config = config
        self.num_train = len(dataset.train.labels)
        self.steps_per_epoch = self.num_train // config.batch_size
        self.total_steps = self.steps_per_epoch * config.epochs
        self.steps = steps.build(config, dataset.spec, self.total_steps)
        k = config.steps_per_call or default_steps_per_call(parallel.backend())
        self.steps_per_call = min(k, self.steps_per_epoch)
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
        # The seed is an argument, not a constant: one program serves every seed, so a seed
        # sweep with a warm compilation cache compiles nothing.
        seed = np.uint32(config.seed)
        self.state = parallel.compile(self.steps.init, seed)(seed)
        self.sums = parallel.place(steps.Sums.zeros())

        def permutation(seed: jax.Array, epoch: jax.Array) -> jax.Array:
            return steps.epoch_permutation(seed, epoch, self.num_train)

        self._permute = functools.partial(parallel.compile(permutation, seed, np.int32(0)), seed)
        self._learning_rate = parallel.compile(self.steps.schedule, np.int32(0))
        self._permutation = (0, self._permute(np.int32(0)))
        example = (self.state, self.sums, self.train_images, self.train_labels)
        example += (self._permutation[1], np.int32(0))
        sizes = {self.steps_per_call, 1}
        self._chunks = {
            k: parallel.compile(
                steps.train_chunk(self.steps, k, parallel.shard_batch), *example, donate=(0, 1)
            )
            for k in sizes
        }
        self._evaluate = parallel.compile(
            steps.evaluate(self.steps, test.num_examples), self.state, self.test
        )
        self.compile_seconds = time.perf_counter() - t0

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def steps_left_in_epoch(self) -> int:
        return self.steps_per_epoch - self.step % self.steps_per_epoch

    def run(self, num_steps: int) -> int:
        """Trains `num_steps` steps (never past the end of the epoch); returns the new step.

        Whole chunks of `steps_per_call` steps run as one call each, the rest one step a call,
        so that only two programs are ever compiled.
        """
        num_steps = min(num_steps, self.steps_left_in_epoch)
        permutation = self._epoch_permutation()
        while num_steps > 0:
            size = self.steps_per_call if num_steps >= self.steps_per_call else 1
            index = np.int32(self.step % self.steps_per_epoch)
            self.state, self.sums = self._chunks[size](
                self.state, self.sums, self.train_images, self.train_labels, permutation, index
            )
            self.step += size
            num_steps -= size
        return self.step

    def take_interval(self) -> steps.TrainSums:
        """The sums since the last call (on the host), and a fresh start for the next interval."""
        interval = parallel.fetch(self.sums.interval)
        self.sums = self.sums._replace(interval=parallel.place(steps.TrainSums.zeros()))
        return interval

    def take_epoch(self) -> steps.TrainSums:
        """The sums of the epoch just ended (on the host); the next epoch starts from zero."""
        epoch = parallel.fetch(self.sums.epoch)
        self.sums = parallel.place(steps.Sums.zeros())
        return epoch

    def evaluate(self) -> steps.Evaluation:
        """The whole test split with every metric, in one compiled call (results on device)."""
        return self._evaluate(self.state, self.test)

    def learning_rate(self) -> float:
        return float(self._learning_rate(np.int32(self.step)))

    def payload(self) -> dict[str, Any]:
        """What a checkpoint holds: the state and the running sums."""
        return {"state": self.state, "sums": self.sums}

    def load(self, payload: dict[str, Any], step: int) -> None:
        """Continues from a checkpoint's payload, taken at `step`."""
        self.state, self.sums = parallel.place((payload["state"], payload["sums"]))
        self.step = step

    def _epoch_permutation(self) -> Any:
        if self._permutation[0] != self.epoch:
            self._permutation = (self.epoch, self._permute(np.int32(self.epoch)))
        return self._permutation[1]
