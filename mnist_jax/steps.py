"""Train state, optimizer, and the pure train and eval steps.

`train_step(state, batch, rng)` and `eval_step(state, batch, mask)` are pure functions, and so is
everything built from them here: `train_chunk` (K train steps that gather their batches on the
device from the epoch's permutation, so one call carries no host data) and `evaluate` (a whole
padded split: counts, probabilities and every metric). Nothing here compiles or places data:
`mnist_jax.parallel` does. Training metrics are accumulated as sums on the device and divided
once, at log time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mnist_jax import metrics
from mnist_jax.config import PLACEMENT_FIELDS, RECORD_FIELDS, Config
from mnist_jax.models import create_model, preprocess

if TYPE_CHECKING:
    from mnist_jax.data.registry import DatasetSpec

PERMUTATION_STREAM = 1
STEP_STREAM = 2


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State
    model_state: nnx.State  # non-trainable variables (batch statistics)
    opt_state: optax.OptState


class TrainSums(NamedTuple):
    """Running sums over training steps; divided once, when logged."""

    loss_sum: jax.Array
    correct: jax.Array
    count: jax.Array
    first_bad_step: jax.Array  # first step whose loss was not finite, -1 if none

    @staticmethod
    def zeros() -> TrainSums:
        """Host zeros (numpy): placing them compiles nothing, unlike an eager jnp op."""
        return TrainSums(
            np.zeros((), np.float32),
            np.zeros((), np.int32),
            np.zeros((), np.int32),
            np.full((), -1, np.int32),
        )

    def add(self, loss: jax.Array, correct: jax.Array, count: int, step: jax.Array) -> TrainSums:
        bad = ~jnp.isfinite(loss)
        return TrainSums(
            loss_sum=self.loss_sum + loss * count,
            correct=self.correct + correct,
            count=self.count + count,
            first_bad_step=jnp.where((self.first_bad_step < 0) & bad, step, self.first_bad_step),
        )


class Sums(NamedTuple):
    """The sums training keeps on the device: since the epoch began and since the last log
    event. Both are part of a checkpoint, so a resumed run logs exactly what it would have."""

    epoch: TrainSums
    interval: TrainSums

    @staticmethod
    def zeros() -> Sums:
        return Sums(TrainSums.zeros(), TrainSums.zeros())


class EvalSums(NamedTuple):
    """Evaluation counts: additive across batches (and devices)."""

    loss_sum: jax.Array
    count: jax.Array
    confusion: jax.Array  # int32 [C, C]


class Hyper(NamedTuple):
    """The hyperparameters that are arguments of the compiled programs, not constants in them.

    Trials that differ only in these values share one program: a sweep stacks them along a
    trial axis and maps the steps over it, and a run with another seed or learning rate reuses
    the compiled programs of the last one. Whether a term exists at all (clipping, weight decay,
    dropout) is structure, fixed by the config (`structure`).
    """

    lr: Any
    momentum: Any  # momentum (sgd) or beta1 (adam, adamw)
    beta2: Any
    weight_decay: Any
    label_smoothing: Any
    dropout: Any
    grad_clip: Any
    seed: Any  # uint32

    @staticmethod
    def of(config: Config) -> Hyper:
        """`config`'s values as host scalars (float32; the seed uint32)."""
        values = {name: np.float32(getattr(config, name)) for name in Hyper._fields[:-1]}
        return Hyper(**values, seed=np.uint32(config.seed))

    @staticmethod
    def stack(configs: Sequence[Config]) -> Hyper:
        """The values of several configs along a leading trial axis."""
        return jax.tree.map(lambda *xs: np.stack(xs), *(Hyper.of(c) for c in configs))


def structure(config: Config) -> dict[str, Any]:
    """What the compiled programs of `config` depend on besides `Hyper`'s values: configs with
    equal structures train as one program. A value field keeps only whether its term exists."""
    shape = {k: v for k, v in config.to_dict().items() if k not in Hyper._fields}
    shape.update(
        grad_clip=config.grad_clip > 0,
        weight_decay=config.weight_decay > 0 and config.optimizer != "adamw",
        dropout=config.dropout > 0,
    )
    return shape


