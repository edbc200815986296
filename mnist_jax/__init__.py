"""mnist-jax: a JAX functional training toolkit for MNIST-style image classification."""

__version__ = "0.1.0"
