"""Every backend: deterministic mode, the compilation cache, what a run says about its devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mnist_jax import parallel, train
from mnist_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_deterministic_mode_adds_xlas_gpu_switches_before_the_backend_starts(monkeypatch):
    monkeypatch.setattr(parallel, "_backends_started", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    parallel.use_deterministic_ops()
    flags = os.environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_dump_to=/tmp/x"
    assert set(parallel.DETERMINISTIC_GPU_FLAGS) <= set(flags)
    parallel.use_deterministic_ops()  # idempotent
    assert os.environ["XLA_FLAGS"].split() == flags


def test_deterministic_mode_is_refused_on_a_gpu_that_started_without_it(monkeypatch):
    monkeypatch.setattr(parallel, "_backends_started", lambda: True)
    monkeypatch.setattr(parallel.jax, "default_backend", lambda: "gpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    with pytest.raises(UserError, match="before JAX starts.*XLA_FLAGS="):
        parallel.use_deterministic_ops()
    monkeypatch.setattr(parallel.jax, "default_backend", lambda: "cpu")
    parallel.use_deterministic_ops()  # XLA:CPU is deterministic already


def test_an_accelerator_left_unused_is_named(monkeypatch):
    monkeypatch.setattr(parallel.jax, "default_backend", lambda: "cpu")
    for var in ("COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE"):
        monkeypatch.delenv(var, raising=False)
    real_exists = Path.exists
    present: set[str] = set()
    monkeypatch.setattr(Path, "exists", lambda p: str(p) in present or real_exists(p))
    if not any(real_exists(Path(p)) for p in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/accel0")):
        assert parallel.accelerator_hint() is None
    present.add("/dev/nvidia0")
    assert "mnist-jax[cuda]" in parallel.accelerator_hint()
    present.clear()
    monkeypatch.setenv("COLAB_TPU_ADDR", "10.0.0.2:8470")
    assert "mnist-jax[tpu]" in parallel.accelerator_hint()
    monkeypatch.setattr(parallel.jax, "default_backend", lambda: "tpu")
    assert parallel.accelerator_hint() is None


def test_a_run_warns_when_jax_runs_on_the_cpu_beside_an_accelerator(
    tiny_config, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(parallel, "accelerator_hint", lambda: "an NVIDIA GPU is present: ...")
    with pytest.warns(UserWarning, match="JAX is running on the CPU, but an NVIDIA GPU"):
        assert train.fit(tiny_config(tmp_path, name="hint", epochs=1)) == 0
    assert capsys.readouterr().out.startswith(f"backend: {parallel.backend()}, ")


def test_programs_compiled_for_compile_speed_compute_xlas_default_bits(tiny_config, tmp_path):
    """On the CPU the run-once programs are compiled at a lower LLVM level, the rest one below
    the default: initialisation, training and evaluation give the bits XLA's defaults give."""
    from mnist_jax import data
    from mnist_jax.trainer import Trainer

    if parallel.backend() == "cpu":
        assert parallel.compiler_options(once=True) != parallel.compiler_options() is not None
    config = tiny_config(tmp_path, epochs=1)
    dataset = data.load_dataset("mnist", config.data_dir)

    def trained(options: object) -> list[np.ndarray]:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(parallel, "compiler_options", options)
            trainer = Trainer(config, dataset)
        initial = parallel.fetch(trainer.state)
        trainer.run(trainer.steps_per_epoch)
        evaluation = trainer.evaluate()
        return [np.asarray(x) for x in jax.tree.leaves((initial, trainer.state, evaluation))]

    fast, default = trained(parallel.compiler_options), trained(lambda once=False: None)
    assert len(fast) == len(default)
    for a, b in zip(fast, default, strict=True):
        np.testing.assert_array_equal(a, b)


def run_cli(*args: str, env: dict) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_the_compilation_cache_makes_a_second_run_compile_nothing(tmp_path, mnist_dir):
    """Five programs a run (init, permutation, schedule, train chunk, evaluation); a second
    run with the same shapes reads all of them from the persistent cache, to the same bits,
    and so does a run with another seed (the seed is an argument of the programs)."""
    cache = tmp_path / "xla"
    common = [
        "train", "--data-dir", str(mnist_dir), "--runs-dir", str(tmp_path),
        "--train-examples", "512", "--test-examples", "300", "--conv-features", "8,16",
        "--dense-features", "32", "--batch-size", "64", "--epochs", "2", "--wandb", "disabled",
        "--deterministic",
    ]  # fmt: skip
    summaries = []
    for name, seed in (("cold", "0"), ("warm", "0"), ("other-seed", "1")):
        env = {"MNIST_JAX_COMPILATION_CACHE": str(cache)}
        run_cli(*common, "--name", name, "--seed", seed, env=env)
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
    cold, warm, other_seed = summaries
    assert other_seed["compile/cache_hits"] == 5
    assert cold["compile/programs"] == 5 and cold["compile/cache_hits"] == 0
    assert warm["compile/programs"] == 5 and warm["compile/cache_hits"] == 5
    assert any(cache.iterdir())
    keys = [k for k in cold if k.startswith(("test/", "train/loss"))]
    assert {k: warm[k] for k in keys} == {k: cold[k] for k in keys}
    saved = json.loads((tmp_path / "warm" / "config.json").read_text())
    assert saved["config"]["deterministic"] is True


@pytest.mark.slow
def test_the_compilation_cache_can_be_turned_off(tmp_path, mnist_dir, monkeypatch):
    home = tmp_path / "home"
    env = {"MNIST_JAX_COMPILATION_CACHE": "off", "XDG_CACHE_HOME": str(home)}
    args = [
        "train", "--data-dir", str(mnist_dir), "--runs-dir", str(tmp_path), "--name", "off",
        "--train-examples", "256", "--test-examples", "100", "--conv-features", "4",
        "--dense-features", "8", "--epochs", "1", "--wandb", "disabled",
    ]  # fmt: skip
    run_cli(*args, env=env)
    assert not (home / "mnist-jax" / "xla").exists()
    summary = json.loads((tmp_path / "off" / "summary.json").read_text())
    assert summary["compile/cache_hits"] == 0