def program_key(config: Config, spec: DatasetSpec) -> dict[str, Any]:
    """The part of a `parallel.compile_program` key that every program of `config` on `spec`
    shares: the config's structure without the fields that say where the data and the record
    are and where the run is placed, which compute nothing."""
    skipped = (*RECORD_FIELDS, *PLACEMENT_FIELDS)
    kept = {k: v for k, v in structure(config).items() if k not in skipped}
    return {"structure": kept, "spec": repr(spec)}


def warmup_steps(config: Config, total_steps: int) -> int:
    if config.warmup_steps >= 0:
        return min(config.warmup_steps, total_steps)
    return total_steps // 10 if config.schedule == "onecycle" else 0


def make_schedule(config: Config, total_steps: int) -> Callable[[Any, Any], Any]:
    """The learning rate as a function of (step, lr): `lr` is the peak for cosine and onecycle,
    and the schedule's shape (a function of the step alone) is scaled by it."""
    warmup = warmup_steps(config, total_steps)
    # The decay needs a step of its own after the warmup; where the warmup takes the whole run
    # (or a one-step build, as for a checkpoint's size), the run ends before the peak.
    total = max(total_steps, warmup + 1)
    if config.schedule == "onecycle":
        shape = optax.warmup_cosine_decay_schedule(
            init_value=1 / 25,
            peak_value=1.0,
            warmup_steps=warmup,
            decay_steps=total,
            end_value=1 / 25e4,
        )
    elif config.schedule == "cosine":
        shape = optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=1.0, warmup_steps=warmup, decay_steps=total
        )
    elif warmup:
        shape = optax.linear_schedule(0.0, 1.0, warmup)
    else:
        shape = optax.constant_schedule(1.0)

    def schedule(step: Any, lr: Any) -> Any:
        return lr * shape(step)

    return schedule


def make_optimizer(
    config: Config, schedule: Callable[[Any, Any], Any], hyper: Hyper
) -> optax.GradientTransformation:
    """optax chain: optional clipping, L2 weight decay (decoupled for adamw), the optimizer.

    Built inside the step from `hyper`'s (traced) values: the optimizer state's structure
    depends only on the config, so `init` may use any values.
    """
    parts = []

    def lr(count: Any) -> Any:
        return schedule(count, hyper.lr)

    if config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(hyper.grad_clip))
    if config.optimizer == "adamw":
        parts.append(
            optax.adamw(lr, b1=hyper.momentum, b2=hyper.beta2, weight_decay=hyper.weight_decay)
        )
        return optax.chain(*parts)
    if config.weight_decay > 0:
        parts.append(optax.add_decayed_weights(hyper.weight_decay))
    if config.optimizer == "adam":
        parts.append(optax.adam(lr, b1=hyper.momentum, b2=hyper.beta2))
    elif config.optimizer == "momentum":
        parts.append(optax.sgd(lr, momentum=hyper.momentum))
    else:
        parts.append(optax.sgd(lr))
    return optax.chain(*parts)


class Steps(NamedTuple):
    """The pure functions of one config: built once, compiled by `mnist_jax.parallel`.

    Each takes the values of `Hyper` as an argument where it needs them; `None` means the
    config's own (constants, for a quick eager or jitted call)."""

    config: Config
    spec: DatasetSpec
    schedule: Callable[[Any, Any], Any]  # (step, lr) -> the learning rate
    init: Callable[[Any], TrainState]  # the initial state, as a function of the seed
    train_step: Callable[..., Any]  # (state, batch, rng, hyper=None) -> (state, outputs)
    eval_step: Callable[..., Any]  # (state, batch, mask) -> (EvalSums, probabilities)

    @property
    def init_state(self) -> TrainState:
        """The initial state for the config's seed, computed eagerly (the trainer compiles
        `init` instead)."""
        return self.init(self.config.seed)

    @property
    def hyper(self) -> Hyper:
        return Hyper.of(self.config)


