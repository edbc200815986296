"""`cnn`: the classic CNN of the Flax MNIST example, sized by `Config`.

The default is conv32-conv64-dense256-dense10: each convolution block is a 3x3 convolution,
optional normalisation, ReLU and 2x2 average pooling. `Config` also chooses each block's kernel
size, max or average pooling, and whether pooling comes before the activation (with max pooling
the two commute, and pooling first runs the ReLU on a quarter of the pixels). Dropout takes an
explicit key so that the train step stays a pure function of `(state, batch, rng)`.

`conv_chunk` runs the convolution blocks over a training batch in chunks of that many examples
(the dense layers and the loss still see the whole batch): the same function, but each chunk's
activations and their gradients stay in the CPU's caches. On a 2-core CPU it made the classic
CNN's train step ~2x faster (batch 128, chunks of 4-8); on a GPU it would only serialise work,
so the trainer chooses it per backend (`mnist_jax.trainer.conv_chunk`).

`Config.stem` chooses how the first block computes: as a convolution, or as `pooling_phases`,
one matrix product that gives the four pixels of every pooling window at once (the same
function; on the CPU, where a convolution of one input channel is slow, auto picks it for max
pooling: `stem_matmul`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from mnist_jax.config import Config
from mnist_jax.errors import UserError

if TYPE_CHECKING:
    from mnist_jax.data.registry import DatasetSpec

DEFAULT_KERNEL = 3
POOL = 2


class CNN(nnx.Module):
    """Convolution blocks, one hidden dense layer, and a linear classifier."""

    def __init__(self, spec: DatasetSpec, config: Config, *, rngs: nnx.Rngs) -> None:
        self.dropout = config.dropout
        self.pool = config.pool
        self.pool_first = config.pool_first
        self.padding = config.conv_padding
        self.stem = config.stem
        self.kernels = kernel_sizes(config)
        convs, norms = [], []
        in_features = spec.channels
        for features, size in zip(config.conv_features, self.kernels, strict=True):
            convs.append(
                nnx.Conv(
                    in_features,
                    features,
                    kernel_size=(size, size),
                    padding=self.padding.upper(),
                    rngs=rngs,
                )
            )
            norms.append(_make_norm(config.norm, features, rngs))
            in_features = features
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        height, width = block_sizes(spec, self.kernels, self.padding)[-1][1]
        self.hidden = nnx.Linear(height * width * in_features, config.dense_features, rngs=rngs)
        self.classifier = nnx.Linear(config.dense_features, spec.num_classes, rngs=rngs)

    def __call__(
        self,
        images_BxHxWxC: jax.Array,
        *,
        train: bool,
        dropout_key: jax.Array | None = None,
        dropout_rate: Any = None,
        conv_chunk: int | None = None,
    ) -> jax.Array:
        stem = None
        if stem_matmul(self.stem, self.pool, jax.default_backend()):
            # built once, outside the chunks: one matrix and one gradient into the kernel
            stem = phase_matrix(self.convs[0].kernel[...]), self.convs[0].bias[...]

        def features(x: jax.Array) -> jax.Array:
            for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
                if i == 0 and stem is not None:
                    x = pooling_phases(x, *stem, self.kernels[0], self.padding)
                    pool = self._pool_phases
                else:
                    x, pool = conv(x), self._pool
                if isinstance(norm, nnx.BatchNorm):
                    x = norm(x, use_running_average=not train)
                elif norm is not None:
                    x = norm(x)
                x = nnx.relu(pool(x)) if self.pool_first else pool(nnx.relu(x))
            return x.reshape(x.shape[0], -1)

        if conv_chunk and conv_chunk < images_BxHxWxC.shape[0]:
            if any(isinstance(norm, nnx.BatchNorm) for norm in self.norms):
                raise ValueError("batch normalisation needs the whole batch: no conv_chunk")
            x = in_chunks(features, images_BxHxWxC, conv_chunk)
        else:
            x = features(images_BxHxWxC)
        x = nnx.relu(self.hidden(x))
        if train and self.dropout > 0:
            if dropout_key is None:
                raise ValueError("training with dropout needs a dropout_key")
            # The rate may be a traced value (one program for trials that differ only in it).
            rate = self.dropout if dropout_rate is None else dropout_rate
            keep = jax.random.bernoulli(dropout_key, 1.0 - rate, x.shape)
            x = jnp.where(keep, x / (1.0 - rate), 0.0)
        return self.classifier(x)

    def _pool(self, x: jax.Array) -> jax.Array:
        if self.pool == "max":
            return max_pool(x)
        return avg_pool(x)

    def _pool_phases(self, x_BxPxQx4xC: jax.Array) -> jax.Array:
        """2x2 pooling of `pooling_phases`' output: over its phase axis."""
        if self.pool == "max":
            return x_BxPxQx4xC.max(axis=3)
        return x_BxPxQx4xC.mean(axis=3)

    def layers(self, spec: DatasetSpec) -> list[dict[str, Any]]:
        """Each layer's output shape (per example), parameter count and forward FLOPs per
        example (a multiply-add counts as two)."""
        rows = []
        sizes = block_sizes(spec, self.kernels, self.padding)
        for i, (conv, norm, (conv_hw, pooled_hw)) in enumerate(
            zip(self.convs, self.norms, sizes, strict=True)
        ):
            c_in, c_out = conv.in_features, conv.out_features
            kernel_h, kernel_w = conv.kernel_size
            macs = conv_hw[0] * conv_hw[1] * kernel_h * kernel_w * c_in * c_out
            rows.append(_row(f"conv{i}", [*conv_hw, c_out], _size(conv), 2 * macs))
            if norm is not None:
                rows.append(_row(f"norm{i}", [*conv_hw, c_out], _size(norm), 0))
            rows.append(_row(f"pool{i}", [*pooled_hw, c_out], 0, 0))
        for name, dense in (("hidden", self.hidden), ("classifier", self.classifier)):
            flops = 2 * dense.in_features * dense.out_features
            rows.append(_row(name, [dense.out_features], _size(dense), flops))
        return rows


