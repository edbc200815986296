"""Trials at once against trials one by one: what `mnist-jax sweep` gains over `train`.

Two measurements, side by side in one run:

1. Step throughput: one compiled train step of the recipe mapped over K trials (each with its
   own initialisation, data order and learning rate), against K = 1 unmapped, data on the
   device: ms per step and examples/s over all trials.
2. End to end: the same N seeds of the recipe (a training subset, so it fits a benchmark) as N
   sequential `mnist-jax train` processes with a warm compilation cache, against one
   `mnist-jax sweep` process at --max-parallel 1 (one trial after another, one compiled
   program) and at each K: process wall time.

    python benchmarks/bench_sweep.py [--config experiments/fast.toml] [--trials 16]
        [--parallel 8,16] [--train-examples 6400] [--test-examples 2000] [--steps 40]

Prints both tables and writes benchmarks/results/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from common import write_results

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "sweep.json"

from mnist_jax import data as data_lib  # noqa: E402
from mnist_jax.config import config_from  # noqa: E402
from mnist_jax.trainer import Trainer  # noqa: E402


def step_throughput(config: Any, dataset: Any, widths: list[int], steps: int) -> list[dict]:
    """ms per step of K trials mapped as one program, and of one trial unmapped."""
    rows = []
    for k in [1, *widths]:
        trials = [config.replace(seed=i, lr=config.lr * (1 + i / 10)) for i in range(k)]
        trainer = Trainer(config, dataset, trials=None if k == 1 else trials)
        trainer.run(1)  # the first call of each program is not timed
        jax.block_until_ready(trainer.state)
        n = min(steps, trainer.steps_left_in_epoch)
        t0 = time.perf_counter()
        trainer.run(n)
        jax.block_until_ready(trainer.state)
        seconds = (time.perf_counter() - t0) / n
        rows.append(
            {
                "trials": k,
                "mapped": k > 1,
                "ms_per_step": 1000 * seconds,
                "examples_per_sec": k * config.batch_size / seconds,
                "steps_timed": n,
            }
        )
        print(
            f"K={k:>3}: {rows[-1]['ms_per_step']:8.1f} ms/step  "
            f"{rows[-1]['examples_per_sec']:>9,.0f} examples/s (all trials)",
            flush=True,
        )
    return rows


def cli(*args: str, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def end_to_end(ns: argparse.Namespace, widths: list[int], tmp: Path) -> list[dict]:
    """Wall time of N seeds: N `train` processes (warm cache) against one `sweep` process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MNIST_JAX_COMPILATION_CACHE": str(tmp / "xla")}
    flags = ["--config", ns.config, "--train-examples", str(ns.train_examples)]
    flags += ["--test-examples", str(ns.test_examples), "--wandb", "disabled"]
    flags += ["--data-dir", ns.data_dir] if ns.data_dir else []
    runs = tmp / "runs"
    cli("train", *flags, "--runs-dir", str(runs), "--name", "warm-up", env=env)  # fills the cache
    seconds = sum(
        cli("train", *flags, "--seed", str(s), "--runs-dir", str(runs), "--name", f"s{s}", env=env)
        for s in range(ns.trials)
    )
    rows = [{"how": f"{ns.trials} train processes, warm cache", "seconds": seconds}]
    spec = tmp / "seeds.toml"
    spec.write_text(
        f'config = "{Path(ns.config).resolve()}"\n[grid]\nseed = {list(range(ns.trials))}\n'
    )
    sweep_flags = flags[2:]  # the spec names the recipe
    for k in [1, *widths]:
        name = f"k{k}"
        wall = cli(
            "sweep", str(spec), *sweep_flags, "--runs-dir", str(runs), "--name", name,
            "--max-parallel", str(k), env=env,
        )  # fmt: skip
        accuracies = [
            json.loads((runs / name / t / "summary.json").read_text())["test/accuracy"]
            for t in sorted(os.listdir(runs / name))
            if t.startswith("trial-")
        ]
        rows.append(
            {
                "how": f"1 sweep process, --max-parallel {k}",
                "seconds": wall,
                "mean_test_accuracy": float(np.mean(accuracies)),
            }
        )
    for row in rows:
        row["vs_sequential"] = rows[0]["seconds"] / row["seconds"]
        print(f"{row['how']:<40} {row['seconds']:7.1f} s  {row['vs_sequential']:.2f}x", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "experiments" / "fast.toml"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--parallel", default="8,16")
    parser.add_argument("--train-examples", type=int, default=6400)
    parser.add_argument("--test-examples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip-end-to-end", action="store_true")
    ns = parser.parse_args()
    widths = [int(k) for k in ns.parallel.split(",")]
    os.environ.setdefault("MNIST_JAX_COMPILATION_CACHE", "off")
    config = config_from(ns.config, {"train_examples": ns.train_examples, "data_dir": ns.data_dir})
    dataset = data_lib.subset(
        data_lib.load_dataset(config.dataset, config.data_dir, config.source),
        ns.train_examples,
        ns.test_examples,
    )
    print(f"step throughput ({Path(ns.config).name}, batch {config.batch_size}):", flush=True)
    steps = step_throughput(config, dataset, widths, ns.steps)
    e2e = []
    if not ns.skip_end_to_end:
        print(f"\nend to end, {ns.trials} seeds:", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            e2e = end_to_end(ns, widths, Path(tmp))
    write_results(RESULTS, settings=vars(ns), step_throughput=steps, end_to_end=e2e)


if __name__ == "__main__":
    main()