def build(
    config: Config, spec: DatasetSpec, total_steps: int, conv_chunk: int | None = None
) -> Steps:
    """Model, optimizer, initial state and the pure step functions for `config` on `spec`.
    `conv_chunk`: the train step runs the convolutions over chunks of that many examples (the
    trainer's choice per backend, `trainer.conv_chunk`); None: over the whole batch."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: create_model(config, spec)))
    schedule = make_schedule(config, total_steps)
    num_classes = spec.num_classes

    def init(seed: Any) -> TrainState:
        _, params, model_state = nnx.split(create_model(config, spec, seed), nnx.Param, ...)
        opt_state = make_optimizer(config, schedule, Hyper.of(config)).init(params)
        return TrainState(jnp.zeros((), jnp.int32), params, model_state, opt_state)

    def forward(params, model_state, images_BxHxW, *, train, dropout_key=None, dropout=None):
        module = nnx.merge(graphdef, params, model_state, copy=True)
        inputs = preprocess(images_BxHxW, spec)
        logits_BxC = module(
            inputs,
            train=train,
            dropout_key=dropout_key,
            dropout_rate=dropout,
            conv_chunk=conv_chunk if train else None,
        )
        _, _, new_model_state = nnx.split(module, nnx.Param, ...)
        return logits_BxC, new_model_state

    def train_step(state: TrainState, batch, rng: jax.Array, hyper: Hyper | None = None):
        hyper = Hyper.of(config) if hyper is None else hyper
        images_BxHxW, labels_B = batch

        def loss_fn(params):
            logits_BxC, new_model_state = forward(
                params,
                state.model_state,
                images_BxHxW,
                train=True,
                dropout_key=rng,
                dropout=hyper.dropout,
            )
            targets_BxC = optax.smooth_labels(
                jax.nn.one_hot(labels_B, num_classes), hyper.label_smoothing
            )
            loss = optax.softmax_cross_entropy(logits_BxC, targets_BxC).mean()
            return loss, (logits_BxC, new_model_state)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits_BxC, new_model_state)), grads = grad_fn(state.params)
        optimizer = make_optimizer(config, schedule, hyper)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = jnp.sum(jnp.argmax(logits_BxC, -1) == labels_B)
        new_state = TrainState(state.step + 1, params, new_model_state, opt_state)
        return new_state, {"loss": loss, "correct": correct}

    def eval_step(state: TrainState, batch, mask_B: jax.Array):
        images_BxHxW, labels_B = batch
        logits_BxC, _ = forward(state.params, state.model_state, images_BxHxW, train=False)
        losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)
        sums = EvalSums(
            loss_sum=jnp.sum(jnp.where(mask_B, losses_B, 0.0)),
            count=jnp.sum(mask_B, dtype=jnp.int32),
            confusion=metrics.confusion_matrix(
                labels_B, jnp.argmax(logits_BxC, -1), num_classes, mask_B
            ),
        )
        return sums, jax.nn.softmax(logits_BxC)

    return Steps(config, spec, schedule, init, train_step, eval_step)


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> jax.Array:
    """The order of epoch `epoch`: a function of (seed, epoch) only, so a resumed run replays it."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), PERMUTATION_STREAM), epoch)
    return jax.random.permutation(key, num_examples).astype(jnp.int32)


