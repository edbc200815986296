"""The frozen training `Config`: defaults < `experiments/*.toml` < command-line flags.

Every hyperparameter lives here and only here. Validation happens once, when a `Config` is
built, and every problem is reported as a one-line `UserError` that names the field.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mnist_jax.data.registry import DATASETS, SOURCES
from mnist_jax.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")
SCHEDULES = ("constant", "cosine", "onecycle")
NORMS = ("none", "batch", "layer")
WANDB_MODES = ("online", "offline", "disabled")
MAX_CONV_BLOCKS = 4  # 28 -> 14 -> 7 -> 3 -> 1 pixels


@dataclasses.dataclass(frozen=True)
class Config:
    """One training run, fully resolved. Field docs double as the CLI's help texts."""

    # data
    dataset: str = "mnist"
    data_dir: str | None = None
    source: str = "auto"
    train_examples: int = 0
    test_examples: int = 0
    # model: the classic conv32-conv64-dense256-dense10 CNN
    conv_features: tuple[int, ...] = (32, 64)
    dense_features: int = 256
    dropout: float = 0.0
    norm: str = "none"
    # optimisation
    optimizer: str = "adam"
    lr: float = 5e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "onecycle"
    warmup_steps: int = -1
    grad_clip: float = 0.0
    label_smoothing: float = 0.0
    batch_size: int = 128
    epochs: int = 3
    seed: int = 0
    # execution
    eval_batch_size: int = 1000
    steps_per_call: int = 0
    log_every: int = 50
    # record keeping
    runs_dir: str = "runs"
    name: str | None = None
    wandb: str | None = None
    wandb_project: str = "mnist-jax"
    wandb_entity: str | None = None
    wandb_tags: tuple[str, ...] = ()
    wandb_group: str | None = None
    wandb_notes: str | None = None

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> Config:
        return build_config(self.to_dict(), changes)


FIELD_HELP = {
    "dataset": f"Dataset: one of {', '.join(DATASETS)}.",
    "data_dir": "Directory with the four IDX files (default: $MNIST_JAX_DATA_DIR, else the cache).",
    "source": f"Where data comes from: one of {', '.join(SOURCES)}.",
    "train_examples": "Train on only the first N training images (0: all of them).",
    "test_examples": "Evaluate on only the first N test images (0: all of them).",
    "conv_features": "Output channels of each 3x3 convolution block, e.g. 32,64.",
    "dense_features": "Width of the hidden dense layer.",
    "dropout": "Dropout rate before the classifier (0 turns it off).",
    "norm": f"Normalisation after each convolution: one of {', '.join(NORMS)}.",
    "optimizer": f"Optimizer: one of {', '.join(OPTIMIZERS)}.",
    "lr": "Learning rate (the peak rate for cosine and onecycle schedules).",
    "momentum": "Momentum for the momentum optimizer (beta1 for adam/adamw).",
    "weight_decay": "Weight decay (decoupled for adamw, L2 added to the gradient otherwise).",
    "schedule": f"Learning-rate schedule: one of {', '.join(SCHEDULES)}.",
    "warmup_steps": "Warmup steps (-1: 10% of training for onecycle, 0 otherwise).",
    "grad_clip": "Clip gradients to this global norm (0 turns it off).",
    "label_smoothing": "Label smoothing for the cross-entropy loss.",
    "batch_size": "Training batch size.",
    "epochs": "Number of passes over the training split.",
    "seed": "Seed for initialisation, shuffling and dropout.",
    "eval_batch_size": "Evaluation batch size (the last batch is padded, never dropped).",
    "steps_per_call": "Training steps per compiled call (0: chosen per backend).",
    "log_every": "Log training metrics every this many steps.",
    "runs_dir": "Directory that holds one sub-directory per run.",
    "name": "Run name (default: a unique timestamped name).",
    "wandb": "Weights & Biases mode: online, offline or disabled (default: see README).",
    "wandb_project": "W&B project.",
    "wandb_entity": "W&B entity (user or team).",
    "wandb_tags": "W&B tags, comma-separated.",
    "wandb_group": "W&B group.",
    "wandb_notes": "W&B notes.",
}


