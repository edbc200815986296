"""Training speed of two revisions of mnist-jax, side by side, in one run on one machine.

Each revision is checked out into a temporary git worktree and runs the same `mnist-jax train`
command in its own process, alternating (A, B, A, B, ...) so that both see the same machine load.
Prints steady examples/s, compile, train and process wall seconds and test accuracy per run and
the median ratio B/A; writes benchmarks/results/revisions.json.

    python benchmarks/bench_revisions.py --base HEAD~3 --head HEAD [--repeats 2] -- --epochs 1

Arguments after `--` go to `mnist-jax train` (default: one epoch of the default recipe on 19,200
training images). Needs real MNIST in `--data-dir` or $MNIST_JAX_DATA_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_results

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "revisions.json"
DEFAULT_TRAIN_ARGS = ["--epochs", "1", "--train-examples", "19200"]
FIGURES = (
    "train/examples_per_sec",
    "time/compile_seconds",
    "time/train_seconds",
    "time/total_seconds",
    "test/accuracy",
)


def checkout(revision: str, root: Path) -> Path:
    path = root / revision.replace("/", "_").replace("~", "-")
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(path), revision],
        check=True,
        capture_output=True,
    )
    return path


def train_once(tree: Path, runs: Path, name: str, train_args: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "cli", "train", "--runs-dir", str(runs), "--name", name]
    t0 = time.perf_counter()
    subprocess.run(command + train_args, cwd=tree, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    summary = json.loads((runs / name / "summary.json").read_text())
    return {"process_wall_seconds": wall, **{k: summary[k] for k in FIGURES}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the baseline revision (A)")
    parser.add_argument("--head", default="HEAD", help="the revision compared with it (B)")
    parser.add_argument("--repeats", type=int, default=2)
    args, train_args = parser.parse_known_args()
    train_args = [a for a in train_args if a != "--"] or DEFAULT_TRAIN_ARGS

    results: dict[str, list[dict[str, float]]] = {args.base: [], args.head: []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {rev: checkout(rev, Path(tmp)) for rev in results}
        try:
            for i in range(args.repeats):
                for rev, tree in trees.items():
                    run = train_once(tree, Path(tmp) / "runs", f"{Path(tree).name}-{i}", train_args)
                    results[rev].append(run)
                    figures = "  ".join(f"{k} {v:.4g}" for k, v in run.items())
                    print(f"{rev:>12} run {i}: {figures}", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)])

    medians = {
        rev: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for rev, runs in results.items()
    }
    print(f"\n{'median':<28}{args.base:>14}{args.head:>14}{'B/A':>8}")
    for key in medians[args.base]:
        a, b = medians[args.base][key], medians[args.head][key]
        print(f"{key:<28}{a:>14.4g}{b:>14.4g}{b / a if a else float('nan'):>8.3f}")
    write_results(RESULTS, train_args=train_args, runs=results, medians=medians)


if __name__ == "__main__":
    main()