def step_key(seed: int, step: jax.Array) -> jax.Array:
    """Per-step randomness (dropout) from (seed, step)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), STEP_STREAM), step)


def train_chunk(
    steps: Steps, steps_per_call: int, shard_batch: Callable[[Any], Any] = lambda batch: batch
) -> Callable[..., tuple[TrainState, Sums]]:
    """K train steps as one function, batches gathered on the device.

    Arguments: (state, sums, images_NxHxW, labels_N, permutation_N, first_index, hyper=None);
    compile it with the state and sums donated. K = 1 runs at top level; K > 1 runs under
    `lax.scan` (on XLA:CPU a scanned convolution gradient is much slower, on GPU/TPU the
    per-call dispatch is what costs). `shard_batch` lays out each gathered batch
    (`parallel.shard_batch` splits it over the devices).
    """
    batch_size = steps.config.batch_size

    def chunk(state, sums, images_NxHxW, labels_N, permutation_N, first_index, hyper=None):
        hyper = steps.hyper if hyper is None else hyper

        def one(carry, index):
            state, sums = carry
            rows_B = jax.lax.dynamic_slice_in_dim(permutation_N, index * batch_size, batch_size)
            batch = shard_batch((images_NxHxW[rows_B], labels_N[rows_B]))
            rng = step_key(hyper.seed, state.step)
            state_next, out = steps.train_step(state, batch, rng, hyper)
            added = (out["loss"], out["correct"], batch_size, state_next.step)
            return (state_next, Sums(sums.epoch.add(*added), sums.interval.add(*added))), None

        if steps_per_call == 1:
            (state, sums), _ = one((state, sums), first_index)
        else:
            indices = first_index + jnp.arange(steps_per_call, dtype=jnp.int32)
            (state, sums), _ = jax.lax.scan(one, (state, sums), indices)
        return state, sums

    chunk.__name__ = f"train_chunk_{steps_per_call}"
    return chunk


class EvalData(NamedTuple):
    """A split padded to whole eval batches: no image is dropped."""

    images_KxBxHxW: jax.Array
    labels_KxB: jax.Array
    mask_KxB: jax.Array
    num_examples: int


def eval_data(images_NxHxW: Any, labels_N: Any, batch_size: int) -> EvalData:
    """Pads to a multiple of `batch_size`, the padding masked out (host arrays in, host out)."""
    n = len(labels_N)
    batch_size = max(1, min(batch_size, n))  # never pad a small split up to a large batch
    batches = -(-n // batch_size)
    pad = batches * batch_size - n
    images = np.asarray(images_NxHxW)
    images = np.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1))
    labels = np.pad(np.asarray(labels_N, np.int32), (0, pad))
    mask = np.arange(batches * batch_size) < n
    shape = (batches, batch_size)
    return EvalData(
        images.reshape(shape + images.shape[1:]), labels.reshape(shape), mask.reshape(shape), n
    )


class Evaluation(NamedTuple):
    sums: EvalSums
    probs_NxC: jax.Array
    summary: dict[str, jax.Array]  # metrics.classification_summary of the split
    curves: metrics.OneVsRestCurves  # every class's ROC and PR curves, whose areas it holds


def evaluate(steps: Steps, num_examples: int) -> Callable[[TrainState, EvalData], Evaluation]:
    """Evaluation of a whole padded split of `num_examples` images as one function: counts
    summed over the batches, probabilities stacked, every class's ROC and PR curves (one sort
    per class), and every metric from the counts and the curves' areas."""
    c = steps.spec.num_classes

    def one(state, total, batch):
        images_BxHxW, labels_B, mask_B = batch
        sums, probs_BxC = steps.eval_step(state, (images_BxHxW, labels_B), mask_B)
        return jax.tree.map(jnp.add, total, sums), probs_BxC

    def run(state: TrainState, data: EvalData) -> Evaluation:
        zeros = EvalSums(
            jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((c, c), jnp.int32)
        )
        batches = (data.images_KxBxHxW, data.labels_KxB, data.mask_KxB)
        sums, probs_KxBxC = jax.lax.scan(functools.partial(one, state), zeros, batches)
        probs_NxC = probs_KxBxC.reshape(-1, c)[:num_examples]
        labels_N = data.labels_KxB.reshape(-1)[:num_examples]
        curves = metrics.one_vs_rest_curves(probs_NxC, labels_N)
        summary = metrics.classification_summary(sums.confusion, curves=curves)
        return Evaluation(sums, probs_NxC, summary, curves)

    run.__name__ = "evaluate"
    return run
