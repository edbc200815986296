"""The frozen training `Config`: defaults < `experiments/*.toml` < command-line flags.

Every hyperparameter lives here and only here. Validation happens once, when a `Config` is
built, and every problem is reported as a one-line `UserError` that names the field.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import sys
import types
import typing
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
POOLS = ("avg", "max")
PADDINGS = ("same", "valid")
STEMS = ("auto", "conv", "matmul")
WANDB_MODES = ("online", "offline", "disabled")
MAX_CONV_BLOCKS = 4  # 28 -> 14 -> 7 -> 3 -> 1 pixels
MAX_KERNEL = 28  # no larger than the image
MAX_WIDTH = 65_536  # channels or units of one layer: catches typos such as 32,6400000
SWEEP_SECTIONS = {"grid", "zip", "random"}  # what makes a TOML file a sweep spec
# Where this process computes, not what is trained: every start (and every process) gives its
# own, and a resumed run does not inherit them from the saved config.
PLACEMENT_FIELDS = ("devices", "distributed", "coordinator", "num_processes", "process_id")
# Where the data and the record are, and how the run is reported: nothing that is computed.
RECORD_FIELDS = (
    "data_dir", "source", "runs_dir", "name", "wandb", "wandb_project", "wandb_entity",
    "wandb_tags", "wandb_group", "wandb_notes", "tensorboard", "log_every",
)  # fmt: skip


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: tuple[str, ...] = (),
    path: bool = False,
) -> Any:
    """Declares a `Config` field once: its default, its help and how the CLI spells it.

    `flag` is needed only where it is not `--field-name`. With `choices`, the value must be one
    of them (or None where the default is None) and `{choices}` in `help` lists them. A `path`
    field is a str in the config (and its JSON) and a PATH on the command line.
    """
    metadata = {
        "help": help.format(choices=", ".join(choices)),
        "flag": flag,
        "choices": choices,
        "path": path,
    }
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Config:
    """One training run, fully resolved. Each field's help doubles as its CLI help text."""

    # data
    dataset: str = option("mnist", "Dataset: one of {choices}.", choices=DATASETS)
    data_dir: str | None = option(
        None,
        "Directory with the four IDX files (default: $MNIST_JAX_DATA_DIR, else the cache).",
        path=True,
    )
    source: str = option("auto", "Where data comes from: one of {choices}.", choices=SOURCES)
    train_examples: int = option(0, "Train on only the first N training images (0: all of them).")
    test_examples: int = option(0, "Evaluate on only the first N test images (0: all of them).")
    # model: the classic conv32-conv64-dense256-dense10 CNN
    model: str = option("cnn", "Model by name (see mnist_jax.models): cnn, the classic CNN.")
    conv_features: tuple[int, ...] = option(
        (32, 64), "Output channels of each convolution block, e.g. 32,64."
    )
    conv_kernels: tuple[int, ...] = option(
        (), "Kernel size of each convolution block, e.g. 5,3 (default: 3x3 for every block)."
    )
    conv_padding: str = option(
        "same",
        "Convolution padding: one of {choices} (valid shrinks the image by kernel - 1 pixels).",
        choices=PADDINGS,
    )
    pool: str = option(
        "avg", "2x2 pooling after each convolution: one of {choices}.", choices=POOLS
    )
    pool_first: bool = option(
        False, "Pool before the ReLU, not after it (for max pooling the same model, cheaper)."
    )
    dense_features: int = option(256, "Width of the hidden dense layer.")
    dropout: float = option(0.0, "Dropout rate before the classifier (0 turns it off).")
    norm: str = option(
        "none", "Normalisation after each convolution: one of {choices}.", choices=NORMS
    )
    # optimisation
    optimizer: str = option("adam", "Optimizer: one of {choices}.", choices=OPTIMIZERS)
    lr: float = option(5e-3, "Learning rate (the peak rate for cosine and onecycle schedules).")
    momentum: float = option(0.9, "Momentum for the momentum optimizer (beta1 for adam/adamw).")
    beta2: float = option(0.999, "Decay of adam/adamw's second-moment estimate.")
    weight_decay: float = option(
        0.0, "Weight decay (decoupled for adamw, L2 added to the gradient otherwise)."
    )
    schedule: str = option(
        "onecycle", "Learning-rate schedule: one of {choices}.", choices=SCHEDULES
    )
    warmup_steps: int = option(-1, "Warmup steps (-1: 10% of training for onecycle, 0 otherwise).")
    grad_clip: float = option(0.0, "Clip gradients to this global norm (0 turns it off).")
    label_smoothing: float = option(0.0, "Label smoothing for the cross-entropy loss.")
    batch_size: int = option(128, "Training batch size.")
    epochs: int = option(3, "Number of passes over the training split.")
    seed: int = option(0, "Seed for initialisation, shuffling and dropout.")
    # execution
    # 500: on a 2-core CPU, batches of 1,000 made fast.toml's evaluation 1.4x slower (its
    # activations outgrow the caches) and the classic CNN's no faster.
    eval_batch_size: int = option(
        500, "Evaluation batch size (the last batch is padded, never dropped)."
    )
    steps_per_call: int = option(0, "Training steps per compiled call (0: chosen per backend).")
    conv_chunk: int = option(
        0,
        "Examples per pass through the convolutions in a train step, the batch cut into chunks "
        "of this size: the same result, faster on CPU caches (0: chosen per backend: 8 on CPU, "
        "16 with the matmul stem, the whole batch on GPU/TPU and with batch normalisation).",
    )
    stem: str = option(
        "auto",
        "How the first convolution block computes: one of {choices}. conv: a convolution, then "
        "pooling; matmul: one matrix product over 2x2 blocks of pixels gives all four pixels "
        "of each pooling window, the same values (auto: matmul on CPU with max pooling, where "
        "it was faster; conv otherwise).",
        choices=STEMS,
    )
    log_every: int = option(50, "Log training metrics every this many steps.")
    deterministic: bool = option(
        False,
        "Same seed, same bits on every backend (XLA's deterministic GPU ops; slower on GPU).",
    )
    devices: int = option(
        0, "Devices of each process to train on (0: all local devices); each takes a share."
    )
    distributed: bool = option(
        False,
        "Train with several processes (hosts) as one run: jax.distributed, auto-detected on "
        "TPU pods and SLURM, else --coordinator, --num-processes and --process-id.",
    )
    coordinator: str | None = option(
        None, "With --distributed: HOST:PORT of process 0 (default: $MNIST_JAX_COORDINATOR)."
    )
    num_processes: int = option(
        0, "With --distributed: the number of processes (0: $MNIST_JAX_NUM_PROCESSES)."
    )
    process_id: int = option(
        -1, "With --distributed: this process's index, 0 first (-1: $MNIST_JAX_PROCESS_ID)."
    )
    # record keeping
    runs_dir: str = option("runs", "Directory that holds one sub-directory per run.", path=True)
    name: str | None = option(None, "Run name (default: a unique timestamped name).")
    wandb: str | None = option(
        None, "Weights & Biases mode: one of {choices} (default: see README).", choices=WANDB_MODES
    )
    wandb_project: str = option("mnist-jax", "W&B project.", flag="--project")
    wandb_entity: str | None = option(None, "W&B entity (user or team).", flag="--entity")
    wandb_tags: tuple[str, ...] = option((), "W&B tags, comma-separated.", flag="--tags")
    wandb_group: str | None = option(None, "W&B group.", flag="--group")
    wandb_notes: str | None = option(None, "W&B notes.", flag="--notes")
    tensorboard: bool = option(False, "Also write TensorBoard event files (needs tensorboardX).")

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> Config:
        return build_config(self.to_dict(), changes)