def in_chunks(fn: Any, x_BxD: jax.Array, size: int) -> jax.Array:
    """`fn` (a per-example function of a batch) applied to chunks of `size` examples, the
    results back in batch order. Chunk i holds examples i, i + n, i + 2n, ... (n chunks), so when
    the batch is split over devices each device keeps its own rows. The chunks are unrolled:
    XLA:CPU runs a convolution gradient inside a loop many times slower."""
    batch = x_BxD.shape[0]
    if batch % size:
        raise ValueError(f"a chunk of {size} does not divide the batch of {batch}")
    n = batch // size
    chunks = x_BxD.reshape(size, n, *x_BxD.shape[1:])
    outputs = [fn(chunks[:, i]) for i in range(n)]
    return jnp.stack(outputs, axis=1).reshape(batch, *outputs[0].shape[1:])


def stem_matmul(stem: str, pool: str, backend: str) -> bool:
    """Whether the first block runs as `pooling_phases` (a matrix product) rather than as a
    convolution: `stem` (`Config.stem`); auto: on the CPU, with max pooling.

    Measured on a 2-core CPU, the block alone, one input channel: with max pooling the matrix
    product was faster for every shape tried (fast.toml's 5x5 valid convolution into 16
    channels: 5,000 images evaluated in 160 instead of 310 ms, the gradient of a batch of 128
    in chunks of 8 in 8.5 instead of 15.8 ms; a 3x3 same convolution into 32 channels: 500
    instead of 820 ms, 11.2 instead of 18.9 ms), since XLA:CPU's convolution of one input
    channel makes poor use of the vector units. With average pooling after the ReLU (the
    classic CNN's first block) the convolution was 2.5x faster to evaluate. Later blocks (16
    input channels) were as fast or faster as convolutions, so only the first block has the
    choice. On GPU/TPU it is not measured yet: auto keeps the convolution there."""
    if stem == "auto":
        return backend == "cpu" and pool == "max"
    return stem == "matmul"


def phase_matrix(kernel_KxKxCxO: jax.Array) -> jax.Array:
    """The (J*J*4C) x (4O) matrix of `pooling_phases` (J = K // 2 + 1): column block 2dy + dx
    is the K x K kernel shifted by (dy, dx) inside a 2J x 2J window of zeros, its rows in the
    order of the patches' (block row, block column, row in block, column in block, channel)."""
    k, _, c, o = kernel_KxKxCxO.shape
    j = k // POOL + 1
    phases = []
    for dy in range(POOL):
        for dx in range(POOL):
            shifted = jnp.pad(
                kernel_KxKxCxO,
                ((dy, POOL * j - k - dy), (dx, POOL * j - k - dx), (0, 0), (0, 0)),
            )
            shifted = shifted.reshape(j, POOL, j, POOL, c, o).transpose(0, 2, 1, 3, 4, 5)
            phases.append(shifted.reshape(j * j * 4 * c, o))
    return jnp.stack(phases, axis=1).reshape(j * j * 4 * c, 4 * o)


