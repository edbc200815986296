"""Times loading real MNIST: a first load (parse, validate, write the .npz cache) against a
cached load for the gzipped files, and the (uncached) load of uncompressed copies.

    .venv/bin/python benchmarks/bench_data.py [--data-dir DIR] [--repeats N]

Prints a table and writes benchmarks/results/data.json. Files are read from the page cache
(warm OS cache), so the figures are the CPU cost of each path, not disk speed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mnist_jax import data  # noqa: E402


def timed(fn: Callable[[], object], repeats: int, before: Callable[[], None] = lambda: None):
    seconds = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "runs": seconds}


def bench_gz(directory: Path, cache_root: Path, repeats: int) -> dict[str, dict]:
    """Gzipped files: parse only, a first load (cache miss + write), a cached load."""

    def drop_caches() -> None:
        for path in [*directory.glob("mnist-jax-cache.npz"), *cache_root.rglob("*.npz")]:
            path.unlink()

    def load(cache: bool) -> Callable[[], object]:
        return lambda: data.load_idx_dir("mnist", directory, cache=cache)

    results = {
        "parse_only": timed(load(False), repeats),
        "first_load": timed(load(True), repeats, before=drop_caches),
    }
    results["cached_load"] = timed(load(True), repeats * 2)
    return results


def bench_raw(directory: Path, repeats: int) -> dict[str, dict]:
    """Uncompressed files are never cached (they parse as views); one figure: the load."""
    return {"load": timed(lambda: data.load_idx_dir("mnist", directory), repeats * 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_dir = os.environ.get(data.DATA_DIR_ENV, str(REPO.parent / "shared/datasets/mnist"))
    parser.add_argument("--data-dir", type=Path, default=Path(default_dir))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/data.json")
    args = parser.parse_args()
    warnings.simplefilter("error", data.DataWarning)  # the benchmark is of canonical data

    with tempfile.TemporaryDirectory() as tmp:
        os.environ[data.CACHE_DIR_ENV] = str(Path(tmp) / "cache")
        raw_dir = Path(tmp) / "raw"
        raw_dir.mkdir()
        for stem in data.FILE_STEMS.values():
            (raw_dir / stem).write_bytes(
                gzip.decompress((args.data_dir / f"{stem}.gz").read_bytes())
            )
        data.load_idx_dir("mnist", args.data_dir, cache=False)  # warm the page cache
        results = {
            "gz": bench_gz(args.data_dir, Path(tmp) / "cache", args.repeats),
            "raw": bench_raw(raw_dir, args.repeats),
        }
        ds = data.load_idx_dir("mnist", args.data_dir, cache=False)

    pixels = ds.train.images
    record = {
        "benchmark": "mnist-jax data loading (real MNIST, warm page cache)",
        "command": "python benchmarks/bench_data.py",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "data_dir": str(args.data_dir),
        "train_pixel_mean": float(pixels.mean(dtype=np.float64)),
        "train_pixel_std": float(pixels.std(dtype=np.float64)),
        "results": results,
    }
    print(f"{'files':6} {'path':12} {'median':>9} {'min':>9}")
    for files, paths in results.items():
        for path, r in paths.items():
            print(f"{files:6} {path:12} {r['median_s'] * 1e3:7.1f}ms {r['min_s'] * 1e3:7.1f}ms")
    gz = results["gz"]
    speedup = gz["first_load"]["median_s"] / gz["cached_load"]["median_s"]
    print(f"gz: a cached load is {speedup:.1f}x faster than a first load")
    print(
        f"train pixels: mean {record['train_pixel_mean']:.6f}, std {record['train_pixel_std']:.6f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