def field_help(name: str) -> str:
    """The help text of `Config` field `name`, for commands that take it outside `train`."""
    return _FIELDS[name].metadata["help"]


def field_type(name: str) -> Any:
    """The type of a value given for field `name`: `str` for `str | None`, else as declared."""
    kind = _TYPES[name]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return next(t for t in typing.get_args(kind) if t is not type(None))
    return kind


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = typing.get_type_hints(Config)


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
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None


def build_config(*layers: Mapping[str, Any]) -> Config:
    """Merges layers left to right (later wins; None means 'not given') into a `Config`."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in _FIELDS:
                raise UserError(
                    f"unknown config key {key!r}; known keys: {', '.join(sorted(_FIELDS))}"
                )
            if value is not None:
                merged[key] = value
    return Config(**{k: _coerce(k, v) for k, v in merged.items()})


def config_from(config_file: str | Path | None, flags: Mapping[str, Any]) -> Config:
    """The CLI's entry point: defaults < `config_file` < flags."""
    file_layer = load_toml(config_file) if config_file else {}
    if SWEEP_SECTIONS & set(file_layer):
        raise UserError(
            f"{config_file} is a sweep spec, not a config; run it with `mnist-jax sweep "
            f"{config_file}`"
        )
    return build_config(file_layer, flags)


