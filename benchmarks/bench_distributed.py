"""Training throughput of one process against several on this machine (gloo over 127.0.0.1).

Each setting is a real `mnist-jax train` run, the classic CNN and recipe (batch 128), one
process or N processes with one CPU device each (`--distributed --coordinator 127.0.0.1:PORT`),
on the same global batches; the figure is the run's `train/examples_per_sec` from its summary
(training steps only: compile and evaluation excluded), and the test accuracy beside it shows
that the runs learn the same.

    python benchmarks/bench_distributed.py [--data-dir DIR] [--train-examples 12800]
        [--epochs 1] [--processes 1,2]

Prints a table and writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import write_results

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "distributed.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, args: list[str], runs_dir: Path) -> dict[str, Any]:
    """One training run in `processes` processes; the summary process 0 wrote."""
    name = f"p{processes}"
    common = [sys.executable, str(REPO / "cli.py"), "train", *args]
    common += ["--runs-dir", str(runs_dir), "--name", name, "--wandb", "disabled"]
    if processes > 1:
        common += ["--distributed", "--coordinator", f"127.0.0.1:{free_port()}"]
        common += ["--num-processes", str(processes)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MNIST_JAX_COMPILATION_CACHE": "off"}
    commands = [
        common + (["--process-id", str(i)] if processes > 1 else []) for i in range(processes)
    ]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL) for c in commands]
    try:
        codes = [p.wait(1800) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        raise SystemExit(f"{processes} process(es): exit codes {codes}")
    summary = json.loads((runs_dir / name / "summary.json").read_text())
    return {
        "processes": processes,
        "examples_per_sec": summary["train/examples_per_sec"],
        "train_seconds": summary.get("time/train_seconds"),
        "test_accuracy": summary["test/accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--train-examples", type=int, default=12800)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--processes", default="1,2")
    ns = parser.parse_args()
    args = ["--train-examples", str(ns.train_examples), "--epochs", str(ns.epochs)]
    args += ["--data-dir", ns.data_dir] if ns.data_dir else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(p) for p in ns.processes.split(",")):
            rows.append(run(n, args, Path(tmp)))
            print(
                f"{n} process(es): {rows[-1]['examples_per_sec']:,.0f} examples/s, "
                f"test accuracy {rows[-1]['test_accuracy']:.4f}",
                flush=True,
            )
    write_results(RESULTS, settings=vars(ns), runs=rows)


if __name__ == "__main__":
    main()
