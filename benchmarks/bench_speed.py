"""Time to accuracy: mnist-jax against a Flax-example-style loop, every figure from one run.

- throughput: the classic CNN and recipe (Adam, batch 128) trained for the same number of steps
  after warm-up by a Flax-example-style loop (a Python loop over host numpy batches cut from a
  numpy permutation, a `jax.jit` train step) and by mnist-jax's `Trainer` (data on the device,
  batches gathered there); each rate also as the FLOP rate of the step's products (the
  model's `train_flops_per_example`) beside the backend's float32 matmul rate, timed in the
  same run, which bounds what any loop can reach: the matmul rate over the Flax-style loop's
  FLOP rate is the highest Trainer / Flax-style ratio the backend allows without less work;
- time to accuracy: `mnist-jax train --config experiments/fast.toml --seed S` (or each
  `--recipe`) as real subprocesses, each seed first with an empty compilation cache, then with
  a warm one (process wall time from start to exit: imports, data, compile and evaluation
  included; the summary's compile, train and evaluation seconds), against one epoch of the
  Flax-style loop timed in this run as the yardstick. The epoch is timed in two halves, one
  before and one after the subprocesses, so that a change in the machine's load weighs on both
  sides. These runs leave W&B out; where wandb is installed, one more warm run mirrors to W&B
  offline, as the plain command does for a user with wandb and no API key;
- evaluation: the full test set in one compiled call, counts only against counts, stacked
  probabilities and every metric (what `Trainer.evaluate` runs), for fast.toml's model and the
  classic CNN, each beside the same model with its first block computed the other way (`--stem
  conv` where the backend chose a matrix product, `--stem matmul` where it chose a convolution),
  and the floor that the backend's float32 matmul rate puts under each: the model's forward
  FLOPs over the rate of a large square matmul timed in the same run.

    python benchmarks/bench_speed.py [--data-dir DIR] [--steps 200] [--seeds 0,1,2]
        [--recipe experiments/fast.toml ...] [--eval-repeats 5] [--no-fast] [--no-epoch]

Prints a table and writes benchmarks/results/speed.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import machine, train_command, write_results
from flax import nnx

from mnist_jax import data, models, steps
from mnist_jax.config import Config, config_from
from mnist_jax.models.cnn import stem_matmul
from mnist_jax.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "speed.json"
FAST = REPO / "experiments" / "fast.toml"


class FlaxExampleCNN(nnx.Module):
    """The Flax MNIST example's CNN as that example writes it: `nnx.Conv`, ReLU and
    `nnx.avg_pool` twice, then two dense layers, each on the whole batch. The same function as
    mnist-jax's classic CNN (same layers and parameter shapes), without its CPU-specific
    execution (convolutions in chunks, pooling as a reshape)."""

    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.dense1 = nnx.Linear(3136, 256, rngs=rngs)
        self.dense2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.avg_pool(nnx.relu(self.conv1(x)), window_shape=(2, 2), strides=(2, 2))
        x = nnx.avg_pool(nnx.relu(self.conv2(x)), window_shape=(2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        return self.dense2(nnx.relu(self.dense1(x)))


class FlaxStyleLoop:
    """The Flax MNIST example's training loop and model with mnist-jax's recipe (optimizer,
    schedule): each epoch a numpy permutation, each step a host batch sliced from it and passed
    to a `jax.jit` train step (so every step copies its batch to the device)."""

    def __init__(self, config: Config, dataset: data.Dataset) -> None:
        if config.conv_features != (32, 64) or config.dense_features != 256:
            raise SystemExit("the Flax-style baseline is the classic CNN only")
        self.batch_size = config.batch_size
        self.images = np.asarray(dataset.train.images)
        self.labels = np.asarray(dataset.train.labels, np.int32)
        self.steps_per_epoch = len(self.labels) // self.batch_size
        schedule = steps.make_schedule(config, self.steps_per_epoch * config.epochs)
        optimizer = steps.make_optimizer(config, schedule, steps.Hyper.of(config))
        model = FlaxExampleCNN(rngs=nnx.Rngs(config.seed))
        graphdef, params = nnx.split(model, nnx.Param)
        self.seed = config.seed

        def train_step(state, batch):
            params, opt_state = state
            images, labels = batch

            def loss_fn(params):
                inputs = jnp.asarray(images, jnp.float32)[..., None] / 255.0
                logits = nnx.merge(graphdef, params)(inputs)
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        self.train_step = jax.jit(train_step, donate_argnums=0)
        self.state = (params, optimizer.init(params))
        self.order = np.random.default_rng(config.seed).permutation(len(self.labels))
        self.step = 0

    def run(self, num_steps: int) -> None:
        for _ in range(num_steps):
            index = self.step % self.steps_per_epoch
            if index == 0 and self.step:
                self.order = np.random.default_rng(self.seed + self.step).permutation(
                    len(self.order)
                )
            rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
            batch = (self.images[rows], self.labels[rows])
            self.state, _ = self.train_step(self.state, batch)
            self.step += 1
        jax.block_until_ready(self.state)


class TrainerLoop:
    """mnist-jax's `Trainer`, run like the loop above (never past an epoch's end per call)."""

    def __init__(self, config: Config, dataset: data.Dataset) -> None:
        self.trainer = Trainer(config, dataset)

    def run(self, num_steps: int) -> None:
        while num_steps > 0:
            before = self.trainer.step
            num_steps -= self.trainer.run(num_steps) - before
        jax.block_until_ready(self.trainer.state)


def timed(loop: FlaxStyleLoop | TrainerLoop, num_steps: int) -> float:
    t0 = time.perf_counter()
    loop.run(num_steps)
    return time.perf_counter() - t0


def throughput(
    config: Config, dataset: data.Dataset, num_steps: int, train_flops: int, matmul_rate: float
) -> dict[str, Any]:
    """Examples/s of both loops over `num_steps` steps after a warm-up step, timed in two
    alternating halves so that both see the same machine; with `train_flops` per example, their
    FLOP rates against `matmul_rate` (GFLOP/s)."""
    loops = {"flax_style": FlaxStyleLoop(config, dataset), "trainer": TrainerLoop(config, dataset)}
    for loop in loops.values():
        loop.run(1)  # compile (the Flax-style loop) and first-call set-up, off the clock
    seconds = dict.fromkeys(loops, 0.0)
    for half in (num_steps // 2, num_steps - num_steps // 2):
        for name, loop in loops.items():
            seconds[name] += timed(loop, half)
    rates = {name: num_steps * config.batch_size / s for name, s in seconds.items()}
    gflops = {name: rate * train_flops / 1e9 for name, rate in rates.items()}
    return {
        "steps": num_steps,
        "batch_size": config.batch_size,
        "examples_per_sec": rates,
        "trainer_over_flax_style": rates["trainer"] / rates["flax_style"],
        "train_flops_per_example": train_flops,
        "gflops": gflops,
        "matmul_gflops": matmul_rate,
        "share_of_matmul_rate": {name: g / matmul_rate for name, g in gflops.items()},
        "ratio_at_matmul_rate": matmul_rate / gflops["flax_style"],
    }


def fast_run(
    recipe: Path,
    seed: int,
    data_dir: str | None,
    runs_dir: Path,
    cache: str,
    name: str,
    wandb: str = "disabled",
) -> dict[str, Any]:
    """One `mnist-jax train --config RECIPE --seed S`, timed from outside, with the persistent
    compilation cache in `cache` (a directory, or `off`) and W&B in mode `wandb`."""
    command = [*train_command(), "--config", str(recipe), "--seed", str(seed)]
    command += ["--runs-dir", str(runs_dir), "--name", name, "--wandb", wandb]
    if data_dir:
        command += ["--data-dir", data_dir]
    t0 = time.perf_counter()
    env = {**os.environ, "MNIST_JAX_COMPILATION_CACHE": cache}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    summary = json.loads((runs_dir / name / "summary.json").read_text())
    # As it comes, so that a run cut short by a time limit still shows what it measured.
    print(
        f"{recipe.name} {name}: wall {wall:.2f} s, {json.dumps(summary_times(summary))}", flush=True
    )
    return {
        "seed": seed,
        "wandb": wandb,
        "test_accuracy": summary["test/accuracy"],
        "process_wall_seconds": wall,
        "compile_seconds": summary["time/compile_seconds"],
        "compiled_programs": summary["compile/programs"],
        "compile_cache_hits": summary["compile/cache_hits"],
        "traced_programs": summary["compile/traced"],
        "total_seconds": summary["time/total_seconds"],
        "train_seconds": summary["time/train_seconds"],
        "eval_seconds": summary["time/eval_seconds"],
        "train_examples_per_sec": summary["train/examples_per_sec"],
    }


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def summary_times(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("test/accuracy", "compile/programs", "compile/cache_hits", "compile/traced")
    keys += tuple(k for k in summary if k.startswith("time/"))
    return {k: summary[k] for k in keys}


def time_to_accuracy(
    config: Config,
    dataset: data.Dataset,
    recipes: list[Path],
    seeds: list[int],
    data_dir: str | None,
    epoch: bool,
) -> dict[str, Any]:
    """The fast recipes' runs, and one epoch of the Flax-style loop around them."""
    loop = FlaxStyleLoop(config, dataset) if epoch else None
    halves = []
    if loop is not None:
        loop.run(1)  # compile, off the clock
        halves.append(timed(loop, loop.steps_per_epoch // 2))
    result: dict[str, Any] = {"recipes": {}}
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as tmp:
        for i, recipe in enumerate(recipes):
            runs_dir = Path(tmp) / f"runs-{i}"
            caches = [str(Path(tmp) / f"xla-{i}-{seed}") for seed in seeds]
            # Each seed cold (an empty compilation cache of its own, as on a first run), then
            # warm (the cache the first cold run filled): the programs do not depend on the
            # seed, so a warm run compiles and traces nothing.
            runs = [
                fast_run(recipe, seed, data_dir, runs_dir, cache, f"cold-{seed}")
                for seed, cache in zip(seeds, caches, strict=True)
            ]
            runs += [
                fast_run(recipe, seed, data_dir, runs_dir, caches[0], f"warm-{seed}")
                for seed in seeds
            ]
            states = ["cold"] * len(seeds) + ["warm"] * len(seeds)
            if wandb_installed():
                # The command as a user with wandb installed and no API key runs it: mirrored
                # to W&B offline (the runs above leave W&B out, as the Flax-style loop does).
                seed = seeds[0]
                name = f"warm-wandb-{seed}"
                runs.append(
                    fast_run(recipe, seed, data_dir, runs_dir, caches[0], name, wandb="offline")
                )
                states.append("warm")
            for run, state in zip(runs, states, strict=True):
                run["compilation_cache"] = state
            path = recipe.resolve()
            name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
            command = f"mnist-jax train --config {name} --seed S"
            result["recipes"][name] = {"command": command, "runs": runs}
    if loop is not None:
        halves.append(timed(loop, loop.steps_per_epoch - loop.steps_per_epoch // 2))
    if halves:
        epoch_seconds = sum(halves)
        result["flax_style_epoch"] = {
            "seconds": epoch_seconds,
            "halves_seconds": halves,
            "examples_per_sec": loop.steps_per_epoch * config.batch_size / epoch_seconds,
        }
        for recipe in result["recipes"].values():
            for run in recipe["runs"]:
                run["wall_over_flax_style_epoch"] = run["process_wall_seconds"] / epoch_seconds
    return result


def eval_seconds(config: Config, dataset: data.Dataset, repeats: int) -> dict[str, list[float]]:
    """The full test split as one compiled call: counts only, against the trainer's call that
    also stacks the probabilities and computes every metric."""
    trainer = Trainer(config, dataset)
    c = dataset.spec.num_classes

    def counts_only(state, test):
        def one(total, batch):
            images, labels, mask = batch
            sums, _ = trainer.steps.eval_step(state, (images, labels), mask)
            return jax.tree.map(jnp.add, total, sums), None

        zeros = steps.EvalSums(
            jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((c, c), jnp.int32)
        )
        batches = (test.images_KxBxHxW, test.labels_KxB, test.mask_KxB)
        return jax.lax.scan(one, zeros, batches)[0]

    counts = jax.jit(counts_only)
    calls = {
        "counts only": lambda: counts(trainer.state, trainer.test),
        "counts + all metrics": trainer.evaluate,
    }
    timings: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        jax.block_until_ready(call())  # compile, off the clock
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            timings[name].append(time.perf_counter() - t0)
    return timings


def matmul_gflops(size: int = 4096, repeats: int = 5) -> float:
    """The backend's float32 matmul rate at its default precision (best of `repeats`): what a
    compute-bound model's forward pass can at most reach."""
    a = jnp.ones((size, size), jnp.float32)
    square = jax.jit(lambda a: a @ a)
    jax.block_until_ready(square(a))
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(square(a))
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def evaluations(
    configs: dict[str, Config],
    dataset: data.Dataset,
    repeats: int,
    flops: dict[str, int],
    rate: float,
) -> dict[str, Any]:
    """`eval_seconds` of each model, with the floor of its forward pass at the matmul `rate`."""
    num_test = len(dataset.test.labels)
    result: dict[str, Any] = {"repeats": repeats, "matmul_gflops": rate, "models": {}}
    for name, config in configs.items():
        timings = eval_seconds(config, dataset, repeats)
        floor = flops[name] * num_test / (rate * 1e9)
        result["models"][name] = {**timings, "forward_floor_seconds": floor}
        print(f"evaluation, {name}: {json.dumps(timings)}", flush=True)
    return result


def print_table(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores; {m['backend']} ({m['device_kind']})")
    print(f"jax {m['jax']}, flax {m['flax']}, optax {m['optax']}")
    for name, model in results["models"].items():
        print(
            f"{name} model: {model['params']:,} parameters, "
            f"{model['flops_per_example'] / 1e6:.2f} MFLOP per example forward"
        )
    print()
    t = results.get("throughput")
    if t:
        rates, gflops, share = t["examples_per_sec"], t["gflops"], t["share_of_matmul_rate"]
        print(
            f"classic CNN, Adam, batch {t['batch_size']}, {t['steps']} steps after warm-up "
            f"({t['train_flops_per_example'] / 1e6:.1f} MFLOP per example and step):"
        )
        for name, label in (("flax_style", "Flax-style loop"), ("trainer", "mnist-jax Trainer")):
            print(
                f"  {label:<40} {rates[name]:>10,.0f} examples/s {gflops[name]:>7.1f} GFLOP/s "
                f"({100 * share[name]:.0f}% of the matmul rate)"
            )
        print(f"  {'ratio Trainer / Flax-style':<40} {t['trainer_over_flax_style']:>10.2f}")
        print(
            f"  {'the same at the matmul rate':<40} {t['ratio_at_matmul_rate']:>10.2f} "
            f"(float32 matmul, 4096 x 4096: {t['matmul_gflops']:,.0f} GFLOP/s)\n"
        )
    f = results.get("fast")
    if f:
        epoch = f.get("flax_style_epoch")
        if epoch:
            halves = " + ".join(f"{h:.1f}" for h in epoch["halves_seconds"])
            print(
                f"yardstick: one Flax-style epoch of the classic recipe {epoch['seconds']:.1f} s "
                f"({halves}; {epoch['examples_per_sec']:,.0f} examples/s)"
            )
        for recipe in f["recipes"].values():
            print_runs(recipe)
        print()
    e = results.get("eval_seconds")
    if e:
        print(f"full test evaluation ({e['repeats']} repeats): median / min s")
        for model, timings in e["models"].items():
            for name in ("counts only", "counts + all metrics"):
                s = timings[name]
                label = f"{model}: {name}"
                print(f"  {label:<40} {statistics.median(s):>7.3f} {min(s):>7.3f}")
            floor = timings["forward_floor_seconds"]
            print(f"  {model + ': forward FLOPs at the matmul rate':<40} {floor:>7.3f}")
        print(f"  (float32 matmul, 4096 x 4096: {e['matmul_gflops']:,.0f} GFLOP/s)")


def print_runs(recipe: dict[str, Any]) -> None:
    print(f"{recipe['command']}:")
    print(
        f"  {'cache':>5} {'W&B':>8} {'seed':>4} {'test acc':>9} {'wall s':>7} {'compile s':>10} "
        f"{'built/hit/traced':>16} {'train+eval s':>12} {'total s':>8} {'examples/s':>11} "
        f"{'wall/epoch':>11}"
    )
    for r in recipe["runs"]:
        ratio = r.get("wall_over_flax_style_epoch")
        programs = f"{r['compiled_programs']}/{r['compile_cache_hits']}/{r['traced_programs']}"
        print(
            f"  {r['compilation_cache']:>5} {r.get('wandb', 'disabled'):>8} {r['seed']:>4} "
            f"{100 * r['test_accuracy']:>8.2f}% "
            f"{r['process_wall_seconds']:>7.1f} {r['compile_seconds']:>10.1f} "
            f"{programs:>16} {r['train_seconds'] + r['eval_seconds']:>12.3f} "
            f"{r['total_seconds']:>8.2f} {r['train_examples_per_sec']:>11,.0f} "
            f"{'' if ratio is None else f'{ratio:.2f}':>11}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get(data.DATA_DIR_ENV))
    parser.add_argument("--steps", type=int, default=200, help="steps timed per loop (0: skip)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the recipes' runs")
    parser.add_argument(
        "--recipe",
        action="append",
        type=Path,
        help="a recipe timed to accuracy (repeatable; default experiments/fast.toml)",
    )
    parser.add_argument("--eval-repeats", type=int, default=5, help="0: skip evaluation")
    parser.add_argument("--no-fast", action="store_true", help="skip the recipes' runs")
    parser.add_argument(
        "--no-epoch", action="store_true", help="skip the Flax-style epoch (no ratio)"
    )
    args = parser.parse_args()

    dataset = data.load_dataset("mnist", args.data_dir)
    classic = Config()  # the classic CNN, Adam, batch 128
    fast = config_from(FAST, {})
    results: dict[str, Any] = {"machine": machine(), "models": {}}
    for name, config in (("classic", classic), ("fast", fast)):
        described = models.describe(config, dataset.spec)
        results["models"][name] = {
            "params": described["params"],
            "flops_per_example": described["flops_per_example"],
            "train_flops_per_example": described["train_flops_per_example"],
        }
    rate = matmul_gflops() if args.steps > 0 or args.eval_repeats > 0 else math.nan
    if args.steps > 0:
        train_flops = results["models"]["classic"]["train_flops_per_example"]
        results["throughput"] = throughput(classic, dataset, args.steps, train_flops, rate)
        print(f"throughput: {json.dumps(results['throughput']['examples_per_sec'])}", flush=True)
    if not args.no_fast:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        results["fast"] = time_to_accuracy(
            classic, dataset, args.recipe or [FAST], seeds, args.data_dir, epoch=not args.no_epoch
        )
    if args.eval_repeats > 0:
        flops = {name: model["flops_per_example"] for name, model in results["models"].items()}
        configs = {"fast": fast, "classic": classic}
        for name, config in list(configs.items()):
            # the same model with its first block computed the other way
            chosen = stem_matmul(config.stem, config.pool, jax.default_backend())
            other = "conv" if chosen else "matmul"
            configs[f"{name}, stem {other}"] = config.replace(stem=other)
            flops[f"{name}, stem {other}"] = flops[name]
        results["eval_seconds"] = evaluations(configs, dataset, args.eval_repeats, flops, rate)
    print_table(results)
    print()
    write_results(RESULTS, **{k: v for k, v in results.items() if k != "machine"})


if __name__ == "__main__":
    main()
