"""Training and evaluation throughput on real MNIST, each figure beside its baseline.

- train: examples/s of the compiled train call for steps_per_call=1 (the CPU default, the
  baseline) against K steps under `lax.scan`;
- eval: the full 10,000-image test evaluation with counts only (loss, confusion) against the same
  evaluation plus every metric (precision/recall/F1, exact AUROC, average precision).

    python benchmarks/bench_train.py [--steps 200] [--scan 10] [--scan-steps 40] [--repeats 5]

Prints a table and writes benchmarks/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from mnist_jax import data, metrics, steps
from mnist_jax.config import Config

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"


def train_rate(config: Config, dataset: data.Dataset, k: int, n_steps: int) -> float:
    """Steady-state examples/s of `n_steps` steps run `k` per compiled call."""
    n = len(dataset.train.labels)
    built = steps.build(config, dataset.num_classes, total_steps=n // config.batch_size)
    images = jnp.asarray(dataset.train.images)
    labels = jnp.asarray(dataset.train.labels, jnp.int32)
    permutation = steps.epoch_permutation(config.seed, 0, n)
    chunk = steps.make_train_chunk(built, config, k)
    state, sums = built.init_state, steps.TrainSums.zeros()
    state, sums = chunk(state, sums, images, labels, permutation, jnp.int32(0))  # compile
    jax.block_until_ready(sums)
    calls = max(1, n_steps // k)
    t0 = time.perf_counter()
    for i in range(1, calls + 1):
        state, sums = chunk(state, sums, images, labels, permutation, jnp.int32(i * k))
    jax.block_until_ready(sums)
    return calls * k * config.batch_size / (time.perf_counter() - t0)


def eval_seconds(config: Config, dataset: data.Dataset, repeats: int) -> dict[str, list[float]]:
    built = steps.build(config, dataset.num_classes, total_steps=1)
    test = steps.eval_data(dataset.test.images, dataset.test.labels, config.eval_batch_size)
    evaluate = steps.make_evaluate(built, built.init_state, test)
    labels = jnp.asarray(dataset.test.labels, jnp.int32)
    summarize = jax.jit(metrics.classification_summary)
    jax.block_until_ready(summarize(*_counts_and_probs(evaluate, built, test), labels))
    timings: dict[str, list[float]] = {"counts only": [], "counts + all metrics": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(_counts_and_probs(evaluate, built, test))
        timings["counts only"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        confusion, probs = _counts_and_probs(evaluate, built, test)
        jax.block_until_ready(summarize(confusion, probs, labels))
        timings["counts + all metrics"].append(time.perf_counter() - t0)
    return timings


def _counts_and_probs(evaluate, built, test):
    sums, probs = evaluate(built.init_state, test)
    return sums.confusion, probs


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

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": {
                    "backend": jax.default_backend(),
                    "device_kind": jax.devices()[0].device_kind,
                    "cpu_count": os.cpu_count(),
                    "python": platform.python_version(),
                    "jax": jax.__version__,
                },
                "train_examples_per_sec": train,
                "eval_seconds": evals,
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
