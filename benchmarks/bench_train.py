"""Training and evaluation throughput on real MNIST, each figure beside its baseline.

- train: examples/s of the compiled train call for steps_per_call=1 (the CPU default, the
  baseline) against K steps under `lax.scan`;
- eval: the full 10,000-image test evaluation as a Python loop of the compiled eval step (counts
  only: loss, confusion) against the trainer's one compiled call, which also stacks the
  probabilities and computes every metric (precision/recall/F1, exact AUROC, average precision).

    python benchmarks/bench_train.py [--steps 200] [--scan 10] [--scan-steps 40] [--repeats 5]

Prints a table and writes benchmarks/results/train.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import jax
from common import write_results

from mnist_jax import data
from mnist_jax.config import Config
from mnist_jax.trainer import Trainer

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"


def train_rate(config: Config, dataset: data.Dataset, k: int, n_steps: int) -> float:
    """Steady-state examples/s of `n_steps` steps run `k` per compiled call."""
    trainer = Trainer(config.replace(steps_per_call=k), dataset)
    trainer.run(k)  # the first call of a compiled program pays for its set-up
    jax.block_until_ready(trainer.sums)
    calls = max(1, min(n_steps, trainer.steps_per_epoch - k) // k)
    t0 = time.perf_counter()
    trainer.run(calls * k)
    jax.block_until_ready(trainer.sums)
    return calls * k * config.batch_size / (time.perf_counter() - t0)


def eval_seconds(config: Config, dataset: data.Dataset, repeats: int) -> dict[str, list[float]]:
    """The whole test split: counts only (a loop of the compiled eval step) against the one
    compiled call that the trainer runs (counts, probabilities and every metric)."""
    trainer = Trainer(config, dataset)
    eval_step = jax.jit(trainer.steps.eval_step)
    test = trainer.test

    def counts_only():
        for k in range(test.images_KxBxHxW.shape[0]):
            batch = (test.images_KxBxHxW[k], test.labels_KxB[k])
            out = eval_step(trainer.state, batch, test.mask_KxB[k])
        return out

    jax.block_until_ready((counts_only(), trainer.evaluate()))
    timings: dict[str, list[float]] = {"counts only": [], "counts + all metrics": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(counts_only())
        timings["counts only"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(trainer.evaluate())
        timings["counts + all metrics"].append(time.perf_counter() - t0)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get(data.DATA_DIR_ENV))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--scan", type=int, default=10)
    parser.add_argument(
        "--scan-steps", type=int, default=40, help="steps timed under lax.scan (slow on CPU)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    dataset = data.load_dataset("mnist", args.data_dir)
    config = Config()
    train = {
        "steps_per_call=1 (baseline)": train_rate(config, dataset, 1, args.steps),
        f"steps_per_call={args.scan} (lax.scan)": train_rate(
            config, dataset, args.scan, args.steps
        ),
    }
    evals = eval_seconds(config, dataset, args.repeats)

    print(
        f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}, {os.cpu_count()} cores"
    )
    print(f"{'train call':<36} {'examples/s':>12}")
    for name, rate in train.items():
        print(f"{name:<36} {rate:>12,.0f}")
    print(f"{'test evaluation (10,000 images)':<36} {'median s':>12} {'min s':>8}")
    for name, seconds in evals.items():
        print(f"{name:<36} {statistics.median(seconds):>12.3f} {min(seconds):>8.3f}")

    write_results(RESULTS, train_examples_per_sec=train, eval_seconds=evals)


if __name__ == "__main__":
    main()
