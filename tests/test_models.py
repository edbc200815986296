"""Models by name: the registry, and each model's description of itself."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from mnist_jax import data, models, train
from mnist_jax.config import Config
from mnist_jax.errors import UserError

MNIST = data.spec("mnist")


def test_the_classic_cnn_describes_itself_as_computed_by_hand():
    """conv32-conv64-dense256-dense10 on 28x28x1: parameters and FLOPs counted on paper."""
    described = models.describe(Config(), MNIST)
    by_name = {layer["name"]: layer for layer in described["layers"]}
    assert by_name["conv0"]["params"] == 3 * 3 * 1 * 32 + 32
    assert by_name["conv1"]["params"] == 3 * 3 * 32 * 64 + 64
    assert by_name["hidden"]["params"] == 7 * 7 * 64 * 256 + 256
    assert by_name["classifier"]["params"] == 256 * 10 + 10
    assert described["params"] == 320 + 18_496 + 803_072 + 2_570
    assert by_name["conv0"]["flops"] == 2 * 28 * 28 * 9 * 1 * 32
    assert by_name["conv1"]["flops"] == 2 * 14 * 14 * 9 * 32 * 64
    assert described["flops_per_example"] == 451_584 + 7_225_344 + 1_605_632 + 5_120
    assert [layer["output_shape"] for layer in described["layers"]] == [
        [28, 28, 32],
        [14, 14, 32],
        [14, 14, 64],
        [7, 7, 64],
        [256],
        [10],
    ]
    assert described["input_shape"] == [28, 28, 1] and described["name"] == "cnn"


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_the_description_counts_what_the_built_model_holds(norm):
    config = Config(conv_features=(4, 8, 16), dense_features=12, norm=norm)
    described = models.describe(config, MNIST)
    model = models.create_model(config, MNIST)
    params = nnx.state(model, nnx.Param)
    assert described["params"] == sum(x.size for x in jax.tree.leaves(params))
    logits = model(np.zeros((2, 28, 28, 1), np.float32), train=False)
    assert list(logits.shape[1:]) == described["layers"][-1]["output_shape"]


def test_an_unknown_model_is_one_line_before_anything_is_written(tmp_path, mnist_dir):
    config = Config(model="transformer", data_dir=str(mnist_dir), runs_dir=str(tmp_path))
    with pytest.raises(UserError, match="unknown model 'transformer'; choose one of: cnn"):
        train.fit(config)
    assert list(Path(tmp_path).iterdir()) == []


def test_the_run_record_holds_the_models_description(tiny_config, tmp_path):
    config = tiny_config(tmp_path / "runs", name="described", epochs=1)
    assert train.fit(config) == 0
    saved = json.loads((tmp_path / "runs" / "described" / "config.json").read_text())
    assert saved["model"] == models.describe(config, MNIST)
    assert saved["model"]["params"] > 0 and saved["config"]["model"] == "cnn"