def pooling_phases(
    x_BxHxWxC: jax.Array, matrix: jax.Array, bias_O: jax.Array, kernel: int, padding: str
) -> jax.Array:
    """A stride-1 convolution (a `kernel` x `kernel` kernel as `phase_matrix`, `padding`) plus
    bias, laid out for 2x2 pooling as (batch, P, Q, 4, O): [:, p, q, 2dy + dx] is the
    convolution's pixel (2p + dy, 2q + dx), so pooling is a max or mean over axis 3. An odd last
    row or column of the convolution, which pooling drops, is not computed.

    One matrix product: the input is cut into 2x2 blocks (space to depth, C -> 4C channels),
    each pooled pixel's patch is J x J such blocks, times `phase_matrix`'s four shifted kernels.
    Its zeros cost (2J/K)^2 more multiply-adds than the convolution (1.44x for K = 5)."""
    k = kernel
    if padding == "same":
        low = (k - 1) // 2
        x_BxHxWxC = jnp.pad(x_BxHxWxC, ((0, 0), (low, k - 1 - low), (low, k - 1 - low), (0, 0)))
    b, h, w, c = x_BxHxWxC.shape
    p, q = (h - k + 1) // POOL, (w - k + 1) // POOL
    j = k // POOL + 1
    # The rows and columns the kept outputs read, rounded up to whole blocks: a row added here
    # meets only the zeros of the shifted kernels.
    rows, cols = POOL * (p + j - 1), POOL * (q + j - 1)
    x = x_BxHxWxC[:, :rows, :cols]
    x = jnp.pad(x, ((0, 0), (0, rows - x.shape[1]), (0, cols - x.shape[2]), (0, 0)))
    blocks = x.reshape(b, rows // POOL, POOL, cols // POOL, POOL, c)
    blocks = blocks.transpose(0, 1, 3, 2, 4, 5).reshape(b, rows // POOL, cols // POOL, 4 * c)
    patches = jnp.concatenate(
        [blocks[:, di : di + p, dj : dj + q] for di in range(j) for dj in range(j)], axis=-1
    )
    out = patches.reshape(b * p * q, -1) @ matrix
    return out.reshape(b, p, q, 4, -1) + bias_O


def max_pool(x_BxHxWxC: jax.Array) -> jax.Array:
    """2x2 max pooling as a reshape and a max (an odd last row or column is dropped, as by
    `nnx.max_pool`): the same values, but its gradient is a cheap comparison where XLA:CPU's
    select-and-scatter (the gradient of `nnx.max_pool`) was measured 10x slower, a third of the
    whole train step of a small CNN."""
    b, h, w, c = x_BxHxWxC.shape
    h, w = h // POOL * POOL, w // POOL * POOL
    x = x_BxHxWxC[:, :h, :w].reshape(b, h // POOL, POOL, w // POOL, POOL, c)
    return x.max(axis=(2, 4))


@jax.custom_vjp
def avg_pool(x_BxHxWxC: jax.Array) -> jax.Array:
    """2x2 average pooling, stride 2: `nnx.avg_pool`'s values, with a gradient written out.

    Each input pixel's gradient is a quarter of its window's (zero for an odd last row or
    column): a broadcast, where XLA:CPU's gradient of a reduce-window took ~1/5 of the classic
    CNN's chunked train step (3,440 -> 4,550 examples/s, batch 128 in chunks of 8, 2-core CPU).
    The forward stays a reduce-window: as a reshape and a mean, evaluation at batch 1,000 was
    1.9x slower."""
    return nnx.avg_pool(x_BxHxWxC, window_shape=(POOL, POOL), strides=(POOL, POOL))


def _avg_pool_forward(x_BxHxWxC: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    return avg_pool(x_BxHxWxC), x_BxHxWxC.shape


def _avg_pool_backward(shape: tuple[int, ...], g_BxPxQxC: jax.Array) -> tuple[jax.Array]:
    b, h, w, c = shape
    p, q = h // POOL, w // POOL
    quarter = (g_BxPxQxC / (POOL * POOL))[:, :, None, :, None, :]
    spread = jnp.broadcast_to(quarter, (b, p, POOL, q, POOL, c)).reshape(b, p * POOL, q * POOL, c)
    return (jnp.pad(spread, ((0, 0), (0, h - p * POOL), (0, w - q * POOL), (0, 0))),)


avg_pool.defvjp(_avg_pool_forward, _avg_pool_backward)


def kernel_sizes(config: Config) -> tuple[int, ...]:
    """Each convolution block's (square) kernel size: `conv_kernels`, else 3 for every block."""
    return config.conv_kernels or (DEFAULT_KERNEL,) * len(config.conv_features)


Size = tuple[int, int]


def block_sizes(
    spec: DatasetSpec, kernels: tuple[int, ...], padding: str
) -> list[tuple[Size, Size]]:
    """(height, width) after each block's convolution and after its pooling. "same" padding
    keeps the size through a convolution, "valid" loses kernel - 1 pixels; a block that would
    leave less than one pixel is a one-line error."""
    height, width = spec.height, spec.width
    sizes = []
    for i, kernel in enumerate(kernels):
        if padding == "valid":
            height, width = height - kernel + 1, width - kernel + 1
        conv_hw = (height, width)
        height, width = height // POOL, width // POOL
        if height < 1 or width < 1:
            raise UserError(
                f"convolution block {i} (kernel {kernel}, {padding} padding) leaves less than "
                f"one pixel of the {spec.height}x{spec.width} image; use fewer blocks, smaller "
                "kernels or same padding"
            )
        sizes.append((conv_hw, (height, width)))
    return sizes


def _make_norm(norm: str, features: int, rngs: nnx.Rngs) -> nnx.Module | None:
    if norm == "batch":
        return nnx.BatchNorm(features, momentum=0.9, rngs=rngs)
    if norm == "layer":
        return nnx.LayerNorm(features, rngs=rngs)
    return None


def _size(module: nnx.Module) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def _row(name: str, output_shape: list[int], params: int, flops: int) -> dict[str, Any]:
    return {"name": name, "output_shape": output_shape, "params": params, "flops": flops}
