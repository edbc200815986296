"""Devices, placement and compilation: the one module that calls `jax.jit` or moves data.

Everything the toolkit runs on an accelerator goes through here: `place` puts arrays on the
device once, `compile` turns a pure function into one ahead-of-time compiled program (so compile
time is measured on its own, and a shape change can never recompile silently), and `jit` is for
the few calls whose shapes vary (predicting a handful of files). Data-parallel training replaces
the bodies of these functions with a mesh and shardings; callers stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax


def describe_devices() -> dict[str, Any]:
    """The backend and devices this process computes on, for the run record."""
    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
    }


def backend() -> str:
    return jax.default_backend()


def place(tree: Any) -> Any:
    """Moves host arrays (any pytree) onto the default device, once."""
    return jax.device_put(tree)


def fetch(tree: Any) -> Any:
    """Brings device arrays back to the host as numpy (the only sync point callers need)."""
    return jax.device_get(tree)


def compile(  # noqa: A001 - the verb is the point
    fn: Callable[..., Any], *example_args: Any, donate: Sequence[int] = ()
) -> Callable[..., Any]:
    """`fn` compiled now for the shapes (and placements) of `example_args`.

    `donate` names arguments whose buffers the result may reuse (the train state): the caller
    must not touch them after the call.
    """
    return jax.jit(fn, donate_argnums=tuple(donate)).lower(*example_args).compile()


def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` compiled on first use for each new input shape."""
    return jax.jit(fn)
