"""Models by name: `--model cnn` picks `CNN`; a new model is a module here and one registry line.

Every model is an `nnx.Module` built as `Model(spec, config, rngs=...)` for a dataset spec (image
shape, classes) and called as `model(images_BxHxWxC, train=..., dropout_key=..., dropout_rate=...,
conv_chunk=...)` (the rate, when given, overrides the config's: a traced value in a sweep; the
chunk, when given, is how many examples pass through the convolutions at once). Each one
describes itself (`describe`): its layers with output shapes, parameter counts and FLOPs per
example (forward, and for a training step), recorded in the run's config.json so runs of
different models can be compared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from mnist_jax.config import Config
from mnist_jax.errors import UserError
from mnist_jax.models.cnn import CNN

if TYPE_CHECKING:
    from mnist_jax.data.registry import DatasetSpec

MODELS: dict[str, type[nnx.Module]] = {"cnn": CNN}


def model_class(name: str) -> type[nnx.Module]:
    try:
        return MODELS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None


def create_model(config: Config, spec: DatasetSpec, seed: Any = None) -> nnx.Module:
    """The model `config` names, for `spec`'s images, initialised from `seed` (a traced value
    inside a compiled initialisation, so one program serves every seed), else `config.seed`."""
    key = jax.random.key(config.seed if seed is None else seed)
    return model_class(config.model)(spec, config, rngs=nnx.Rngs(params=key))


def describe(config: Config, spec: DatasetSpec) -> dict[str, Any]:
    """Layers (name, output shape, parameters, FLOPs per example) and totals, without computing
    anything: the model is built abstractly.

    A training step's FLOPs per example count, besides the forward pass, each weighted layer's
    two products of the backward pass (the gradient into its weights and into its input, each
    as many FLOPs as its forward), less the first one's gradient into the images, which nothing
    needs: the work every implementation of the step does, whatever it adds around it."""
    abstract = nnx.eval_shape(lambda: create_model(config, spec))
    layers = abstract.layers(spec)
    params = nnx.state(abstract, nnx.Param)
    forward = sum(layer["flops"] for layer in layers)
    weighted = [layer["flops"] for layer in layers if layer["params"] and layer["flops"]]
    return {
        "name": config.model,
        "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "flops_per_example": int(forward),
        "train_flops_per_example": int(forward + 2 * sum(weighted) - weighted[0]),
        "input_shape": list(spec.image_shape),
        "layers": layers,
    }


def preprocess(images_BxHxW: jax.Array, spec: DatasetSpec) -> jax.Array:
    """uint8 pixels to the float input models expect: [0, 1], with a channel axis."""
    images = images_BxHxW.astype(jnp.float32) / 255.0
    return images.reshape(images.shape[:1] + tuple(spec.image_shape))
