"""Devices, placement and compilation: the one module that calls `jax.jit` or moves data.

Everything the toolkit runs on an accelerator goes through here: `place` puts arrays on the
device once, `compile` turns a pure function into one ahead-of-time compiled program (so compile
time is measured on its own, and a shape change can never recompile silently), and `jit` is for
the few calls whose shapes vary (predicting a handful of files). Data-parallel training replaces
the bodies of these functions with a mesh and shardings; callers stay as they are.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax

from mnist_jax.data.locations import cache_root
from mnist_jax.errors import UserError

COMPILATION_CACHE_ENV = "MNIST_JAX_COMPILATION_CACHE"
# XLA's switches for bit-identical GPU results: deterministic reductions and scatters, and no
# autotuning (which may pick a different convolution algorithm in each process).
DETERMINISTIC_GPU_FLAGS = ("--xla_gpu_deterministic_ops=true", "--xla_gpu_autotune_level=0")
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


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


def accelerator_hint() -> str | None:
    """An accelerator this machine seems to have while JAX computes on the CPU (the silent
    fallback of a jax without CUDA or TPU support), said so that nobody waits an hour for a
    CPU run they did not ask for; None when JAX uses an accelerator or none is visible."""
    if jax.default_backend() != "cpu":
        return None
    if any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl")):
        return 'an NVIDIA GPU is present: install jax with CUDA (pip install "mnist-jax[cuda]")'
    tpu = [v for v in ("COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE") if os.environ.get(v)]
    if tpu or Path("/dev/accel0").exists() or Path("/dev/vfio/0").exists():
        return 'a TPU is present: install jax for TPU (pip install "mnist-jax[tpu]")'
    return None


def use_compilation_cache() -> Path | None:
    """Keeps every compiled program on disk, so a second run with the same shapes compiles
    nothing: under the cache root (beside the data cache) unless $MNIST_JAX_COMPILATION_CACHE
    names another directory, or `off`. JAX writes each entry atomically, so concurrent runs
    share it safely."""
    setting = os.environ.get(COMPILATION_CACHE_ENV, "")
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    directory = Path(setting) if setting else cache_root() / "xla"
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def use_deterministic_ops() -> None:
    """Makes the same seed give the same bits on every backend (XLA:CPU already does).

    The GPU switches are read when JAX starts its backend, so they can be added only before
    that; a process whose GPU backend is already running without them is refused.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    missing = [f for f in DETERMINISTIC_GPU_FLAGS if f not in flags.split()]
    if not missing:
        return
    if not _backends_started():
        os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()
        return
    if jax.default_backend() == "gpu":
        raise UserError(
            "deterministic mode needs XLA's deterministic GPU ops, which must be chosen before "
            f"JAX starts: run from a fresh process, or set XLA_FLAGS='{' '.join(missing)}'"
        )


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # another jax: assume the worst, refuse on GPU
        return True


@contextlib.contextmanager
def count_compilations() -> Iterator[dict[str, int]]:
    """Yields counts kept up to date meanwhile: `programs` built (each jitted function and each
    eager op for each new shape), and `cache_hits`, those of them read from the persistent
    compilation cache instead of compiled."""
    counts = {"programs": 0, "cache_hits": 0}

    def on_duration(event: str, duration: float, **_: Any) -> None:
        if event == _COMPILE_EVENT:
            counts["programs"] += 1

    def on_event(event: str, **_: Any) -> None:
        if event == _CACHE_HIT_EVENT:
            counts["cache_hits"] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        yield counts
    finally:
        with contextlib.suppress(AttributeError, ValueError):
            jax.monitoring.unregister_event_duration_listener(on_duration)
            jax.monitoring.unregister_event_listener(on_event)


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
