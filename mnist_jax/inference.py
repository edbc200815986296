"""Using a trained run: `evaluate` a split from its best checkpoint, `predict` image files.

Both rebuild the model from the run's `config.json` and restore `checkpoints/best` (falling
back to `checkpoints/last` for a run that never finished an epoch's evaluation). Their programs
are kept in the compilation cache like training's (`parallel.compile_program`): a second
`evaluate` of a run of the same structure neither traces nor compiles, and `predict` pads its
images to a few batch sizes so that it reuses its programs too.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mnist_jax import data as data_lib
from mnist_jax import images as images_lib
from mnist_jax import metrics, parallel, steps
from mnist_jax.checkpoint import Checkpoints
from mnist_jax.config import build_config
from mnist_jax.errors import UserError, describe
from mnist_jax.files import write_json_atomic
from mnist_jax.record import RunRecord

EVAL_FILE = "eval.json"
BLANK_NOTE = "the image is blank (no ink): this label means nothing"
# `predict` pads its images to the next of these batch sizes (then to multiples of the last).
PREDICT_BATCHES = (8, 64, 512)


@dataclasses.dataclass(frozen=True)
class Restored:
    config: Any
    built: steps.Steps
    state: steps.TrainState
    step: int
    kind: str
    class_names: tuple[str, ...]


def restore_run(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> Restored:
    """The run's model with the weights of its best (else last) checkpoint; reads only."""
    record = RunRecord.open(run_dir)
    config = build_config(record.read_config()["config"], overrides or {})
    spec = data_lib.spec(config.dataset)
    class_names = spec.class_names
    parallel.use_compilation_cache()
    built = steps.build(config, spec, total_steps=1)
    template = {"state": _state_shapes(built, config.seed), "sums": steps.Sums.zeros()}
    problems = []
    if record.checkpoints_dir.is_dir():
        checkpoints = Checkpoints(record.checkpoints_dir, read_only=True)
        try:
            for kind in ("best", "last"):
                step = checkpoints.latest_step(kind)
                if step is None:
                    continue
                try:
                    payload, _ = checkpoints.restore(kind, template, step)
                except Exception as e:  # damaged, or saved for another model shape
                    problems.append(f"{kind}/{step}: {describe(e)}")
                    continue
                if problems:
                    warnings.warn(
                        f"checkpoint {problems[0]} could not be restored; using {kind}/{step} "
                        "instead",
                        stacklevel=2,
                    )
                return Restored(config, built, payload["state"], step, kind, class_names)
        finally:
            checkpoints.close()
    if problems:
        raise UserError(
            f"run {run_dir}: no checkpoint could be restored ({'; '.join(problems)}); "
            "it is damaged or does not match config.json"
        )
    raise UserError(f"run {run_dir} has no checkpoint yet; train it (or --resume it) first")


def _state_shapes(built: steps.Steps, seed: int) -> steps.TrainState:
    """The train state's shapes and types on the default device, to restore into: nothing is
    initialised or compiled for weights that the checkpoint replaces."""
    device = parallel.default_device()
    shapes = jax.eval_shape(built.init, np.uint32(seed))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)


def _program_key(restored: Restored, args: Any) -> dict[str, Any]:
    key = steps.program_key(restored.config, restored.built.spec)
    return {**key, "data": parallel.signature(args)}


def evaluate_run(
    run_dir: str | Path, split: str = "test", data_dir: str | None = None
) -> dict[str, Any]:
    """Evaluates the restored model on every image of `split`; writes and returns eval.json."""
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; choose train or test")
    restored = restore_run(run_dir, {"data_dir": data_dir} if data_dir else None)
    config = restored.config
    dataset = data_lib.load_dataset(config.dataset, config.data_dir, config.source)
    limit = config.train_examples if split == "train" else config.test_examples
    part = getattr(dataset, split)
    if limit:
        part = data_lib.Split(part.images[:limit], part.labels[:limit])
    batches = steps.eval_data(part.images, part.labels, config.eval_batch_size)
    args = (restored.state, batches)
    evaluate = parallel.compile_program(
        steps.evaluate(restored.built, batches.num_examples),
        lambda: args,
        key={**_program_key(restored, args), "num_examples": batches.num_examples},
    )
    evaluation = parallel.fetch(evaluate(*args))
    sums, summary = evaluation.sums, evaluation.summary
    loss = float(sums.loss_sum) / int(sums.count)
    result = {
        "checkpoint": restored.kind,
        "step": restored.step,
        **metrics.to_record(split, summary, sums.confusion, loss),
    }
    write_json_atomic(Path(run_dir) / EVAL_FILE, result)
    return result


@dataclasses.dataclass(frozen=True)
class Prediction:
    path: str
    label: str | None = None
    top: tuple[tuple[str, float], ...] = ()
    error: str | None = None
    note: str | None = None  # e.g. a blank image: the label is a guess about nothing


def predict_files(
    run_dir: str | Path, paths: Sequence[str | Path], *, invert: bool = False, top_k: int = 3
) -> list[Prediction]:
    """Classifies image files; a file that cannot be read gets an error, the others go on."""
    restored = restore_run(run_dir)
    loaded, results = [], []
    for path in paths:
        try:
            size = restored.built.spec.height
            loaded.append((str(path), images_lib.load_digit(path, invert=invert, size=size)))
        except UserError as e:
            results.append(Prediction(str(path), error=str(e)))
    if loaded:
        probs_NxC = _probabilities(restored, np.stack([image for _, image in loaded]))
        names = restored.class_names
        for (path, image), probs in zip(loaded, probs_NxC, strict=True):
            order = np.argsort(-probs)[:top_k]
            top = tuple((names[i], float(probs[i])) for i in order)
            note = None if images_lib.has_ink(image) else BLANK_NOTE
            results.append(Prediction(path, names[order[0]], top, note=note))
    by_path = {str(p): i for i, p in enumerate(paths)}
    return sorted(results, key=lambda r: by_path[r.path])


def _probabilities(restored: Restored, images_NxHxW: np.ndarray) -> np.ndarray:
    """The model's class probabilities for the images, padded to a `predict_batch` (the
    padding masked out) so that few distinct programs are ever compiled."""
    n = len(images_NxHxW)
    size = predict_batch(n)
    images = np.zeros((size, *images_NxHxW.shape[1:]), images_NxHxW.dtype)
    images[:n] = images_NxHxW
    args = (restored.state, (images, np.zeros(size, np.int32)), np.arange(size) < n)
    eval_step = parallel.compile_program(
        restored.built.eval_step, lambda: args, key=_program_key(restored, args)
    )
    _, probs_NxC = parallel.fetch(eval_step(*args))
    return probs_NxC[:n]


def predict_batch(n: int) -> int:
    """The batch `n` images are padded to: the first of `PREDICT_BATCHES` that holds them,
    else a multiple of the last."""
    for size in PREDICT_BATCHES:
        if n <= size:
            return size
    last = PREDICT_BATCHES[-1]
    return -(-n // last) * last
