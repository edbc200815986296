"""Devices, placement and compilation: the one module that calls `jax.jit` or moves data.

Everything the toolkit runs on an accelerator goes through here: `place` puts arrays on the
device once, `compile` turns a pure function into one ahead-of-time compiled program (so compile
time is measured on its own, and a shape change can never recompile silently), `compile_program`
does the same for a program that later runs reuse without tracing it again (the trainer's, and
those of `evaluate` and `predict`), `compiling_together` lets XLA compile a trainer's programs on
worker threads while the next one is traced, and `jit` is for the few calls outside them whose
shapes vary (the ranking curves and per-class scores that `analyze` computes from a run's files).

Data parallelism is JAX's own: `use_devices` chooses a `Mesh` over the devices in use (every
local device of every process by default) with one axis, `batch`. From then on `place`
replicates (parameters, optimizer state, the training set, sums), `place_batches` shards a batch
axis, `compile` builds programs with explicit in/out shardings (outputs replicated, so every
process can read every result), and `shard_batch` constrains a batch gathered inside a program
to the batch axis: each device computes its part of every global batch and XLA all-reduces the
gradients and the sums. Until `use_devices` is called everything runs on the default device.

Several hosts: `initialize_distributed` starts `jax.distributed` before any backend, one
process per host (or per device); every process runs the same program on its own devices.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import pickle
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mnist_jax.data.locations import cache_root
from mnist_jax.errors import UserError, first_line

COMPILATION_CACHE_ENV = "MNIST_JAX_COMPILATION_CACHE"
# The cache's bound: past it, the least recently used entries go, down to 3/4 of it.
COMPILATION_CACHE_MAX_ENV = "MNIST_JAX_COMPILATION_CACHE_MAX_MB"
DEFAULT_COMPILATION_CACHE_MAX_MB = 2048
# XLA's switches for bit-identical GPU results: deterministic reductions and scatters, and no
# autotuning (which may pick a different convolution algorithm in each process).
DETERMINISTIC_GPU_FLAGS = ("--xla_gpu_deterministic_ops=true", "--xla_gpu_autotune_level=0")
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
BATCH_AXIS = "batch"
_CPU_OPTIMIZATION_LEVEL = "xla_backend_optimization_level"
CPU_LEVEL = 2
CPU_LEVEL_ONCE = 1
# Environment fallbacks of the multi-host flags (JAX's own JAX_COORDINATOR_ADDRESS works too).
COORDINATOR_ENV = "MNIST_JAX_COORDINATOR"
NUM_PROCESSES_ENV = "MNIST_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "MNIST_JAX_PROCESS_ID"
# A process that stops sending heartbeats this long is dead to the others, which then stop too
# (JAX's default, 100 s, leaves a run standing still for minutes); connecting may take longer,
# since processes on several hosts rarely start at the same moment.
HEARTBEAT_SECONDS = 30
CONNECT_SECONDS = 300
# What JAX and its collectives say when another process of the run has gone.
_PEER_LOST_SIGNS = (
    "gloo",
    "connection closed by peer",
    "connection reset by peer",
    "heartbeat",
    "coordination service",
    "barrier",
    "unavailable",
)
_TEXT_BYTES = 2048
_HOST_SCALARS = (np.ndarray, np.generic, int, float)
# Beside XLA's entries in the compilation cache: each program `compile_program` exported.
PROGRAMS_DIR = "programs"
# What a program is built from besides its key and its code: these packages' versions.
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")
_mesh: Mesh | None = None
_programs_dir: Path | None = None
_counters: list[dict[str, int]] = []  # those of `count_compilations` blocks now open
_counters_lock = threading.Lock()  # XLA reports compilations from `compiling_together`'s threads
_together: list[Pending] | None = None  # the programs a `compiling_together` block compiles
_exit_code_on_peer_loss: int | None = None


def describe_devices() -> dict[str, Any]:
    """The backend and devices the run computes on, for the run record: `device_count` is
    the global count (every process's devices in the mesh), `process_count` the processes."""
    devices = devices_in_use()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
    }


def devices_in_use() -> list[jax.Device]:
    """The mesh's devices once `use_devices` chose them; before, this process's default."""
    return list(_mesh.devices.flat) if _mesh is not None else jax.devices()[:1]