def _coerce(name: str, value: Any) -> Any:
    expected = field_type(name)
    if typing.get_origin(expected) is tuple:
        return _coerce_items(name, typing.get_args(expected)[0], value)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and isinstance(value, bool):
        return value
    if isinstance(value, bool) or not isinstance(value, expected):
        raise UserError(f"{name} must be {expected.__name__}, got {value!r}")
    return value


_ITEM_NOUNS = {int: "integers", float: "numbers", str: "strings"}


def _coerce_items(name: str, item: type, value: Any) -> tuple[Any, ...]:
    """A tuple field from a TOML list or a comma-separated flag such as `32,64`."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{name} must be a list or comma-separated string, got {value!r}")
    # A number from TOML already has its type: 8.7 or true is no integer (int() would say 8, 1).
    # Strings are parsed below; any item may become a string (a W&B tag of 2 is "2").
    numbers = [v for v in value if not isinstance(v, str)]
    if item is not str and not all(_is_a(item, v) for v in numbers):
        raise UserError(f"{name} must be {_ITEM_NOUNS[item]}, got {value!r}")
    try:
        return tuple(item(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be {_ITEM_NOUNS[item]}, got {value!r}") from None


def _is_a(expected: type, value: Any) -> bool:
    """Whether a parsed value already is an `expected` (an int is a float, a bool no number)."""
    if isinstance(value, bool):
        return expected is bool
    return isinstance(value, expected) or (expected is float and isinstance(value, int))


def _validate(c: Config) -> None:
    def bad(message: str) -> UserError:
        return UserError(message)

    for field in _FIELDS.values():
        allowed, value = field.metadata["choices"], getattr(c, field.name)
        if allowed and value not in allowed and (value is not None or field.default is not None):
            what = "wandb mode" if field.name == "wandb" else field.name
            raise bad(f"unknown {what} {value!r}; choose one of: {', '.join(allowed)}")
    if not (0 < _float32(c.lr) < math.inf):  # nan fails too
        raise bad(f"lr must be a positive number (within float32's range), got {c.lr}")
    for name in ("batch_size", "epochs", "eval_batch_size", "dense_features", "log_every"):
        if getattr(c, name) <= 0:
            raise bad(f"{name} must be a positive integer, got {getattr(c, name)}")
    if not c.conv_features or any(f <= 0 for f in c.conv_features):
        raise bad(f"conv_features must be positive integers, got {list(c.conv_features)}")
    if max(c.conv_features) > MAX_WIDTH or c.dense_features > MAX_WIDTH:
        widths = [*c.conv_features, c.dense_features]
        raise bad(f"layer widths must be at most {MAX_WIDTH:,}, got {widths}")
    if len(c.conv_features) > MAX_CONV_BLOCKS:
        raise bad(
            f"conv_features has {len(c.conv_features)} blocks; each halves the 28x28 image, "
            f"so at most {MAX_CONV_BLOCKS} fit"
        )
    if c.conv_kernels and len(c.conv_kernels) != len(c.conv_features):
        raise bad(
            f"conv_kernels has {len(c.conv_kernels)} sizes for {len(c.conv_features)} "
            "convolution blocks; give one per block"
        )
    if any(not 1 <= k <= MAX_KERNEL for k in c.conv_kernels):
        raise bad(f"conv_kernels must be in [1, {MAX_KERNEL}], got {list(c.conv_kernels)}")
    if not 0 <= c.seed < 2**32:
        raise bad(f"seed must be in [0, 2**32), got {c.seed}")
    for name in ("train_examples", "test_examples"):
        if getattr(c, name) < 0:
            raise bad(f"{name} must be 0 (all) or positive, got {getattr(c, name)}")
    if c.steps_per_call < 0:
        raise bad(f"steps_per_call must be 0 (auto) or positive, got {c.steps_per_call}")
    if c.conv_chunk < 0:
        raise bad(f"conv_chunk must be 0 (auto) or positive, got {c.conv_chunk}")
    if c.conv_chunk and c.conv_chunk < c.batch_size and c.batch_size % c.conv_chunk:
        divisors = [d for d in range(2, min(c.batch_size, 64) + 1) if c.batch_size % d == 0]
        raise bad(
            f"conv_chunk {c.conv_chunk} does not divide batch_size {c.batch_size}; use a divisor "
            f"({', '.join(map(str, divisors[:6])) or c.batch_size}) or 0 (auto)"
        )
    if c.conv_chunk and c.conv_chunk < c.batch_size and c.norm == "batch":
        raise bad(
            "conv_chunk cannot split the batch with norm batch (its statistics are the whole "
            "batch's); use conv_chunk 0 or a layer norm"
        )
    if c.warmup_steps < -1:
        raise bad(f"warmup_steps must be -1 (auto) or >= 0, got {c.warmup_steps}")
    # Training computes in float32: 0.9999999999 is 1.0 there, 1e39 is infinite.
    for name in ("momentum", "beta2", "dropout", "label_smoothing"):
        value = getattr(c, name)
        if not 0 <= value < 1:
            raise bad(f"{name} must be in [0, 1), got {value}")
        if _float32(value) >= 1:
            raise bad(f"{name} {value} is 1.0 in float32, which training uses; at most 0.9999999")
    if c.weight_decay < 0 or not math.isfinite(_float32(c.weight_decay)):
        raise bad(f"weight_decay must be >= 0 (within float32's range), got {c.weight_decay}")
    if c.grad_clip < 0 or not math.isfinite(_float32(c.grad_clip)):
        raise bad(f"grad_clip must be >= 0 (0 turns it off), got {c.grad_clip}")
    _validate_placement(c)
    if c.name is not None and not plain_name(c.name):
        raise bad(f"name must be a plain directory name, got {c.name!r}")


def _float32(value: float) -> float:
    """`value` rounded to float32 (inf beyond its range, nan stays nan), without numpy."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def plain_name(name: Any) -> bool:
    """A directory name that stays inside the runs directory (a run's or a sweep's)."""
    return isinstance(name, str) and name not in ("", ".", "..") and not set(name) & {"/", "\0"}


def _validate_placement(c: Config) -> None:
    if c.devices < 0:
        raise UserError(f"devices must be 0 (all) or positive, got {c.devices}")
    if c.num_processes < 0:
        raise UserError(f"num_processes must be 0 (auto) or positive, got {c.num_processes}")
    if c.process_id < -1:
        raise UserError(f"process_id must be -1 (auto) or >= 0, got {c.process_id}")
    if c.num_processes and c.process_id >= c.num_processes:
        raise UserError(
            f"process_id {c.process_id} is not below num_processes {c.num_processes}; "
            "processes are numbered from 0"
        )
    given = [
        f"--{n.replace('_', '-')}"
        for n in ("coordinator", "num_processes", "process_id")
        if getattr(c, n) != _FIELDS[n].default
    ]
    if given and not c.distributed:
        raise UserError(f"{', '.join(given)} only apply to a multi-process run: add --distributed")
    if c.coordinator is not None:
        host, _, port = c.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"coordinator must be HOST:PORT, got {c.coordinator!r}")


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
