"""`cnn`: the classic CNN of the Flax MNIST example, sized by `Config`.

The default is conv32-conv64-dense256-dense10: each convolution block is a 3x3 convolution,
optional normalisation, ReLU and 2x2 average pooling. Dropout takes an explicit key so that the
train step stays a pure function of `(state, batch, rng)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from mnist_jax.config import Config

if TYPE_CHECKING:
    from mnist_jax.data.registry import DatasetSpec

KERNEL = (3, 3)
POOL = 2


class CNN(nnx.Module):
    """Convolution blocks, one hidden dense layer, and a linear classifier."""

    def __init__(self, spec: DatasetSpec, config: Config, *, rngs: nnx.Rngs) -> None:
        self.dropout = config.dropout
        convs, norms = [], []
        in_features = spec.channels
        for features in config.conv_features:
            convs.append(nnx.Conv(in_features, features, kernel_size=KERNEL, rngs=rngs))
            norms.append(_make_norm(config.norm, features, rngs))
            in_features = features
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        height, width = _pooled(spec, len(config.conv_features))
        self.hidden = nnx.Linear(height * width * in_features, config.dense_features, rngs=rngs)
        self.classifier = nnx.Linear(config.dense_features, spec.num_classes, rngs=rngs)

    def __call__(
        self, images_BxHxWxC: jax.Array, *, train: bool, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        x = images_BxHxWxC
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = conv(x)
            if isinstance(norm, nnx.BatchNorm):
                x = norm(x, use_running_average=not train)
            elif norm is not None:
                x = norm(x)
            x = nnx.relu(x)
            x = nnx.avg_pool(x, window_shape=(POOL, POOL), strides=(POOL, POOL))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.hidden(x))
        if train and self.dropout > 0:
            if dropout_key is None:
                raise ValueError("training with dropout needs a dropout_key")
            keep = jax.random.bernoulli(dropout_key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0.0)
        return self.classifier(x)

    def layers(self, spec: DatasetSpec) -> list[dict[str, Any]]:
        """Each layer's output shape (per example), parameter count and forward FLOPs per
        example (a multiply-add counts as two)."""
        rows = []
        height, width = spec.height, spec.width
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            c_in, c_out = conv.in_features, conv.out_features
            macs = height * width * KERNEL[0] * KERNEL[1] * c_in * c_out
            rows.append(_row(f"conv{i}", [height, width, c_out], _size(conv), 2 * macs))
            if norm is not None:
                rows.append(_row(f"norm{i}", [height, width, c_out], _size(norm), 0))
            height, width = height // POOL, width // POOL
            rows.append(_row(f"pool{i}", [height, width, c_out], 0, 0))
        for name, dense in (("hidden", self.hidden), ("classifier", self.classifier)):
            flops = 2 * dense.in_features * dense.out_features
            rows.append(_row(name, [dense.out_features], _size(dense), flops))
        return rows


def _pooled(spec: DatasetSpec, blocks: int) -> tuple[int, int]:
    height, width = spec.height, spec.width
    for _ in range(blocks):
        height, width = height // POOL, width // POOL
    return height, width


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