def initialize_distributed(
    coordinator: str | None = None, num_processes: int = 0, process_id: int = -1
) -> None:
    """Joins this process to a multi-process run (`jax.distributed.initialize`).

    Must run before anything touches a device. Unset values come from $MNIST_JAX_COORDINATOR,
    $MNIST_JAX_NUM_PROCESSES, $MNIST_JAX_PROCESS_ID, then from JAX's own detection (TPU pods,
    SLURM, Open MPI, JAX_COORDINATOR_ADDRESS). On the CPU the processes' collectives go through
    gloo over TCP.
    """
    if jax.distributed.is_initialized():
        return
    if _backends_started():
        raise UserError(
            "--distributed must start before JAX computes anything: run it from a fresh process"
        )
    coordinator = coordinator or os.environ.get(COORDINATOR_ENV) or None
    count = num_processes or _env_int(NUM_PROCESSES_ENV, 0)
    index = process_id if process_id >= 0 else _env_int(PROCESS_ID_ENV, -1)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=count or None,
            process_id=index if index >= 0 else None,
            initialization_timeout=CONNECT_SECONDS,
            heartbeat_timeout_seconds=HEARTBEAT_SECONDS,
        )
    except (ValueError, TypeError, RuntimeError) as e:
        where = f"coordinator {coordinator}" if coordinator else "no coordinator"
        raise UserError(
            f"cannot start the distributed run ({where}, {count or '?'} processes, process id "
            f"{index if index >= 0 else '?'}): {first_line(e)}; outside TPU pods and SLURM pass "
            "--coordinator HOST:PORT --num-processes N --process-id I (or set "
            f"${COORDINATOR_ENV}, ${NUM_PROCESSES_ENV}, ${PROCESS_ID_ENV})",
            exit_code=1,
        ) from None
    atexit.register(_skip_shutdown_after_peer_loss)  # runs before JAX's own exit handler


def is_main_process() -> bool:
    """Whether this process writes what the run writes once (the record, W&B)."""
    return jax.process_index() == 0


def broadcast_text(text: str) -> str:
    """Process 0's `text`, in every process (a run name, an error): what all must agree on."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    data = np.zeros(_TEXT_BYTES, np.uint8)
    encoded = text.encode()[:_TEXT_BYTES]
    data[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    agreed = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(agreed).rstrip(b"\0").decode(errors="replace")


def any_process(flag: bool) -> bool:
    """Whether `flag` is true in any process of the run (in one process: `flag`). A stop
    request (Ctrl-C, SIGTERM) reaching one process of a distributed run stops all of them at
    the same step, so that every one checkpoints there and none waits for the others."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array([flag], np.int32))
    return bool(np.any(np.asarray(flags)))


def share_outcome(error: UserError | None) -> None:
    """After a step only process 0 takes (creating the run record): its error, if any, is
    raised in every process, so that none goes on to wait for the others; an error of another
    process is raised there."""
    message = broadcast_text("" if error is None else str(error))
    if message and not is_main_process():
        raise UserError(f"process 0 stopped: {message}")
    if error is not None:
        raise error


def use_devices(count: int = 0) -> Mesh:
    """Computes from now on over a mesh of `count` devices of each process (0: all of them).

    Every process takes its first `count` local devices, so the mesh holds
    `count * process_count` devices in all, in process order.
    """
    global _mesh
    local = jax.local_devices()
    if count > len(local):
        raise UserError(
            f"--devices {count} asks for more devices than this process has ({len(local)} x "
            f"{local[0].device_kind}); choose at most {len(local)}, or 0 for all"
        )
    chosen = set(local[: count or len(local)])
    if jax.process_count() > 1:  # the same share of every process's devices
        per_process = len(chosen)
        chosen = {
            d
            for p in range(jax.process_count())
            for d in [x for x in jax.devices() if x.process_index == p][:per_process]
        }
    devices = [d for d in jax.devices() if d in chosen]
    _mesh = Mesh(np.array(devices), (BATCH_AXIS,))
    return _mesh


