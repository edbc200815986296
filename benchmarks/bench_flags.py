"""XLA options side by side: one `mnist-jax train` command under several XLA_FLAGS, cold and warm.

For choosing a backend's defaults from figures, not from folklore: every variant runs the same
command in its own process, the variants alternating (A, B, C, A, B, C, ...) so that all see the
same machine load. Each repeat runs first with an empty compilation cache of its own, then again
with the cache that run filled. Prints compile, train and total seconds, steady examples/s,
process wall time and test accuracy per run, and the medians per variant beside the first
variant's; writes benchmarks/results/flags.json.

    python benchmarks/bench_flags.py [--variant NAME=FLAGS ...] [--repeats 1] [-- TRAIN ARGS]

Without --variant: the candidates for the backend JAX finds (`CANDIDATES`), the first of them
XLA's defaults. Arguments after `--` go to `mnist-jax train` (default: `--config
experiments/fast.toml`). Flags are added to any XLA_FLAGS already set; an option mnist-jax passes
to a program itself (on the CPU, the LLVM level of `parallel.compiler_options`) wins over the
same flag.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import jax
from common import train_command, write_results

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "flags.json"
DEFAULT_TRAIN_ARGS = ["--config", str(REPO / "experiments" / "fast.toml")]
# What each is for. GPU: autotuning picks convolution and GEMM algorithms by timing them at
# compile time (level 0: none); Triton GEMM fusions are autotuned over many generated kernels,
# cuBLAS is not; CUDA graphs (command buffers) cut launch overhead but are built at the first
# run, and by default leave out loops: with WHILE a whole scanned chunk of steps can become one
# graph. CPU: XNNPACK and oneDNN libraries for
# convolutions and matrix products instead of XLA's own code and Eigen; Eigen on one thread.
CANDIDATES = {
    "gpu": {
        "default": "",
        "autotune-0": "--xla_gpu_autotune_level=0",
        "no-triton-gemm": "--xla_gpu_enable_triton_gemm=false",
        "no-command-buffers": "--xla_gpu_enable_command_buffer=",
        "graphs-with-loops": "--xla_gpu_enable_command_buffer="
        "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE",
    },
    "cpu": {
        "default": "",
        "xnnpack": "--xla_cpu_use_xnnpack=true",
        "onednn": "--xla_cpu_use_onednn=true",
        "single-thread-eigen": "--xla_cpu_multi_thread_eigen=false",
    },
}
FIGURES = {
    "compile_seconds": "time/compile_seconds",
    "train_seconds": "time/train_seconds",
    "total_seconds": "time/total_seconds",
    "examples_per_sec": "train/examples_per_sec",
    "test_accuracy": "test/accuracy",
}


def train_once(flags: str, cache: Path, runs: Path, name: str, train_args: list[str]) -> dict:
    """One run under `flags`, with the compilation cache in `cache`: its figures."""
    xla_flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), flags) if f)
    env = {**os.environ, "XLA_FLAGS": xla_flags, "MNIST_JAX_COMPILATION_CACHE": str(cache)}
    command = [*train_command(), *train_args, "--runs-dir", str(runs), "--name", name]
    command += ["--wandb", "disabled"]
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {done.returncode}: {last[:300]}"}
    summary = json.loads((runs / name / "summary.json").read_text())
    return {"process_wall_seconds": wall, **{k: summary[v] for k, v in FIGURES.items()}}


def parse_variants(given: list[str]) -> dict[str, str]:
    if not given:
        return CANDIDATES.get(jax.default_backend(), {"default": ""})
    variants = {}
    for text in given:
        name, sep, flags = text.partition("=")
        if not sep or not name:
            raise SystemExit(f"--variant {text!r}: write NAME=FLAGS, e.g. no-triton=--xla_...")
        variants[name] = flags
    return variants


def medians(runs: list[dict]) -> dict[str, float]:
    good = [r for r in runs if "error" not in r]
    return {k: statistics.median(r[k] for r in good) for k in good[0]} if good else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], help="NAME=XLA_FLAGS")
    parser.add_argument("--repeats", type=int, default=1)
    args, train_args = parser.parse_known_args()
    train_args = [a for a in train_args if a != "--"] or DEFAULT_TRAIN_ARGS
    variants = parse_variants(args.variant)
    print(f"backend {jax.default_backend()}: {', '.join(variants)}; train {' '.join(train_args)}")

    runs: dict[str, dict[str, list[dict]]] = {v: {"cold": [], "warm": []} for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, flags in variants.items():
                cache = Path(tmp) / f"cache-{name}-{i}"
                for phase in ("cold", "warm"):
                    run = train_once(flags, cache, Path(tmp) / "runs", f"{name}-{phase}-{i}",
                                     train_args)  # fmt: skip
                    runs[name][phase].append(run)
                    shown = run.get("error") or "  ".join(f"{k} {v:.4g}" for k, v in run.items())
                    print(f"{name:>20} {phase} {i}: {shown}", flush=True)

    summary = {name: {phase: medians(r) for phase, r in by.items()} for name, by in runs.items()}
    first = next(iter(variants))
    for phase in ("cold", "warm"):
        print(f"\nmedians, {phase} cache (ratio to {first})")
        keys = list(FIGURES) + ["process_wall_seconds"]
        print(f"{'variant':<20}" + "".join(f"{k:>22}" for k in keys))
        base = summary[first][phase]
        for name in variants:
            got = summary[name][phase]
            cells = [
                f"{got[k]:.4g} ({got[k] / base[k]:.2f})" if got and base.get(k) else "-"
                for k in keys
            ]
            print(f"{name:<20}" + "".join(f"{c:>22}" for c in cells))
    write_results(RESULTS, train_args=train_args, variants=variants, runs=runs, medians=summary)


if __name__ == "__main__":
    main()
