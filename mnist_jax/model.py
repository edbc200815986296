"""The Flax NNX CNN, sized by `Config`.

The default is the classic conv32-conv64-dense256-dense10 network: each convolution block is a
3x3 convolution, optional normalisation, ReLU and 2x2 average pooling, as in the Flax MNIST
example. Dropout takes an explicit key so that the train step stays a pure function of
`(state, batch, rng)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mnist_jax.config import Config

IMAGE_SHAPE = (28, 28, 1)


class CNN(nnx.Module):
    """Convolution blocks, one hidden dense layer, and a linear classifier."""

    def __init__(
        self,
        num_classes: int,
        conv_features: tuple[int, ...] = (32, 64),
        dense_features: int = 256,
        dropout: float = 0.0,
        norm: str = "none",
        *,
        rngs: nnx.Rngs,
    ) -> None:
        self.dropout = dropout
        self.norm = norm
        convs, norms = [], []
        in_features = IMAGE_SHAPE[-1]
        for features in conv_features:
            convs.append(nnx.Conv(in_features, features, kernel_size=(3, 3), rngs=rngs))
            norms.append(_make_norm(norm, features, rngs))
            in_features = features
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        side = IMAGE_SHAPE[0]
        for _ in conv_features:
            side //= 2
        self.hidden = nnx.Linear(side * side * in_features, dense_features, rngs=rngs)
        self.classifier = nnx.Linear(dense_features, num_classes, rngs=rngs)

    def __call__(
        self, images_BxHxWx1: jax.Array, *, train: bool, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        x = images_BxHxWx1
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = conv(x)
            if isinstance(norm, nnx.BatchNorm):
                x = norm(x, use_running_average=not train)
            elif norm is not None:
                x = norm(x)
            x = nnx.relu(x)
            x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.hidden(x))
        if train and self.dropout > 0:
            if dropout_key is None:
                raise ValueError("training with dropout needs a dropout_key")
            keep = jax.random.bernoulli(dropout_key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0.0)
        return self.classifier(x)


def _make_norm(norm: str, features: int, rngs: nnx.Rngs) -> nnx.Module | None:
    if norm == "batch":
        return nnx.BatchNorm(features, momentum=0.9, rngs=rngs)
    if norm == "layer":
        return nnx.LayerNorm(features, rngs=rngs)
    return None


def create_model(config: Config, num_classes: int) -> CNN:
    """The model the config describes, initialised from `config.seed`."""
    return CNN(
        num_classes,
        conv_features=config.conv_features,
        dense_features=config.dense_features,
        dropout=config.dropout,
        norm=config.norm,
        rngs=nnx.Rngs(params=config.seed),
    )


def preprocess(images_BxHxW: jax.Array) -> jax.Array:
    """uint8 pixels to the float input the model expects: [0, 1], with a channel axis."""
    return (images_BxHxW.astype(jnp.float32) / 255.0)[..., None]