def require_divisible(batch_size: int, flag: str = "--batch-size") -> None:
    """A global batch must split evenly over the devices; the error names sizes that would."""
    n = len(devices_in_use())
    if batch_size % n == 0:
        return
    below, above = (batch_size // n) * n, (batch_size // n + 1) * n
    sizes = " or ".join(str(s) for s in (below, above) if s > 0)
    raise UserError(
        f"{flag} {batch_size} does not divide among {n} devices: each device takes an equal "
        f"share of every batch; use a multiple of {n}, e.g. {sizes}"
    )


def lost_peer(error: BaseException) -> str | None:
    """When `error` says another process of a distributed run has gone (killed, crashed, its
    host lost), one line saying so; None for any other error. A process that gets one should
    stop: `exit_after_peer_loss` makes its exit quick and quiet."""
    if not jax.distributed.is_initialized() or isinstance(error, (KeyboardInterrupt, UserError)):
        return None
    text = str(error).lower()
    if not any(sign in text for sign in _PEER_LOST_SIGNS):
        return None
    return f"another process of this distributed run stopped ({first_line(error)[:160]})"


def exit_after_peer_loss(exit_code: int) -> None:
    """Makes this process exit with `exit_code` without JAX's distributed shutdown, which
    waits for the lost process at a barrier and then aborts with a page of C++ log."""
    global _exit_code_on_peer_loss
    _exit_code_on_peer_loss = exit_code


def peer_lost() -> bool:
    """Whether this process found another of its run gone (nothing collective may run now)."""
    return _exit_code_on_peer_loss is not None


def _skip_shutdown_after_peer_loss() -> None:
    if _exit_code_on_peer_loss is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_code_on_peer_loss)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"${name} must be an integer, got {value!r}") from None


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
    share it safely. It is kept under $MNIST_JAX_COMPILATION_CACHE_MAX_MB (2,048 MB unless set)
    by `prune_compilation_cache`."""
    global _programs_dir
    setting = os.environ.get(COMPILATION_CACHE_ENV, "")
    if setting.lower() in ("off", "0", "false", "no"):
        _programs_dir = None
        return None
    directory = Path(setting) if setting else cache_root() / "xla"
    limit_mb = _env_int(COMPILATION_CACHE_MAX_ENV, DEFAULT_COMPILATION_CACHE_MAX_MB)
    if limit_mb < 1:
        raise UserError(
            f"${COMPILATION_CACHE_MAX_ENV} must be at least 1 (megabytes), got {limit_mb}; "
            f"to turn the cache off, set ${COMPILATION_CACHE_ENV}=off"
        )
    prune_compilation_cache(directory, limit_mb * 2**20)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _programs_dir = directory / PROGRAMS_DIR
    return directory


def prune_compilation_cache(directory: Path, max_bytes: int) -> list[Path]:
    """Keeps the cache under `max_bytes`: when its entries (XLA's `*-cache` files and the kept
    programs) add up to more, the least recently used go until 3/4 of it is left. Last use is
    the later of a file's access and modification times (a kept program is touched when it is
    loaded). Nothing else in the directory is touched; a run reading an entry that another just
    removed compiles it again. Returns the removed entries."""
    found = []
    for path in [*directory.glob("*-cache"), *(directory / PROGRAMS_DIR).glob("*.pkl")]:
        with contextlib.suppress(OSError):
            stat = path.stat()
            found.append((max(stat.st_atime, stat.st_mtime), stat.st_size, path))
    total = sum(size for _, size, _ in found)
    removed = []
    if total <= max_bytes:
        return removed
    for _, size, path in sorted(found):
        if total <= max_bytes * 3 // 4:
            break
        with contextlib.suppress(OSError):
            path.unlink()
            total -= size
            removed.append(path)
    return removed


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
    eager op for each new shape), `cache_hits`, those of them read from the persistent
    compilation cache instead of compiled, and `traced`, the programs `compile` and
    `compile_program` traced from Python (not those a `compile_program` found kept)."""
    counts = {"programs": 0, "cache_hits": 0, "traced": 0}

    def on_duration(event: str, duration: float, **_: Any) -> None:
        if event == _COMPILE_EVENT:
            with _counters_lock:
                counts["programs"] += 1

    def on_event(event: str, **_: Any) -> None:
        if event == _CACHE_HIT_EVENT:
            with _counters_lock:
                counts["cache_hits"] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    _counters.append(counts)
    try:
        yield counts
    finally:
        _counters.remove(counts)
        with contextlib.suppress(AttributeError, ValueError):
            jax.monitoring.unregister_event_duration_listener(on_duration)
            jax.monitoring.unregister_event_listener(on_event)


def replicated() -> NamedSharding | None:
    """Every device of the mesh holds the whole array (None before `use_devices`)."""
    return None if _mesh is None else NamedSharding(_mesh, PartitionSpec())


def default_device() -> NamedSharding:
    """The default device alone, for arrays that go there whatever the mesh (a checkpoint
    restored for evaluation): a one-device mesh, which every jax version names the same way."""
    return NamedSharding(Mesh(jax.devices()[:1], (BATCH_AXIS,)), PartitionSpec())


