"""Datasets as uint8 arrays (see `mnist_jax.data.loading`)."""

from mnist_jax.data.loading import *  # noqa: F403
