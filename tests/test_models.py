"""Models by name: the registry, and each model's description of itself."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mnist_jax import data, models, train
from mnist_jax.config import Config
from mnist_jax.errors import UserError
from mnist_jax.models.cnn import phase_matrix, pooling_phases, stem_matmul

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
    # forward, then the gradients into each layer's weights and input; none into the images
    assert described["train_flops_per_example"] == 3 * 9_287_680 - 451_584
    assert [layer["output_shape"] for layer in described["layers"]] == [
        [28, 28, 32],
        [14, 14, 32],
        [14, 14, 64],
        [7, 7, 64],
        [256],
        [10],
    ]
    assert described["input_shape"] == [28, 28, 1] and described["name"] == "cnn"


@pytest.mark.parametrize(
    "options",
    [{}, {"conv_kernels": (5, 5), "pool": "max"}, {"conv_features": (32, 64, 128)}],
    ids=["classic", "5x5-max", "three-blocks"],
)
def test_a_training_step_costs_what_xla_counts_relative_to_the_forward_pass(options):
    """XLA's cost analysis of the forward pass and of its gradient, as lowered (before any
    backend's rewrites), is the oracle. It counts elementwise work too, so its totals differ
    from ours by a few percent, but where multiply-adds dominate, a step's share of gradient
    work must be the same. The first block is a convolution on every backend (`stem`)."""
    config = Config(**options, stem="conv")
    described = models.describe(config, MNIST)
    graphdef, params = nnx.split(models.create_model(config, MNIST), nnx.Param)

    def loss(params, images):
        return jnp.sum(nnx.merge(graphdef, params)(images, train=False))

    images = jnp.zeros((16, 28, 28, 1))

    def xla_flops(fn):
        cost = jax.jit(fn).lower(params, images).cost_analysis()  # the program as jax wrote it
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    ours = described["train_flops_per_example"] / described["flops_per_example"]
    theirs = xla_flops(jax.grad(loss)) / xla_flops(loss)
    assert ours == pytest.approx(theirs, rel=0.01)
    assert 2.5 < ours < 3


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


def test_kernels_max_pooling_and_valid_padding_are_described_as_computed_by_hand():
    """24/32 channels, a 5x5 then a 3x3 convolution, max pooling, 128 hidden units on paper:
    with "same" padding the sizes are the classic ones; "valid" loses kernel - 1 pixels."""
    config = Config(conv_features=(24, 32), conv_kernels=(5, 3), pool="max", dense_features=128)
    same = models.describe(config, MNIST)
    by_name = {layer["name"]: layer for layer in same["layers"]}
    assert by_name["conv0"]["params"] == 5 * 5 * 1 * 24 + 24
    assert by_name["conv1"]["params"] == 3 * 3 * 24 * 32 + 32
    assert by_name["hidden"]["params"] == 7 * 7 * 32 * 128 + 128
    assert by_name["conv0"]["flops"] == 2 * 28 * 28 * 25 * 1 * 24
    assert by_name["conv1"]["flops"] == 2 * 14 * 14 * 9 * 24 * 32
    assert same["params"] == 624 + 6_944 + 200_832 + 1_290
    assert same["flops_per_example"] == 940_800 + 2_709_504 + 401_408 + 2_560

    valid = models.describe(config.replace(conv_padding="valid"), MNIST)
    assert [layer["output_shape"] for layer in valid["layers"]] == [
        [24, 24, 24],
        [12, 12, 24],
        [10, 10, 32],
        [5, 5, 32],
        [128],
        [10],
    ]
    assert valid["params"] == 624 + 6_944 + (5 * 5 * 32 * 128 + 128) + 1_290
    assert valid["flops_per_example"] == (
        2 * 24 * 24 * 25 * 24 + 2 * 10 * 10 * 9 * 24 * 32 + 2 * 800 * 128 + 2 * 128 * 10
    )
    model = models.create_model(config.replace(conv_padding="valid"), MNIST)
    assert valid["params"] == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def forward(config: Config, images: np.ndarray) -> np.ndarray:
    return np.asarray(models.create_model(config, MNIST)(images, train=False))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)


def test_the_default_options_are_the_classic_model(images):
    """3x3 kernels, average pooling after the ReLU, same padding: the defaults, bit for bit."""
    explicit = Config(conv_kernels=(3, 3), pool="avg", pool_first=False)
    np.testing.assert_array_equal(forward(Config(), images), forward(explicit, images))


def test_each_model_option_changes_the_forward_pass_where_it_should(images):
    small = Config(conv_features=(4, 8), dense_features=16)
    avg_after = forward(small, images)
    max_after = forward(small.replace(pool="max"), images)
    assert not np.allclose(avg_after, max_after)
    # max pooling and ReLU commute (both monotone): pooling first is the same model
    max_before = forward(small.replace(pool="max", pool_first=True), images)
    np.testing.assert_allclose(max_before, max_after, rtol=1e-6, atol=1e-6)
    # the mean of rectified values is not the rectified mean
    avg_before = forward(small.replace(pool_first=True), images)
    assert not np.allclose(avg_before, avg_after)
    assert not np.allclose(forward(small.replace(conv_kernels=(5, 3)), images), avg_after)
    assert not np.allclose(forward(small.replace(conv_padding="valid"), images), avg_after)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"conv_kernels": (5,)}, "conv_kernels has 1 sizes for 2 convolution blocks"),
        ({"conv_kernels": (0, 3)}, r"conv_kernels must be in \[1, 28\], got \[0, 3\]"),
        ({"pool": "sum"}, "unknown pool 'sum'; choose one of: avg, max"),
        ({"conv_padding": "full"}, "unknown conv_padding 'full'; choose one of: same, valid"),
        ({"beta2": 1.0}, r"beta2 must be in \[0, 1\), got 1.0"),
    ],
)
def test_invalid_model_options_are_one_line(changes, message):
    with pytest.raises(UserError, match=message):
        Config(**changes)


def test_valid_padding_that_leaves_no_pixel_is_one_line():
    config = Config(conv_features=(8, 8, 8), conv_kernels=(7, 5, 3), conv_padding="valid")
    with pytest.raises(UserError, match="convolution block 2 .* leaves less than one pixel"):
        models.describe(config, MNIST)


@pytest.mark.parametrize("size", [8, 7])
def test_max_pooling_is_flaxs_max_pool(size):
    """The reshape form gives the same values as `nnx.max_pool`, an odd last row dropped."""
    from mnist_jax.models.cnn import max_pool

    x = np.random.default_rng(1).standard_normal((3, size, size, 5)).astype(np.float32)
    expected = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
    np.testing.assert_array_equal(max_pool(x), expected)


@pytest.mark.parametrize("size", [8, 7])
def test_average_pooling_and_its_gradient_are_flaxs_and_numpys(size):
    """The forward is `nnx.avg_pool`; the hand-written gradient equals JAX's gradient of
    `nnx.avg_pool` and the numpy one: a quarter of each window's, 0 for a dropped odd edge."""
    from mnist_jax.models.cnn import avg_pool

    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, size, size, 5)).astype(np.float32)
    np.testing.assert_array_equal(avg_pool(x), nnx.avg_pool(x, (2, 2), strides=(2, 2)))
    g = rng.standard_normal((3, size // 2, size // 2, 5)).astype(np.float32)
    ours = jax.vjp(avg_pool, x)[1](g)[0]
    flax = jax.vjp(lambda v: nnx.avg_pool(v, (2, 2), strides=(2, 2)), x)[1](g)[0]
    np.testing.assert_allclose(ours, flax, rtol=1e-6, atol=1e-7)
    by_hand = np.zeros_like(x)
    h = size // 2 * 2
    for di in (0, 1):
        for dj in (0, 1):
            by_hand[:, di:h:2, dj:h:2] = g / 4
    np.testing.assert_array_equal(ours, by_hand)


def test_chunks_are_put_back_in_batch_order():
    """Each example comes back where it was, whatever chunk it went through."""
    from mnist_jax.models.cnn import in_chunks

    x = np.arange(24 * 3, dtype=np.float32).reshape(24, 3)
    seen = []

    def per_example(chunk):
        seen.append(np.asarray(chunk[:, 0] // 3, int).tolist())
        return chunk * 2 + 1

    np.testing.assert_array_equal(in_chunks(per_example, x, 6), x * 2 + 1)
    assert len(seen) == 4 and all(len(c) == 6 for c in seen)
    assert sorted(sum(seen, [])) == list(range(24))  # every example in exactly one chunk
    with pytest.raises(ValueError, match="a chunk of 5 does not divide the batch of 24"):
        in_chunks(per_example, x, 5)


def loss_and_grads(model, images, labels, conv_chunk=None):
    """Loss, logits, gradients and the updated batch statistics (if any) of one training
    batch."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return _loss_and_grads(graphdef, params, rest, images, labels, conv_chunk)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _loss_and_grads(graphdef, params, rest, images, labels, conv_chunk):
    def loss(p):
        merged = nnx.merge(graphdef, p, rest, copy=True)
        logits = merged(images, train=True, conv_chunk=conv_chunk)
        logp = jax.nn.log_softmax(logits)
        return -logp[jnp.arange(len(labels)), labels].mean(), (
            logits,
            nnx.state(merged, nnx.BatchStat),
        )

    (value, (logits, stats)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, logits, grads, stats


@pytest.mark.parametrize(
    "config",
    [
        Config(conv_features=(8, 16), dense_features=32),
        Config(
            conv_features=(8, 8),
            conv_kernels=(5, 3),
            conv_padding="valid",
            pool="max",
            pool_first=True,
            dense_features=32,
            norm="layer",
        ),
    ],
    ids=["classic-shape", "fast-shape-layernorm"],
)
def test_convolutions_in_chunks_are_the_same_model_and_gradients(config):
    """Chunking changes how the batch goes through the convolutions, not the function: the
    logits of every example and the gradient of every parameter equal the whole batch's (to
    float32 summation order) and the mean of the per-example gradients."""
    rng = np.random.default_rng(3)
    images = rng.random((32, 28, 28, 1), dtype=np.float32)
    labels = rng.integers(0, 10, 32)
    model = models.create_model(config, MNIST, 0)
    loss_whole, logits_whole, grads_whole, _ = loss_and_grads(model, images, labels, None)
    for chunk in (4, 8, 16):
        loss_c, logits_c, grads_c, _ = loss_and_grads(model, images, labels, chunk)
        np.testing.assert_allclose(logits_c, logits_whole, rtol=1e-5, atol=1e-6)
        assert float(loss_c) == pytest.approx(float(loss_whole), rel=1e-6)
        for got, want in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads_whole), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # the definition, example by example: the mean loss's gradient is the mean of the
    # per-example gradients, each computed alone (a batch of one, nothing to chunk)
    per_example = [
        loss_and_grads(model, images[i : i + 1], labels[i : i + 1], None)[2] for i in range(32)
    ]
    mean = jax.tree.map(lambda *g: np.mean(np.stack(g), axis=0), *per_example)
    for got, want in zip(jax.tree.leaves(grads_c), jax.tree.leaves(mean), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_batch_normalisation_is_never_chunked():
    config = Config(conv_features=(4,), dense_features=8, norm="batch")
    model = models.create_model(config, MNIST, 0)
    images = np.zeros((8, 28, 28, 1), np.float32)
    with pytest.raises(ValueError, match="batch normalisation needs the whole batch"):
        model(images, train=True, conv_chunk=4)


def convolution_by_numpy(x, kernel, bias, padding):
    """A stride-1 convolution as the sum over each window, written out in numpy."""
    k = kernel.shape[0]
    if padding == "same":
        low = (k - 1) // 2
        x = np.pad(x, ((0, 0), (low, k - 1 - low), (low, k - 1 - low), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
    return np.einsum("bhwcij,ijco->bhwo", windows, kernel, optimize=True) + bias


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
def test_pooling_phases_are_every_pooled_pixel_of_the_convolution(kernel, padding):
    """The matrix product over 2x2 blocks gives, at [:, p, q, 2dy + dx], the convolution's
    pixel (2p + dy, 2q + dx), for odd and even kernels and sizes (the odd last row, which
    pooling drops, is not there)."""
    rng = np.random.default_rng(kernel)
    x = rng.random((3, 13, 12, 2), dtype=np.float32)
    w = rng.standard_normal((kernel, kernel, 2, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    want = convolution_by_numpy(x.astype(np.float64), w.astype(np.float64), b, padding)
    got = np.asarray(
        pooling_phases(jnp.asarray(x), phase_matrix(w), jnp.asarray(b), kernel, padding)
    )
    p, q = want.shape[1] // 2, want.shape[2] // 2
    assert got.shape == (3, p, q, 4, 5)
    for dy in (0, 1):
        for dx in (0, 1):
            np.testing.assert_allclose(
                got[:, :, :, 2 * dy + dx], want[:, dy : 2 * p : 2, dx : 2 * q : 2], atol=2e-5
            )


def test_the_stem_is_a_matrix_product_on_the_cpu_with_max_pooling_unless_asked():
    assert stem_matmul("auto", "max", "cpu")
    assert not stem_matmul("auto", "avg", "cpu")
    assert not stem_matmul("auto", "max", "gpu") and not stem_matmul("auto", "max", "tpu")
    assert stem_matmul("matmul", "avg", "gpu") and not stem_matmul("conv", "max", "cpu")


@pytest.mark.parametrize(
    "changes",
    [
        {"conv_features": (8, 16)},
        {"conv_kernels": (5, 3), "conv_padding": "valid", "pool": "max", "pool_first": True},
        {"conv_kernels": (4, 3), "conv_padding": "valid", "pool_first": True, "norm": "layer"},
        {"conv_kernels": (3, 3), "norm": "batch"},
    ],
    ids=["classic-shape", "fast-shape", "even-kernel-layernorm", "batchnorm"],
)
def test_the_matmul_stem_is_the_same_model_and_gradients(changes):
    """The first block as a matrix product computes what the convolution computes: the same
    logits, loss, gradients and batch statistics (to float32 summation order), with average or
    max pooling before or after the ReLU and either normalisation."""
    config = Config(conv_features=(8, 8), dense_features=32).replace(**changes)
    rng = np.random.default_rng(5)
    images = rng.random((16, 28, 28, 1), dtype=np.float32)
    labels = rng.integers(0, 10, 16)
    conv, matmul = (
        loss_and_grads(models.create_model(config.replace(stem=stem), MNIST, 0), images, labels)
        for stem in ("conv", "matmul")
    )
    assert float(matmul[0]) == pytest.approx(float(conv[0]), rel=1e-6)
    np.testing.assert_allclose(matmul[1], conv[1], rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(matmul[2:]), jax.tree.leaves(conv[2:]), strict=True):
        # a convolution bias followed by batch normalisation has a zero gradient: atol
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