def sharded(axis: int = 0) -> NamedSharding | None:
    """Axis `axis` split over the mesh's devices (None before `use_devices`)."""
    if _mesh is None:
        return None
    return NamedSharding(_mesh, PartitionSpec(*([None] * axis), BATCH_AXIS))


def place(tree: Any) -> Any:
    """Moves host arrays (any pytree) onto the devices once: replicated over the mesh, or onto
    the default device before `use_devices`."""
    return _put(tree, replicated())


def place_batches(tree: Any, axis: int = 0) -> Any:
    """Like `place`, with axis `axis` of every array split over the devices (each holds its
    share of each batch); replicated where that axis does not divide evenly."""
    if _mesh is None:
        return place(tree)
    n = _mesh.devices.size
    divisible = all(np.shape(x)[axis] % n == 0 for x in jax.tree.leaves(tree))
    return _put(tree, sharded(axis) if divisible else replicated())


def shard_batch(tree: Any) -> Any:
    """Inside a compiled program: the arrays of a batch split along their first axis over the
    devices, so each computes its share and XLA sums across devices where the batch is reduced.
    """
    if _mesh is None or _mesh.devices.size == 1:
        return tree
    return jax.lax.with_sharding_constraint(tree, sharded(0))


def _put(tree: Any, sharding: NamedSharding | None) -> Any:
    if sharding is None:
        return jax.device_put(tree)

    def put(x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if isinstance(x, jax.Array) and x.is_fully_addressable:
            return jax.device_put(x, sharding)
        # Each process holds the whole host array and gives each of its devices its part.
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def fetch(tree: Any) -> Any:
    """Brings device arrays back to the host as numpy (the only sync point callers need)."""
    return jax.device_get(tree)


def compile(  # noqa: A001 - the verb is the point
    fn: Callable[..., Any], *example_args: Any, donate: Sequence[int] = (), once: bool = False
) -> Callable[..., Any]:
    """`fn` compiled now for the shapes (and placements) of `example_args`.

    `donate` names arguments whose buffers the result may reuse (the train state): the caller
    must not touch them after the call. `once` marks a program a run calls once or a few times
    (initialisation, a permutation per epoch): on the CPU its machine code is optimised less,
    since compiling it would take longer than it ever runs. Over a mesh the program takes each
    argument as it is placed (host values are replicated) and replicates every result: a value
    every process can read, which is what training keeps (state, sums) and reports
    (evaluations).
    """
    _count_traced()
    if _mesh is None:
        jitted = jax.jit(fn, donate_argnums=tuple(donate))
    else:
        jitted = jax.jit(
            fn,
            in_shardings=jax.tree.map(_sharding_of, example_args),
            out_shardings=replicated(),
            donate_argnums=tuple(donate),
        )
    return _compile_lowered(jitted.lower(*example_args), once)


def _compile_lowered(
    lowered: jax.stages.Lowered, once: bool, fallback: Callable[[], Any] | None = None
) -> Callable[..., Any]:
    """XLA's compilation of `lowered`, now or, within `compiling_together`, on a worker thread.
    `fallback` builds the program another way where this compilation fails."""

    def build() -> Callable[..., Any]:
        compiled = lowered.compile(compiler_options=compiler_options(once))
        return compiled if _mesh is None else _on_mesh(compiled)

    if _together is None:
        return build()
    program = Pending(_compile_pool().submit(build), fallback)
    _together.append(program)
    return program


class Pending:
    """A program that `compiling_together` is compiling: calls wait for it (or, where its
    compilation failed, for its fallback); attributes are the compiled program's."""

    def __init__(
        self, future: concurrent.futures.Future[Any], fallback: Callable[[], Any] | None
    ) -> None:
        self._future, self._fallback = future, fallback
        self._program: Callable[..., Any] | None = None

    def result(self) -> Callable[..., Any]:
        if self._program is None:
            try:
                self._program = self._future.result()
            except Exception:
                if self._fallback is None:
                    raise
                program = self._fallback()
                self._program = program.result() if isinstance(program, Pending) else program
        return self._program

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.result()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not set yet (say, while copied): never the program's
            raise AttributeError(name)
        return getattr(self.result(), name)


@functools.cache
def _compile_pool() -> concurrent.futures.ThreadPoolExecutor:
    """On the CPU, one compilation per core (2 cores: a cold `fast.toml` trainer built in a
    median 5.7 s instead of 6.6 s; one at a time, 6.4 s). Elsewhere one at a time, each beside
    the tracing of the next: GPU autotuning times kernels on the device while it compiles, and
    two compilations at once would time theirs against each other."""
    workers = min(8, os.cpu_count() or 1) if backend() == "cpu" else 1
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="mnist-jax-compile")


