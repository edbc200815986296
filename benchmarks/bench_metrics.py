"""Times the full test-set metric computation: confusion + `classification_summary` with probs.

This is what one evaluation of the 10,000 MNIST test images costs on top of the forward passes:
one jitted call from stacked probabilities and labels to every metric (counts, per-class
precision/recall/F1, exact one-vs-rest AUROC and average precision), timed after warmup, plus the
host-side `to_record`. Prints the figures and writes them to `benchmarks/results/metrics.json`.

    .venv/bin/python benchmarks/bench_metrics.py [--n 10000] [--classes 10] [--repeats 50]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import metrics

RESULTS = Path(__file__).resolve().parent / "results" / "metrics.json"


def make_inputs(n: int, num_classes: int, seed: int = 0) -> tuple[jax.Array, ...]:
    """Softmax probabilities of a mostly-right classifier, float32, placed on the device."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    logits = rng.normal(size=(n, num_classes)).astype(np.float32)
    logits[np.arange(n), labels] += 3.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    mask = np.ones(n, bool)
    return tuple(jax.device_put(x) for x in (probs.astype(np.float32), labels, mask))


def time_calls(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    """First-call time (compile + run), then per-call wall times in ms after two warmup calls."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first_ms = (time.perf_counter() - start) * 1e3
    for _ in range(2):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "first_call_ms": first_ms,
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    num_classes = args.classes
    probs, labels, mask = make_inputs(args.n, num_classes)

    @jax.jit
    def full(probs_NxC, labels_N, mask_N):
        predictions = jnp.argmax(probs_NxC, axis=1)
        confusion = metrics.confusion_matrix(labels_N, predictions, num_classes, mask_N)
        return confusion, metrics.classification_summary(confusion, probs_NxC, labels_N, mask_N)

    @jax.jit
    def counts_only(probs_NxC, labels_N, mask_N):
        predictions = jnp.argmax(probs_NxC, axis=1)
        confusion = metrics.confusion_matrix(labels_N, predictions, num_classes, mask_N)
        return confusion, metrics.classification_summary(confusion)

    confusion, summary = full(probs, labels, mask)
    figures = {
        "full_summary": time_calls(lambda: full(probs, labels, mask), args.repeats),
        "counts_only_summary": time_calls(lambda: counts_only(probs, labels, mask), args.repeats),
        "to_record_host": time_calls(
            lambda: metrics.to_record("test", summary, confusion, loss=0.0), args.repeats
        ),
    }
    device = jax.devices()[0]
    result = {
        "what": "confusion + classification_summary(probs) on the whole test set, jitted",
        "n": args.n,
        "num_classes": num_classes,
        "repeats": args.repeats,
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "jax": jax.__version__,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],  # other work on the host inflates the times
        "figures": figures,
        "check_accuracy": float(summary["accuracy"]),
        "check_auroc_macro": float(summary["auroc_macro"]),
    }
    for name, figure in figures.items():
        print(
            f"{name:>20}: median {figure['median_ms']:8.3f} ms  min {figure['min_ms']:8.3f} ms  "
            f"first call {figure['first_call_ms']:8.1f} ms"
        )
    print(f"N={args.n} C={num_classes} on {jax.default_backend()} ({device.device_kind})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
