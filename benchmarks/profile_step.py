"""Where a train step's time goes on the CPU: each operation's thread time, and how much of the
step has one operation, or several, in flight.

    python benchmarks/profile_step.py [--loop trainer|flax-style] [--steps 30] [--top 20]

Runs the classic recipe's step (the Trainer's, or the Flax-style loop's of `bench_speed.py`)
under the JAX profiler with XLA:CPU's per-operation trace events
(`--xla_cpu_enable_xprof_traceme`), reads the trace back (Perfetto JSON) and names each event
by its instruction in the optimised program (the jax operation it came from and its shape;
`transpose(jvp(...))` is the backward pass). Prints, per step: the operations by thread time,
the time with 0, 1, 2, ... operations in flight, and the operations that were the only one.
Writes benchmarks/results/profile_step.json.

The trace events add their own cost (a step runs ~1.3x longer under them), so read shares, not
absolute times. An operation that runs in YNNPACK may spread its work over the other threads,
which the events do not show: one operation in flight is not one thread idle (the Flax-style
loop runs one operation at a time, yet 1.7x faster on two cores than on one). XLA:CPU only: on
a GPU the events are kernels on streams, which this does not read. The compilation cache is
off, so that the program is compiled and dumped here.
"""

from __future__ import annotations

import argparse
import atexit
import bisect
import collections
import gzip
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

DUMP = Path(tempfile.mkdtemp(prefix="mnist-jax-profile-"))
atexit.register(shutil.rmtree, DUMP, ignore_errors=True)
# Before jax starts: per-operation trace events, and the optimised programs as text.
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_cpu_enable_xprof_traceme=true",
        f"--xla_dump_to={DUMP}",
        "--xla_dump_hlo_as_text",
        "--xla_dump_hlo_module_re=train",
    ]
)
os.environ["MNIST_JAX_COMPILATION_CACHE"] = "off"

import jax  # noqa: E402
from bench_speed import FlaxStyleLoop, TrainerLoop  # noqa: E402
from common import machine, write_results  # noqa: E402

from mnist_jax import data  # noqa: E402
from mnist_jax.config import Config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "profile_step.json"
WORKER = "tf_XLAEigen"
STEP_EVENT = "ThunkExecutor::Execute (wait for completion)"
# Bookkeeping events on the worker threads, around or between the operations.
NOT_OPERATIONS = ("ThunkExecutor", "end: ", "SlinkyThreadPool", "ThreadpoolListener")
INSTRUCTION = re.compile(r"\s*(?:ROOT )?%(\S+) = (\S+) (.*)")
OP_NAME = re.compile(r"op_name=\"([^\"]+)\"")


def instructions(hlo_text: str) -> dict[str, str]:
    """Each instruction's name in an optimised program -> "jax operation  shape" (the
    instruction's kind where no jax operation is recorded, as for the optimizer's update)."""
    named = {}
    for line in hlo_text.splitlines():
        match = INSTRUCTION.match(line)
        if match:
            name, shape, rest = match.groups()
            op_name = OP_NAME.search(rest)
            what = (
                re.sub(r"^jit\([^)]*\)/", "", op_name.group(1))
                if op_name
                else re.sub(r"\.\d+$", "", name)
            )
            named[name] = f"{what}  {shape.split('{')[0]}"
    return named


def read_trace(log_dir: Path) -> tuple[list[tuple[float, float]], dict[Any, list]]:
    """The steps' windows (start, end in us) and each worker thread's operation events
    (start, end, name)."""
    path = next(log_dir.glob("**/*.trace.json.gz"))
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    thread_names = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    steps, workers = [], collections.defaultdict(list)
    for e in events:
        if e.get("ph") != "X":
            continue
        start, end = e["ts"], e["ts"] + e.get("dur", 0)
        if e["name"] == STEP_EVENT:
            steps.append((start, end))
        elif thread_names.get((e["pid"], e["tid"]), "").startswith(WORKER) and not e[
            "name"
        ].startswith(NOT_OPERATIONS):
            workers[e["tid"]].append((start, end, e["name"]))
    return sorted(steps), workers


