"""`mnist-jax sweep`: spec expansion, the trial table, and trials trained as one program.

The equivalence tests are the point: a trial of a sweep ends with the metrics of the same config
trained alone by `train`: bit-identical when the trials run one after another (the same
program), to float tolerance when they are mapped over a trial axis (another program).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_jax.errors import UserError
from mnist_jax.sweep import spec as spec_lib
from mnist_jax.sweep import table

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "train_examples": 512,
    "test_examples": 300,
    "conv_features": [8, 16],
    "dense_features": 32,
    "batch_size": 64,
    "eval_batch_size": 128,
    "epochs": 2,
    "log_every": 3,
    "wandb": "disabled",
}


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def toml_table(values: dict) -> str:
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())


def tiny_spec(tmp_path: Path, sweep: str, base: dict | None = None) -> Path:
    base = {**TINY, **(base or {})}
    return write_spec(tmp_path / "spec.toml", f"[base]\n{toml_table(base)}\n{sweep}\n")


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------


def test_a_grid_crossed_with_zipped_lists(tmp_path):
    path = write_spec(
        tmp_path / "s.toml",
        'name = "g"\n[grid]\nlr = [0.1, 0.2]\nseed = [0, 1, 2]\n'
        "[zip]\nmomentum = [0.5, 0.9]\nbeta2 = [0.9, 0.99]\n",
    )
    sweep = spec_lib.load_spec(path, {"runs_dir": str(tmp_path / "runs")})
    values = [t.values for t in sweep.trials]
    assert len(values) == 2 * 3 * 2
    assert sweep.swept == ("lr", "seed", "momentum", "beta2")
    expected = [
        {"lr": lr, "seed": seed, "momentum": m, "beta2": b}
        for lr in (0.1, 0.2)
        for seed in (0, 1, 2)
        for m, b in ((0.5, 0.9), (0.9, 0.99))
    ]
    assert values == expected
    for trial in sweep.trials:
        config = trial.config
        assert (config.lr, config.seed, config.momentum) == (
            trial.values["lr"],
            trial.values["seed"],
            trial.values["momentum"],
        )
        assert Path(config.runs_dir) == tmp_path / "runs" / "g"
        assert config.wandb_group == "g" and config.name == trial.name
    assert [t.name for t in sweep.trials][:2] == ["trial-00", "trial-01"]


def test_a_base_recipe_file_and_flags_under_the_swept_values(tmp_path):
    (tmp_path / "recipe.toml").write_text('optimizer = "sgd"\nepochs = 7\nbatch_size = 32\n')
    path = write_spec(
        tmp_path / "s.toml", 'config = "recipe.toml"\n[base]\nepochs = 5\n[grid]\nlr = [0.1]\n'
    )
    (trial,) = spec_lib.load_spec(path, {"batch_size": 16, "lr": None}).trials
    assert (trial.config.optimizer, trial.config.epochs, trial.config.batch_size) == (
        "sgd",
        5,
        16,
    )


def test_random_samples_stay_in_range_log_uniform_for_rates(tmp_path):
    path = write_spec(
        tmp_path / "s.toml",
        "[random]\ntrials = 400\nseed = 3\nlr = [1e-4, 1e-1]\nmomentum = [0.5, 0.9]\n",
    )
    trials = spec_lib.load_spec(path, {}).trials
    lrs = np.array([t.config.lr for t in trials])
    momenta = np.array([t.config.momentum for t in trials])
    assert lrs.min() >= 1e-4 and lrs.max() <= 1e-1
    assert momenta.min() >= 0.5 and momenta.max() <= 0.9
    # log-uniform: each decade holds about a third of the samples (a uniform draw would put
    # 90% in the top decade); momentum is uniform: about half lies below the middle.
    decades = np.histogram(np.log10(lrs), bins=[-4, -3, -2, -1])[0] / len(lrs)
    assert np.all(np.abs(decades - 1 / 3) < 0.1), decades
    assert abs(np.mean(momenta < 0.7) - 0.5) < 0.1
    again = spec_lib.load_spec(path, {}).trials
    assert [t.values for t in again] == [t.values for t in trials]  # the sampler is seeded


@pytest.mark.parametrize(
    "text, flags, fragment",
    [
        ("[grid]\nlr = []\n", {}, "must be a non-empty list"),
        ("[zip]\nlr = [0.1, 0.2]\nseed = [1]\n", {}, "different lengths"),
        ("[grid]\nlr = [0.1]\n", {"lr": 0.3}, "lr is swept by"),
        ("[grid]\nlearning_rate = [0.1]\n", {}, "unknown config key 'learning_rate'"),
        ("[grid]\nlr = [-1.0]\n", {}, "lr must be a positive number"),
        ("[grid]\nruns_dir = ['a', 'b']\n", {}, "runs_dir cannot be swept"),
        ("[base]\nepochs = 1\n", {}, "sweeps nothing"),
        ("grids = 1\n", {}, "unknown key 'grids'"),
        ("[random]\nlr = [1e-4, 1e-1]\n", {}, "needs trials = N"),
        ("[random]\ntrials = 2\nlr = [0.0, 1e-1]\n", {}, "log-uniformly"),
        ("[random]\ntrials = 2\nseed = [0, 9]\nlr = [1e-4, 1e-1]\n", {}, "sampler's own seed"),
        # counted before any trial is built: a billion would not fit in memory
        ("[random]\ntrials = 1000000000\nlr = [1e-4, 1e-1]\n", {}, "makes 1000000000 trials"),
        ("[grid]\nlr = [1e-3, 1e-3]\n", {}, "lists 0.001 more than once"),
        ("[grid]\nlr = [1e-3]\n[zip]\nlr = [5e-3]\n", {}, "lr is in both [grid] and [zip]"),
        ("[zip]\nlr = [1e-3]\n[random]\ntrials = 2\nlr = [1e-4, 1e-1]\n", {}, "lr is in both"),
        ('name = ".."\n[grid]\nlr = [0.1]\n', {}, "plain directory name, got '..'"),
        ('name = "."\n[grid]\nlr = [0.1]\n', {}, "plain directory name, got '.'"),
        ('name = "a\\u0000b"\n[grid]\nlr = [0.1]\n', {}, "plain directory name"),
    ],
)
def test_a_bad_spec_is_one_clear_error(tmp_path, text, flags, fragment):
    path = write_spec(tmp_path / "s.toml", text)
    with pytest.raises(UserError, match=None) as e:
        spec_lib.load_spec(path, flags)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_the_samplers_seed_beside_a_grid_of_seeds(tmp_path):
    text = "[grid]\nseed = [0, 1]\n[random]\ntrials = 3\nseed = 7\nlr = [1e-4, 1e-1]\n"
    trials = spec_lib.load_spec(write_spec(tmp_path / "s.toml", text), {}).trials
    assert [t.config.seed for t in trials] == [0, 0, 0, 1, 1, 1]
    assert [t.config.lr for t in trials[:3]] == [t.config.lr for t in trials[3:]]


@pytest.mark.parametrize(
    "saved, fragment",
    [
        ({"name": "s", "swept": ["lr"], "trials": []}, "lists no trials"),
        ({"swept": ["lr"], "trials": [{"name": "trial-00", "values": {}}]}, "is damaged"),
        ({"name": "s", "swept": ["lr"], "trials": [{"name": "trial-00"}]}, "is damaged"),
    ],
)
def test_resuming_a_damaged_sweep_record_is_one_clear_error(tmp_path, saved, fragment):
    from mnist_jax.sweep import run

    (tmp_path / table.SWEEP_FILE).write_text(json.dumps(saved))
    with pytest.raises(UserError) as e:
        run.resume_sweep(tmp_path, {})
    assert fragment in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="sweep.json is not a sweep directory"):
        run.resume_sweep(tmp_path / table.SWEEP_FILE, {})  # the file, not its directory


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def test_the_spread_over_seeds_matches_numpy():
    rng = np.random.default_rng(0)
    rows, expected = [], {}
    for lr in (0.1, 0.01):
        accuracies = rng.uniform(0.9, 1.0, size=5)
        expected[lr] = accuracies
        for seed, acc in enumerate(accuracies):
            rows.append(
                {
                    "trial": f"t{lr}{seed}",
                    "status": "completed",
                    "lr": lr,
                    "seed": seed,
                    table.ACCURACY: float(acc),
                }  # fmt: skip
            )
    rows.append({"trial": "x", "status": "failed", "lr": 0.1, "seed": 9, table.ACCURACY: 0.0})
    summary = {r["lr"]: r for r in table.spread(rows, ["lr", "seed"])}
    for lr, accuracies in expected.items():
        assert summary[lr]["trials"] == 5  # the failed trial does not count
        assert math.isclose(summary[lr]["mean"], np.mean(accuracies), rel_tol=1e-12)
        assert math.isclose(summary[lr]["std"], np.std(accuracies, ddof=1), rel_tol=1e-12)
        assert summary[lr]["min"] == accuracies.min() and summary[lr]["max"] == accuracies.max()
    best = max(expected, key=lambda lr: expected[lr].mean())
    assert table.spread(rows, ["lr", "seed"])[0]["lr"] == best


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def run_sweep(spec: Path, runs: Path, mnist_dir: Path, **kwargs):
    from mnist_jax.signals import StopRequest
    from mnist_jax.sweep.run import sweep

    flags = {"data_dir": str(mnist_dir)}
    if kwargs.get("resume") is None:
        flags["runs_dir"] = str(runs)
    stop = kwargs.pop("stop", None) or StopRequest()
    return sweep(spec, flags, stop=stop, **kwargs)


def trained_alone(config, runs: Path) -> Path:
    from mnist_jax.signals import StopRequest
    from mnist_jax.train import fit

    config = config.replace(runs_dir=str(runs), name="alone", wandb_group=None)
    assert fit(config, StopRequest()) == 0
    return runs / "alone"


def results(run: Path) -> tuple[dict, np.ndarray]:
    summary = json.loads((run / "summary.json").read_text())
    with np.load(run / "predictions.npz") as f:
        probs = f["probs"]
    keys = ("test/accuracy", "test/loss", "train/loss", "train/accuracy", "step")
    return {k: summary[k] for k in keys}, probs


@pytest.fixture(scope="module")
def lr_seed_sweep(tmp_path_factory, mnist_dir):
    """Three trials (two learning rates, two seeds) mapped as one program, and the same three
    one after another."""
    tmp = tmp_path_factory.mktemp("sweep")
    spec = tiny_spec(
        tmp, "[zip]\nlr = [1e-3, 3e-3, 3e-3]\nseed = [0, 0, 1]\nlabel_smoothing = [0.0, 0.1, 0.0]\n"
    )
    assert run_sweep(spec, tmp / "mapped", mnist_dir, max_parallel=3, name="s") == 0
    assert run_sweep(spec, tmp / "loop", mnist_dir, max_parallel=1, name="s") == 0
    return tmp


@pytest.mark.slow
def test_trials_one_after_another_equal_train_bit_for_bit(lr_seed_sweep):
    from mnist_jax.config import build_config

    sweep_dir = lr_seed_sweep / "loop" / "s"
    saved = table.read_sweep(sweep_dir)
    for trial in (saved["trials"][0], saved["trials"][2]):
        config = build_config(trial["config"])
        alone = trained_alone(config, lr_seed_sweep / f"alone-{trial['name']}")
        (a, probs_a), (b, probs_b) = results(sweep_dir / trial["name"]), results(alone)
        assert a == b
        np.testing.assert_array_equal(probs_a, probs_b)
        summary = json.loads((sweep_dir / trial["name"] / "summary.json").read_text())
        assert summary["status"] == "completed"


@pytest.mark.slow
def test_mapped_trials_equal_train_to_float_tolerance(lr_seed_sweep):
    mapped, loop = lr_seed_sweep / "mapped" / "s", lr_seed_sweep / "loop" / "s"
    for trial in ("trial-00", "trial-01", "trial-02"):
        (a, probs_a), (b, probs_b) = results(mapped / trial), results(loop / trial)
        assert a["step"] == b["step"]
        for key in ("test/loss", "train/loss"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4), (trial, key, a[key], b[key])
        np.testing.assert_allclose(probs_a, probs_b, atol=2e-4)
        # a prediction may flip only where two classes tie to float error: at most one image
        assert abs(a["test/accuracy"] - b["test/accuracy"]) <= 1 / 300 + 1e-9
    # the trials really differ: each has its own rate, seed and data order
    losses = {results(mapped / t)[0]["train/loss"] for t in ("trial-00", "trial-01", "trial-02")}
    assert len(losses) == 3


@pytest.mark.slow
def test_every_trial_has_a_complete_record_and_the_table_lists_them(lr_seed_sweep):
    sweep_dir = lr_seed_sweep / "mapped" / "s"
    with (sweep_dir / table.TABLE_FILE).open() as f:
        lines = f.read().splitlines()
    assert len(lines) == 1 + 3 and lines[0].startswith("trial,status,lr,seed,label_smoothing")
    accuracies = [float(line.split(",")[5]) for line in lines[1:]]
    assert accuracies == sorted(accuracies, reverse=True)
    for trial in ("trial-00", "trial-01", "trial-02"):
        run = sweep_dir / trial
        for name in ("config.json", "summary.json", "metrics.jsonl", "predictions.npz"):
            assert (run / name).is_file(), (trial, name)
        config = json.loads((run / "config.json").read_text())["config"]
        assert config["wandb_group"] == "s" and config["name"] == trial
        events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [e["epoch"] for e in events if "test/accuracy" in e] == [1, 2]
        assert sorted({e["step"] for e in events if "train/lr" in e})[:3] == [3, 6, 8]


@pytest.mark.slow
def test_a_diverging_trial_fails_alone(tmp_path, mnist_dir):
    base = {"optimizer": "sgd", "schedule": "constant", "epochs": 2}
    spec = tiny_spec(tmp_path, "[grid]\nlr = [0.05, 1e12, 0.1]\n", base)
    assert run_sweep(spec, tmp_path / "mapped", mnist_dir, max_parallel=3, name="s") == 0
    sweep_dir = tmp_path / "mapped" / "s"
    statuses = {}
    for trial in ("trial-00", "trial-01", "trial-02"):
        statuses[trial] = json.loads((sweep_dir / trial / "summary.json").read_text())
    assert statuses["trial-01"]["status"] == "failed"
    assert "non-finite" in statuses["trial-01"]["message"]
    assert statuses["trial-00"]["status"] == statuses["trial-02"]["status"] == "completed"
    # the survivors trained exactly as they do beside a trial that does not diverge
    tame = tiny_spec(tmp_path, "[grid]\nlr = [0.05, 0.07, 0.1]\n", base)
    assert run_sweep(tame, tmp_path / "tame", mnist_dir, max_parallel=3, name="s") == 0
    for trial in ("trial-00", "trial-02"):
        a, b = results(sweep_dir / trial), results(tmp_path / "tame" / "s" / trial)
        assert a[0] == b[0]
        np.testing.assert_array_equal(a[1], b[1])


class StopAfter:
    """A stop request that comes after `calls` checks (each check is one compiled call)."""

    def __init__(self, calls: int) -> None:
        self.calls = calls

    def __call__(self) -> bool:
        self.calls -= 1
        return self.calls < 0

    def raise_if_requested(self) -> None:
        pass


@pytest.mark.slow
@pytest.mark.parametrize("max_parallel", [1, 2])
def test_a_stopped_sweep_resumes_to_the_same_results(
    lr_seed_sweep, tmp_path, mnist_dir, max_parallel
):
    spec = tiny_spec(
        tmp_path,
        "[zip]\nlr = [1e-3, 3e-3, 3e-3]\nseed = [0, 0, 1]\nlabel_smoothing = [0.0, 0.1, 0.0]\n",
    )
    runs = tmp_path / "runs"
    code = run_sweep(spec, runs, mnist_dir, max_parallel=max_parallel, name="s", stop=StopAfter(11))
    assert code == 130
    sweep_dir = runs / "s"
    first = json.loads((sweep_dir / "trial-00" / "summary.json").read_text())
    assert first["status"] == "interrupted" and 0 < first["step"] < 16
    assert run_sweep(None, runs, mnist_dir, max_parallel=max_parallel, resume=sweep_dir) == 0
    # one after another: the uninterrupted sweep's bits; mapped in pairs (not in threes as the
    # reference): to float tolerance
    reference = lr_seed_sweep / "loop" / "s"
    for trial in ("trial-00", "trial-01", "trial-02"):
        (a, probs_a), (b, probs_b) = results(sweep_dir / trial), results(reference / trial)
        if max_parallel == 1:
            assert a == b
        else:
            assert math.isclose(a["test/loss"], b["test/loss"], rel_tol=1e-4)
            np.testing.assert_allclose(probs_a, probs_b, atol=2e-4)
    with (sweep_dir / table.TABLE_FILE).open() as f:
        assert sum(",completed," in line for line in f) == 3


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


TINY_FLAGS = (
    "--train-examples", "256", "--test-examples", "200", "--conv-features", "4,8",
    "--dense-features", "16", "--batch-size", "64", "--eval-batch-size", "100",
    "--wandb", "disabled",
)  # fmt: skip


@pytest.mark.slow
def test_the_shipped_lr_sweep_writes_eight_trials_and_the_table(tmp_path, mnist_dir):
    runs = tmp_path / "runs"
    args = ("--data-dir", str(mnist_dir), "--runs-dir", str(runs), *TINY_FLAGS)
    r = cli("sweep", "experiments/lr_sweep.toml", "--epochs", "1", *args)
    assert r.returncode == 0, r.stderr
    sweep_dir = runs / "lr-sweep"
    trials = sorted(p.name for p in sweep_dir.glob("trial-*"))
    assert trials == [f"trial-{i:02d}" for i in range(8)]
    rows = (sweep_dir / table.TABLE_FILE).read_text().splitlines()
    assert len(rows) == 9
    lrs = sorted(float(row.split(",")[2]) for row in rows[1:])
    assert lrs == [3e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2]
    assert "sweep table:" in r.stdout and "test/accuracy" in r.stdout
    # a trial is a run like any other
    r = cli("evaluate", str(sweep_dir / "trial-03"))
    assert r.returncode == 0, r.stderr
    # an existing sweep is never overwritten; a swept flag is refused
    before = (sweep_dir / table.SWEEP_FILE).read_bytes()
    r = cli("sweep", "experiments/lr_sweep.toml", "--epochs", "1", *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--resume" in r.stderr
    assert (sweep_dir / table.SWEEP_FILE).read_bytes() == before
    for flags, fragment in (
        (("--lr", "0.1"), "lr is swept by"),
        (("--distributed",), "--distributed is for train"),
        (("--devices", "2"), "drop --devices"),
    ):
        r = cli("sweep", "experiments/lr_sweep.toml", *flags, "--name", "x", *args)
        assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr
        assert r.stderr.count("\n") == 1
    assert not (runs / "x").exists()
    # a completed sweep resumes to nothing new
    r = cli("sweep", "--resume", str(sweep_dir))
    assert r.returncode == 0, r.stderr
    assert "0 of 8 trials to train" in r.stdout


def test_the_spread_groups_list_values_such_as_layer_widths():
    rows = [
        {
            "trial": f"t{i}",
            "status": "completed",
            "conv_features": widths,
            "seed": i,
            table.ACCURACY: acc,
        }  # fmt: skip
        for i, (widths, acc) in enumerate([([8], 0.9), ([8], 0.8), ([8, 16], 0.95)])
    ]
    summary = table.spread(rows, ["conv_features", "seed"])
    assert [(r["conv_features"], r["trials"]) for r in summary] == [([8, 16], 1), ([8], 2)]
    assert math.isclose(summary[1]["mean"], 0.85) and math.isclose(
        summary[1]["std"], np.std([0.9, 0.8], ddof=1)
    )
