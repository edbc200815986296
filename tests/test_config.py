"""Config: precedence defaults < experiment file < flags, and validation messages."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from mnist_jax.config import Config, build_config, config_from, field_help, field_type
from mnist_jax.errors import UserError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_defaults_are_an_adam_family_recipe_on_the_classic_cnn():
    config = Config()
    assert config.optimizer in ("adam", "adamw")
    assert config.conv_features == (32, 64) and config.dense_features == 256
    assert config.dataset == "mnist" and config.batch_size == 128


def test_flags_override_the_file_which_overrides_defaults(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('optimizer = "sgd"\nlr = 0.2\nepochs = 4\nconv_features = [8, 16]\n')
    config = config_from(path, {"lr": 0.05, "epochs": None})
    assert config.optimizer == "sgd"  # from the file
    assert config.lr == 0.05  # the flag wins
    assert config.epochs == 4  # a flag not given does not override
    assert config.conv_features == (8, 16)
    assert config.batch_size == Config().batch_size  # default


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_experiment_loads(path):
    from mnist_jax.sweep.spec import load_spec

    if path.stem in ("lr_sweep", "seeds"):  # sweep specs: every trial is a valid config
        sweep = load_spec(path, {})
        assert len(sweep.trials) in (8, 16)
        assert all(isinstance(t.config, Config) for t in sweep.trials)
        with pytest.raises(UserError, match="is a sweep spec"):
            config_from(path, {})
    else:
        assert isinstance(config_from(path, {}), Config)


def test_the_baseline_is_the_classic_recipe():
    config = config_from(EXPERIMENTS / "baseline.toml", {})
    assert (config.optimizer, config.lr, config.momentum) == ("momentum", 0.1, 0.9)
    assert (config.batch_size, config.epochs, config.schedule) == (128, 10, "constant")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"lr": float("nan")}, "lr must be a positive number"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'; choose one of: adam"),
        ({"schedule": "step"}, "unknown schedule"),
        ({"dataset": "cifar10"}, "unknown dataset"),
        ({"wandb": "maybe"}, "unknown wandb mode"),
        ({"momentum": 1.5}, "momentum must be in [0, 1)"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"weight_decay": -1e-4}, "weight_decay must be >= 0"),
        ({"conv_features": "32,x"}, "conv_features must be integers"),
        ({"conv_features": [0]}, "conv_features must be positive"),
        ({"conv_features": [8] * 5}, "at most 4 fit"),
        ({"conv_features": [32, 10**20]}, "layer widths must be at most 65,536"),
        ({"dense_features": 10**6}, "layer widths must be at most 65,536"),
        ({"seed": -1}, "seed must be in [0, 2**32)"),
        ({"seed": 10**20}, "seed must be in [0, 2**32)"),
        ({"batch_size": "big"}, "batch_size must be int"),
        ({"name": "a/b"}, "name must be a plain directory name"),
        ({"learning_rate": 0.1}, "unknown config key 'learning_rate'"),
        ({"conv_chunk": -1}, "conv_chunk must be 0 (auto) or positive, got -1"),
        (
            {"conv_chunk": 12},
            "conv_chunk 12 does not divide batch_size 128; use a divisor (2, 4, 8, 16, 32, 64)",
        ),
        ({"conv_chunk": 8, "norm": "batch"}, "conv_chunk cannot split the batch with norm batch"),
        # values that pass in float64 but not in the float32 training computes in
        ({"momentum": 0.9999999999}, "momentum 0.9999999999 is 1.0 in float32"),
        ({"beta2": 0.99999999}, "beta2 0.99999999 is 1.0 in float32"),
        ({"label_smoothing": 0.99999999}, "label_smoothing 0.99999999 is 1.0 in float32"),
        ({"lr": 1e39}, "lr must be a positive number (within float32's range)"),
        ({"lr": 1e-50}, "lr must be a positive number (within float32's range)"),
        ({"weight_decay": 1e39}, "weight_decay must be >= 0 (within float32's range)"),
        # a TOML list's items keep their type: int() would make 8.7 into 8 and true into 1
        ({"conv_features": [8.7, 16.2]}, "conv_features must be integers"),
        ({"conv_kernels": [True, 3]}, "conv_kernels must be integers"),
    ],
)
def test_invalid_values_are_rejected_with_a_clear_message(changes, message):
    with pytest.raises(UserError, match=re.escape(message)) as e:
        build_config(changes)
    assert "\n" not in str(e.value)


def test_a_missing_or_malformed_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        config_from(tmp_path / "nope.toml", {})
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 1\n")
    with pytest.raises(UserError, match="not valid TOML"):
        config_from(bad, {})
    bad.write_bytes("lr = 0.1\n".encode("utf-16"))  # what some Windows editors save
    with pytest.raises(UserError, match="is not UTF-8 text"):
        config_from(bad, {})


def test_values_at_the_edges_of_what_is_valid():
    assert build_config({"momentum": 0.9999999}).momentum == 0.9999999  # < 1 in float32
    assert build_config({"lr": 1e38}).lr == 1e38
    with pytest.raises(UserError, match="conv_features must be integers"):
        build_config({"conv_features": [8.0, 16]})  # as epochs = 1.0 is no integer either
    assert build_config({"conv_features": "8,16"}).conv_features == (8, 16)
    # a chunk as large as the batch or larger is the whole batch, as on an accelerator
    assert build_config({"conv_chunk": 256, "batch_size": 128}).conv_chunk == 256


def test_replace_revalidates():
    with pytest.raises(UserError):
        Config().replace(batch_size=-3)
    assert Config().replace(lr=0.5).lr == 0.5


def test_every_field_has_help_and_choices_are_listed_in_it():
    for field in dataclasses.fields(Config):
        assert field_help(field.name) == field.metadata["help"] and field.metadata["help"]
        for choice in field.metadata["choices"]:
            assert choice in field.metadata["help"], (field.name, choice)
    assert field_help("optimizer") == "Optimizer: one of adam, adamw, sgd, momentum."


def test_field_types_drive_coercion():
    assert (field_type("lr"), field_type("name"), field_type("wandb_tags")) == (
        float,
        str,
        tuple[str, ...],
    )
    config = build_config({"lr": 1, "wandb_tags": ["x", 2], "conv_features": "4,8"})
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.wandb_tags == ("x", "2") and config.conv_features == (4, 8)
    with pytest.raises(UserError, match="name must be str"):
        build_config({"name": 3})


@pytest.mark.parametrize(
    ("changes", "backend", "expected"),
    [
        ({}, "cpu", 8),  # batch 128: 16 chunks of 8
        ({"batch_size": 64}, "cpu", 8),
        ({"batch_size": 100}, "cpu", 10),  # 8 does not divide 100
        ({"batch_size": 1024}, "cpu", 32),  # at most 32 chunks
        ({"batch_size": 127}, "cpu", None),  # prime: no chunk from 8 up divides it
        ({"batch_size": 8}, "cpu", None),  # nothing to cut
        ({"norm": "batch"}, "cpu", None),  # its statistics are the whole batch's
        ({"norm": "layer"}, "cpu", 8),
        ({"pool": "max", "batch_size": 64}, "cpu", 16),  # the first block a matrix product
        ({"pool": "max", "stem": "conv"}, "cpu", 8),
        ({"pool": "max", "batch_size": 64}, "gpu", None),
        ({}, "gpu", None),
        ({}, "tpu", None),
        ({"conv_chunk": 16}, "gpu", 16),  # asked for: done everywhere
        ({"conv_chunk": 128}, "cpu", None),  # the whole batch
    ],
)
def test_the_convolution_chunk_is_chosen_per_backend(changes, backend, expected):
    from mnist_jax.trainer import conv_chunk

    assert conv_chunk(Config(**changes), backend) == expected


@pytest.mark.parametrize(
    ("steps_per_call", "backend", "steps_per_epoch", "expected"),
    [
        (0, "cpu", 234, 1),  # a scanned convolution gradient is slow on XLA:CPU
        (0, "gpu", 234, 39),  # 6 calls an epoch, no step left over
        (0, "tpu", 468, 39),  # 12 calls
        (0, "gpu", 400, 50),  # 50 divides it
        (0, "gpu", 937, 50),  # prime: 18 calls and 37 single steps
        (0, "gpu", 8, 8),  # a short epoch in one call
        (7, "cpu", 234, 7),  # asked for: done everywhere
        (100, "gpu", 8, 8),  # never past an epoch
    ],
)
def test_the_steps_per_call_are_chosen_per_backend(
    steps_per_call, backend, steps_per_epoch, expected
):
    from mnist_jax.trainer import steps_per_call as chosen

    config = Config(steps_per_call=steps_per_call)
    assert chosen(config, backend, steps_per_epoch) == expected