@contextlib.contextmanager
def compiling_together() -> Iterator[None]:
    """Within it, `compile` and `compile_program` trace and lower each program on this thread as
    before, but hand XLA's compilation (which releases the GIL) to worker threads
    (`_compile_pool`): while XLA compiles one program, the next is traced, and on the CPU the
    programs compile side by side. The block ends once every one of them is compiled (or has
    raised its error), so that the time it took is still the programs' compile time."""
    global _together
    if _together is not None:  # nested: the outer block waits
        yield
        return
    programs: list[Pending] = []
    _together = programs
    try:
        yield
    finally:
        _together = None
        concurrent.futures.wait([p._future for p in programs])
    for program in programs:
        program.result()


def _on_mesh(compiled: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        # Host scalars (an epoch, a step index) become replicated arrays: every process passes
        # the same value, and a multi-process program accepts only global arrays.
        return compiled(*(place(a) if isinstance(a, _HOST_SCALARS) else a for a in args))

    return call


def compile_program(
    fn: Callable[..., Any],
    example_args: Callable[[], tuple[Any, ...]],
    *,
    key: Any,
    donate: Sequence[int] = (),
    once: bool = False,
) -> Callable[..., Any]:
    """`compile(fn, *example_args(), ...)`, kept across runs: the first run with this `key`
    exports the traced program (`jax.export`) into the compilation cache, and every later one
    loads it instead of tracing and lowering `fn` again (on 2 CPU cores that took 0.75 s of the
    1.0 s a warm run spent on its five programs), then finds XLA's compiled code in the same
    cache. Either way the program is compiled from the exported module, so the first run and
    the later ones execute the same code.

    `key` (anything JSON can write) must say everything the program depends on besides the
    code, the package versions, the devices and the XLA options, which are added here: the
    config's structure and the data's shapes, say. `example_args` is called only when nothing
    is kept for the key. Without a compilation cache, or in a run of several processes, this is
    `compile`.
    """
    path = _program_path(fn.__name__, key, donate, once)

    def from_source() -> Callable[..., Any]:
        args = example_args()
        if path is None:
            return compile(fn, *args, donate=donate, once=once)
        try:
            exported = _export(fn, args)
            again = functools.partial(compile, fn, *args, donate=donate, once=once)
            program = _compile_exported(*exported, donate=donate, once=once, fallback=again)
        except Exception:  # noqa: BLE001 - a program jax.export cannot save still runs
            return compile(fn, *args, donate=donate, once=once)
        # A read-only or full cache, or a program jax.export cannot write, costs the next run
        # time, not this run.
        with contextlib.suppress(Exception):
            _write_program(path, exported)
        return program

    if path is not None and path.exists():
        with contextlib.suppress(Exception):  # unreadable or from another jax: export again
            kept = _read_program(path)
            return _compile_exported(*kept, donate=donate, once=once, fallback=from_source)
    return from_source()


def signature(tree: Any) -> list[list[Any]]:
    """Each array's shape, dtype and placement, for a `compile_program` key."""
    return [
        [list(np.shape(x)), str(_dtype(x)), repr(getattr(x, "sharding", None))]
        for x in jax.tree.leaves(tree)
    ]


def _program_path(name: str, key: Any, donate: Sequence[int], once: bool) -> Path | None:
    """Where the program of this name and key is kept for this code, these packages, devices
    and XLA options; None where nothing is kept (no cache, or several processes)."""
    if _programs_dir is None or jax.process_count() > 1:
        return None
    devices = devices_in_use()
    identity = {
        "name": name,
        "key": key,
        "donate": list(donate),
        "options": compiler_options(once),
        "source": _source_digest(),
        "packages": {p: _version(p) for p in _PACKAGES},
        "platform": [devices[0].platform, devices[0].client.platform_version],
        "devices": [[d.id, d.device_kind] for d in devices],
        "sharded": _mesh is not None,
        "environment": {v: os.environ.get(v, "") for v in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")},
        "jax_config": {k: repr(v) for k, v in jax.config.values.items() if "cache" not in k},
    }
    text = json.dumps(identity, sort_keys=True, default=repr)
    return _programs_dir / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:40]}.pkl"


_source_digests: dict[Path, str] = {}