def summarise(
    steps: list[tuple[float, float]], workers: dict[Any, list], named: dict[str, str], top: int
) -> dict[str, Any]:
    """Per step (ms): thread time by operation, time by number of operations in flight, and
    the time each operation was the only one."""
    n = len(steps)
    inside = [
        (start, end, name, tid)
        for tid, evs in workers.items()
        for start, end, name in evs
        if _within(steps, start)
    ]
    by_op: collections.Counter[str] = collections.Counter()
    for start, end, name, _ in inside:
        by_op[named.get(name, name)] += end - start
    total = sum(by_op.values())
    # sweep over the steps' windows: how many operations are in flight, and which, when one is
    points = sorted(
        [(s, 1, name, tid) for s, _, name, tid in inside]
        + [(e, -1, name, tid) for _, e, name, tid in inside]
        + [(s, 0, None, None) for s, _ in steps]
        + [(e, 0, None, None) for _, e in steps]
    )
    in_flight: collections.Counter[int] = collections.Counter()
    alone: collections.Counter[str] = collections.Counter()
    running: collections.Counter[tuple[str, Any]] = collections.Counter()
    last = None
    for time, delta, name, tid in points:
        if last is not None and _within(steps, last):
            active = [key for key, count in running.items() if count > 0]
            in_flight[len(active)] += time - last
            if len(active) == 1:
                alone[named.get(active[0][0], active[0][0])] += time - last
        if name is not None:
            running[(name, tid)] += delta
        last = time
    wall = sum(e - s for s, e in steps)
    ms = 1e3 * n  # us per run -> ms per step
    return {
        "steps": n,
        "step_ms": wall / ms,
        "thread_ms": total / ms,
        "threads": len(workers),
        "operations": [
            {"operation": op, "ms": t / ms, "share": t / total} for op, t in by_op.most_common(top)
        ],
        "in_flight_ms": {str(k): v / ms for k, v in sorted(in_flight.items())},
        "alone": [{"operation": op, "ms": t / ms} for op, t in alone.most_common(top)],
    }


def _within(windows: list[tuple[float, float]], time: float) -> bool:
    """Whether `time` falls inside one of the sorted, disjoint `windows`."""
    i = bisect.bisect_right(windows, (time, math.inf)) - 1
    return i >= 0 and windows[i][0] <= time < windows[i][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get(data.DATA_DIR_ENV))
    parser.add_argument("--loop", choices=("trainer", "flax-style"), default="trainer")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    if jax.default_backend() != "cpu":
        raise SystemExit(
            f"this profile reads XLA:CPU's events; the backend is {jax.default_backend()}"
        )

    dataset = data.load_dataset("mnist", args.data_dir)
    config = Config()
    loop = (
        TrainerLoop(config, dataset) if args.loop == "trainer" else FlaxStyleLoop(config, dataset)
    )
    loop.run(3)  # compile and warm up, off the trace
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            loop.run(args.steps)
        steps, workers = read_trace(Path(log_dir))
    programs = sorted(
        DUMP.glob("*train*.cpu_after_optimizations.txt"), key=lambda p: p.stat().st_size
    )
    named = instructions(programs[-1].read_text()) if programs else {}
    result = summarise(steps, workers, named, args.top)
    result["loop"] = args.loop

    print(
        f"{args.loop}, classic CNN, batch {config.batch_size}: {result['steps']} steps, "
        f"{result['step_ms']:.1f} ms per step under the trace, {result['thread_ms']:.1f} ms of "
        f"operations on {result['threads']} threads"
    )
    print("\nthread time per step, by operation:")
    for op in result["operations"]:
        print(f"  {op['ms']:7.2f} ms {100 * op['share']:5.1f}%  {op['operation']}")
    print("\nstep time by operations in flight:")
    for k, v in result["in_flight_ms"].items():
        print(f"  {k}: {v:7.2f} ms ({100 * v / result['step_ms']:.0f}%)")
    print("\nthe only operation in flight:")
    for op in result["alone"][:10]:
        print(f"  {op['ms']:7.2f} ms  {op['operation']}")
    write_results(RESULTS, machine=machine(), **result)


if __name__ == "__main__":
    main()