def load_toml(path: str | Path) -> dict[str, Any]:
    """Reads an experiment file; a missing or malformed file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass a file from experiments/")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None


def build_config(*layers: Mapping[str, Any]) -> Config:
    """Merges layers left to right (later wins; None means 'not given') into a `Config`."""
    known = {f.name: f for f in dataclasses.fields(Config)}
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in known:
                raise UserError(
                    f"unknown config key {key!r}; known keys: {', '.join(sorted(known))}"
                )
            if value is not None:
                merged[key] = value
    return Config(**{k: _coerce(known[k], v) for k, v in merged.items()})


def config_from(config_file: str | Path | None, flags: Mapping[str, Any]) -> Config:
    """The CLI's entry point: defaults < `config_file` < flags."""
    file_layer = load_toml(config_file) if config_file else {}
    return build_config(file_layer, flags)


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    name = field.name
    if name in ("conv_features", "wandb_tags"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name} must be a list or comma-separated string, got {value!r}")
        if name == "conv_features":
            try:
                return tuple(int(v) for v in value)
            except (TypeError, ValueError):
                raise UserError(f"conv_features must be integers, got {value!r}") from None
        return tuple(str(v) for v in value)
    default = field.default
    expected = type(default) if default is not None else str
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, expected):
        raise UserError(f"{name} must be {expected.__name__}, got {value!r}")
    return value


def _validate(c: Config) -> None:
    def bad(message: str) -> UserError:
        return UserError(message)

    choices = {
        "dataset": DATASETS,
        "source": SOURCES,
        "optimizer": OPTIMIZERS,
        "schedule": SCHEDULES,
        "norm": NORMS,
    }
    for name, allowed in choices.items():
        value = getattr(c, name)
        if value not in allowed:
            raise bad(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}")
    if c.wandb is not None and c.wandb not in WANDB_MODES:
        raise bad(f"unknown wandb mode {c.wandb!r}; choose one of: {', '.join(WANDB_MODES)}")
    if not (math.isfinite(c.lr) and c.lr > 0):
        raise bad(f"lr must be a positive number, got {c.lr}")
    for name in ("batch_size", "epochs", "eval_batch_size", "dense_features", "log_every"):
        if getattr(c, name) <= 0:
            raise bad(f"{name} must be a positive integer, got {getattr(c, name)}")
    if not c.conv_features or any(f <= 0 for f in c.conv_features):
        raise bad(f"conv_features must be positive integers, got {list(c.conv_features)}")
    if len(c.conv_features) > MAX_CONV_BLOCKS:
        raise bad(
            f"conv_features has {len(c.conv_features)} blocks; each halves the 28x28 image, "
            f"so at most {MAX_CONV_BLOCKS} fit"
        )
    if not 0 <= c.seed < 2**32:
        raise bad(f"seed must be in [0, 2**32), got {c.seed}")
    for name in ("train_examples", "test_examples"):
        if getattr(c, name) < 0:
            raise bad(f"{name} must be 0 (all) or positive, got {getattr(c, name)}")
    if c.steps_per_call < 0:
        raise bad(f"steps_per_call must be 0 (auto) or positive, got {c.steps_per_call}")
    if c.warmup_steps < -1:
        raise bad(f"warmup_steps must be -1 (auto) or >= 0, got {c.warmup_steps}")
    if not 0 <= c.momentum < 1:
        raise bad(f"momentum must be in [0, 1), got {c.momentum}")
    if not 0 <= c.dropout < 1:
        raise bad(f"dropout must be in [0, 1), got {c.dropout}")
    if not 0 <= c.label_smoothing < 1:
        raise bad(f"label_smoothing must be in [0, 1), got {c.label_smoothing}")
    if c.weight_decay < 0 or not math.isfinite(c.weight_decay):
        raise bad(f"weight_decay must be >= 0, got {c.weight_decay}")
    if c.grad_clip < 0 or not math.isfinite(c.grad_clip):
        raise bad(f"grad_clip must be >= 0 (0 turns it off), got {c.grad_clip}")
    if c.name is not None and (not c.name or "/" in c.name or c.name in (".", "..")):
        raise bad(f"name must be a plain directory name, got {c.name!r}")


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