def _source_digest() -> str:
    """The package's own code: a kept program is never reused after any of it changed."""
    root = Path(__file__).resolve().parent
    if root not in _source_digests:
        digest = hashlib.sha256()
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
        _source_digests[root] = digest.hexdigest()
    return _source_digests[root]


@functools.cache
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


Exported = tuple[Any, Any, Any]  # (jax.export.Exported, the arguments' and results' treedefs)


def _export(fn: Callable[..., Any], args: tuple[Any, ...]) -> Exported:
    """`fn` traced and lowered for the shapes and placements of `args`, as a function of the
    flat list of their leaves, with the treedefs that give the leaves their structure back."""
    leaves, in_tree = jax.tree.flatten(args)
    out_trees = []

    def flat(*xs: Any) -> list[Any]:
        results, out_tree = jax.tree.flatten(fn(*jax.tree.unflatten(in_tree, xs)))
        out_trees.append(out_tree)
        return results

    flat.__name__ = fn.__name__
    specs = [jax.ShapeDtypeStruct(np.shape(x), _dtype(x)) for x in leaves]
    if _mesh is None:
        jitted = jax.jit(flat)
    else:
        shardings = [_sharding_of(x) for x in leaves]
        jitted = jax.jit(flat, in_shardings=shardings, out_shardings=replicated())
    exported = jax.export.export(jitted)(*specs)
    _count_traced()
    return exported, in_tree, out_trees[0]


def _count_traced() -> None:
    for counts in _counters:
        counts["traced"] += 1


def _dtype(x: Any) -> Any:
    """The dtype `x` has as a program's argument: a host int or float is 32-bit unless x64 is on."""
    return jax.dtypes.canonicalize_dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)


def _compile_exported(
    exported: Any,
    in_tree: Any,
    out_tree: Any,
    *,
    donate: Sequence[int],
    once: bool,
    fallback: Callable[[], Any] | None = None,
) -> Callable[..., Any]:
    """The exported program compiled with `compile`'s conventions: the same arguments and
    results as the function it came from, `donate` donated, results replicated."""

    def program(*args: Any) -> Any:
        return jax.tree.unflatten(out_tree, exported.call(*in_tree.flatten_up_to(args)))

    program.__name__ = exported.fun_name
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in exported.in_avals]
    if _mesh is None:
        jitted = jax.jit(program, donate_argnums=tuple(donate))
    else:
        kept = exported.in_shardings_jax(_mesh)
        shardings = [s if s is not None else replicated() for s in kept]
        jitted = jax.jit(
            program,
            in_shardings=tuple(jax.tree.unflatten(in_tree, shardings)),
            out_shardings=replicated(),
            donate_argnums=tuple(donate),
        )
    return _compile_lowered(jitted.lower(*jax.tree.unflatten(in_tree, avals)), once, fallback)


def _read_program(path: Path) -> Exported:
    saved = pickle.loads(path.read_bytes())
    with contextlib.suppress(OSError):  # its last use, for `prune_compilation_cache`
        os.utime(path)
    return jax.export.deserialize(saved["exported"]), saved["in_tree"], saved["out_tree"]


def _write_program(path: Path, exported: Exported) -> None:
    program, in_tree, out_tree = exported
    data = {"exported": program.serialize(), "in_tree": in_tree, "out_tree": out_tree}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        temporary = Path(f.name)
    try:
        temporary.write_bytes(pickle.dumps(data))
        temporary.replace(path)  # whole or not at all: concurrent runs may write one program
    finally:
        temporary.unlink(missing_ok=True)


def compiler_options(once: bool = False) -> dict[str, Any] | None:
    """XLA options for a program `compile` builds (None: XLA's defaults).

    On the CPU, LLVM's optimisation level: measured on 2 cores, level 1 compiles model
    initialisation ~3x faster than the default 3 (0.4 s against 1.3-1.5 s), level 2 a train
    step ~15% faster, and both give the same bits as level 3 with no measurable loss in speed
    (the convolutions and matrix products are library calls, which LLVM does not compile).
    Other backends keep their defaults, which nothing here has measured against.
    """
    if backend() != "cpu":
        return None
    return {_CPU_OPTIMIZATION_LEVEL: CPU_LEVEL_ONCE if once else CPU_LEVEL}


def _sharding_of(x: Any) -> NamedSharding:
    if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding):
        return x.sharding
    return replicated()


def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` compiled on first use for each new input shape."""
    return jax.jit(fn)
