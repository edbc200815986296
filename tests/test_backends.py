"""Every backend: deterministic mode, the compilation cache, what a run says about its devices."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
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


@pytest.fixture
def kept_programs(tmp_path, monkeypatch):
    """The directory `compile_program` keeps programs in, as a compilation cache makes it."""
    directory = tmp_path / "programs"
    monkeypatch.setattr(parallel, "_programs_dir", directory)
    return directory


def affine(params, x_NxD):
    """A program with structured arguments and results, whose result numpy can check."""
    return {"y": x_NxD @ params["w"] + params["b"], "n": jnp.sum(x_NxD > 0)}


def affine_args():
    """Small whole numbers: exact in float32 whatever precision a backend's matmul uses."""
    rng = np.random.default_rng(0)
    params = {"w": rng.integers(-3, 4, (5, 3)).astype(np.float32), "b": np.float32([1, 2, 3])}
    return params, rng.integers(-3, 4, (7, 5)).astype(np.float32)


def test_a_kept_program_is_reused_without_tracing_and_computes_the_same(kept_programs):
    params, x = affine_args()
    traced = []

    def example_args():
        traced.append(True)
        return params, x

    with parallel.count_compilations() as first_counts:
        first = parallel.compile_program(affine, example_args, key={"width": 3})
    assert traced == [True] and first_counts["traced"] == 1
    assert [p.name.split("-")[0] for p in kept_programs.iterdir()] == ["affine"]

    def must_not_trace():
        raise AssertionError("a kept program was traced again")

    with parallel.count_compilations() as counts:
        again = parallel.compile_program(affine, must_not_trace, key={"width": 3})
    assert counts["traced"] == 0
    direct = parallel.compile(affine, params, x)
    expected = x.astype(np.float64) @ params["w"] + params["b"]
    for program in (first, again):
        result = program(params, x)
        np.testing.assert_array_equal(result["y"], expected)
        assert int(result["n"]) == int(np.sum(x > 0))
        np.testing.assert_array_equal(result["y"], direct(params, x)["y"])


def test_a_program_is_traced_again_for_another_key_code_or_a_damaged_file(
    kept_programs, monkeypatch
):
    params, x = affine_args()

    def traces(key: dict) -> int:
        with parallel.count_compilations() as counts:
            program = parallel.compile_program(affine, lambda: (params, x), key=key)
        np.testing.assert_array_equal(program(params, x)["y"], x @ params["w"] + params["b"])
        return counts["traced"]

    assert traces({"width": 3}) == 1
    assert traces({"width": 3}) == 0
    assert traces({"width": 4}) == 1  # e.g. another config's structure
    assert len(list(kept_programs.iterdir())) == 2
    monkeypatch.setattr(parallel, "_source_digest", lambda: "the code changed")
    assert traces({"width": 3}) == 1
    for path in kept_programs.iterdir():
        path.write_bytes(path.read_bytes()[:100])  # a run killed mid-write, a full disk
    assert traces({"width": 3}) == 1
    assert traces({"width": 3}) == 0  # written whole again


@pytest.mark.parametrize("failing", ["_export", "_compile_exported"])
def test_a_program_that_cannot_be_exported_is_compiled_as_it_is(
    kept_programs, monkeypatch, failing
):
    def fail(*args, **kwargs):
        raise NotImplementedError("not exportable")

    monkeypatch.setattr(parallel, failing, fail)
    params, x = affine_args()
    program = parallel.compile_program(affine, lambda: (params, x), key={})
    np.testing.assert_array_equal(program(params, x)["y"], x @ params["w"] + params["b"])
    assert not kept_programs.exists()


def test_without_flatbuffers_a_program_is_traced_each_time_and_still_runs(
    kept_programs, monkeypatch
):
    """jax.export writes and reads a program with flatbuffers, which jax leaves optional: where
    it is missing, a run goes on as if nothing were kept, and what is kept stays whole."""
    params, x = affine_args()
    parallel.compile_program(affine, lambda: (params, x), key={"kept": True})
    kept = {p.name: p.read_bytes() for p in kept_programs.iterdir()}
    monkeypatch.setitem(sys.modules, "flatbuffers", None)  # import flatbuffers: ImportError
    monkeypatch.delitem(sys.modules, "jax._src.export.serialization", raising=False)
    for key in ({"kept": True}, {"kept": False}, {"kept": False}):
        with parallel.count_compilations() as counts:
            program = parallel.compile_program(affine, lambda: (params, x), key=key)
        assert counts["traced"] == 1
        np.testing.assert_array_equal(program(params, x)["y"], x @ params["w"] + params["b"])
    assert {p.name: p.read_bytes() for p in kept_programs.iterdir()} == kept


def test_without_a_compilation_cache_nothing_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "_programs_dir", None)
    params, x = affine_args()
    with parallel.count_compilations() as counts:
        for _ in range(2):
            program = parallel.compile_program(affine, lambda: (params, x), key={})
    assert counts["traced"] == 2
    np.testing.assert_array_equal(program(params, x)["y"], x @ params["w"] + params["b"])


def test_host_scalar_arguments_are_exported_as_jax_makes_them_without_a_warning(kept_programs):
    """A Python int or float argument (a step, a learning rate) is exported with the dtype JAX
    gives it, 32-bit unless x64 is on: asking jax.export for int64 warns from jax 0.11 on."""

    def scale(x, k, lr):
        return x * k * lr

    x = np.float32([1, 2, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):  # exported, then kept
            program = parallel.compile_program(scale, lambda: (x, 3, 0.5), key={})
            np.testing.assert_array_equal(program(x, 4, 0.25), x)
    assert len(list(kept_programs.iterdir())) == 1


def test_a_kept_program_still_donates_its_arguments(kept_programs):
    def step(state, x):
        return state + x

    x = jnp.ones(4, jnp.float32)
    for _ in range(2):  # exported, then kept
        program = parallel.compile_program(
            step, lambda: (jnp.zeros(4, jnp.float32), x), key={}, donate=(0,)
        )
        state = jnp.zeros(4, jnp.float32)
        np.testing.assert_array_equal(program(state, x), np.ones(4))
        assert state.is_deleted() and not x.is_deleted()


def test_a_trainer_with_kept_programs_trains_to_the_bits_of_one_without(
    tiny_config, tmp_path, kept_programs
):
    """The trainer's five programs are exported by the first trainer and loaded, untraced, by
    the next; both train and evaluate as a trainer compiled directly does."""
    from mnist_jax import data
    from mnist_jax.trainer import Trainer

    config = tiny_config(tmp_path, epochs=1)
    dataset = data.load_dataset("mnist", config.data_dir)

    def trained() -> tuple[list[np.ndarray], dict[str, int]]:
        with parallel.count_compilations() as counts:
            trainer = Trainer(config, dataset)
        trainer.run(trainer.steps_per_epoch)
        leaves = jax.tree.leaves((trainer.state, trainer.evaluate()))
        return [np.asarray(x) for x in leaves], counts

    exported, first = trained()
    kept, second = trained()
    assert first["traced"] == 5 and second["traced"] == 0
    assert len(list(kept_programs.iterdir())) == 5
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parallel, "_programs_dir", None)
        direct, counts = trained()
        assert counts["traced"] == 5
        patch.setattr(parallel, "compiling_together", contextlib.nullcontext)
        one_by_one, _ = trained()  # each program compiled before the next is traced
    for a, b, c, d in zip(exported, kept, direct, one_by_one, strict=True):
        if parallel.backend() == "cpu":  # deterministic: same program, same bits
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)
            np.testing.assert_array_equal(a, d)
        else:  # a GPU's reductions may differ in the last bits from one execution to the next
            for other in (b, c, d):
                np.testing.assert_allclose(a, other, rtol=1e-4, atol=1e-5)


@pytest.fixture
def compiling_threads(monkeypatch):
    """The names of the threads XLA compiled on, from here on, in order; a compilation fails
    while `fail` holds a number: that many more times."""
    names: list[str] = []
    fail = [0]
    compile_now = jax.stages.Lowered.compile

    def recorded(self, *args, **kwargs):
        names.append(threading.current_thread().name)
        if fail[0]:
            fail[0] -= 1
            raise RuntimeError("XLA could not compile this")
        return compile_now(self, *args, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", recorded)
    return names, fail


def test_programs_compiled_together_compile_off_this_thread_and_compute_the_same(
    kept_programs, compiling_threads
):
    threads, _ = compiling_threads
    params, x = affine_args()
    expected = x @ params["w"] + params["b"]
    with parallel.compiling_together():
        kept = parallel.compile_program(affine, lambda: (params, x), key={})
        direct = parallel.compile(affine, params, x)
    assert len(threads) == 2 and threading.current_thread().name not in threads
    for program in (kept, direct):
        np.testing.assert_array_equal(program(params, x)["y"], expected)
    plain = parallel.compile(affine, params, x)
    assert threads[-1] == threading.current_thread().name
    np.testing.assert_array_equal(plain(params, x)["y"], expected)


def test_a_program_that_fails_to_compile_together_raises_at_the_end_of_the_block(
    compiling_threads,
):
    _, fail = compiling_threads
    fail[0] = 1
    params, x = affine_args()
    with pytest.raises(RuntimeError, match="could not compile"), parallel.compiling_together():
        parallel.compile(affine, params, x)


def test_a_kept_program_that_fails_to_compile_together_is_exported_again(
    kept_programs, compiling_threads
):
    _, fail = compiling_threads
    params, x = affine_args()
    parallel.compile_program(affine, lambda: (params, x), key={})
    fail[0] = 1  # the kept program's compilation
    with parallel.count_compilations() as counts, parallel.compiling_together():
        program = parallel.compile_program(affine, lambda: (params, x), key={})
    assert counts["traced"] == 1 and fail[0] == 0
    np.testing.assert_array_equal(program(params, x)["y"], x @ params["w"] + params["b"])


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
    assert (
        cold["compile/traced"] == 5 and warm["compile/traced"] == other_seed["compile/traced"] == 0
    )
    assert len(list((cache / parallel.PROGRAMS_DIR).iterdir())) == 5
    assert any(cache.iterdir())
    keys = [k for k in cold if k.startswith(("test/", "train/loss"))]
    assert {k: warm[k] for k in keys} == {k: cold[k] for k in keys}
    saved = json.loads((tmp_path / "warm" / "config.json").read_text())
    assert saved["config"]["deterministic"] is True


def cache_entry(path: Path, size: int, last_use: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (last_use, last_use))
    return path


def test_the_compilation_cache_is_pruned_least_recently_used_first(tmp_path):
    """Over the bound, the oldest entries go (XLA's and kept programs alike) until 3/4 of it
    is left; other files stay, and a cache under its bound is left as it is."""
    kb = 1024
    entries = [
        cache_entry(tmp_path / "jit_train-aa-cache", 300 * kb, 1_000),
        cache_entry(tmp_path / parallel.PROGRAMS_DIR / "init-bb.pkl", 100 * kb, 2_000),
        cache_entry(tmp_path / "jit_evaluate-cc-cache", 300 * kb, 3_000),
        cache_entry(tmp_path / "jit_init-dd-cache", 200 * kb, 4_000),
        cache_entry(tmp_path / parallel.PROGRAMS_DIR / "evaluate-ee.pkl", 100 * kb, 5_000),
    ]
    other = cache_entry(tmp_path / "notes.txt", 900 * kb, 0)
    assert parallel.prune_compilation_cache(tmp_path, 1_000 * kb) == []
    # 1,000 kB over a bound of 800 kB: the oldest go until at most 600 kB are left.
    removed = parallel.prune_compilation_cache(tmp_path, 800 * kb)
    assert removed == entries[:2]
    assert [p.exists() for p in entries] == [False, False, True, True, True]
    assert other.exists()


def test_turning_the_cache_on_keeps_it_under_its_bound(tmp_path, monkeypatch):
    monkeypatch.setenv(parallel.COMPILATION_CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(parallel.COMPILATION_CACHE_MAX_ENV, "1")
    monkeypatch.setattr(parallel, "_programs_dir", None)
    settings = {}
    monkeypatch.setattr(jax.config, "update", lambda name, value: settings.update({name: value}))
    old = cache_entry(tmp_path / "jit_old-aa-cache", 2**20, 1_000)
    recent = cache_entry(tmp_path / "jit_recent-bb-cache", 2**19, 2_000)
    assert parallel.use_compilation_cache() == tmp_path
    assert not old.exists() and recent.exists()
    assert settings["jax_compilation_cache_dir"] == str(tmp_path)


def test_a_kept_program_is_marked_used_when_loaded(kept_programs):
    params, x = affine_args()
    parallel.compile_program(affine, lambda: (params, x), key={})
    (path,) = kept_programs.iterdir()
    os.utime(path, (1_000, 1_000))
    parallel.compile_program(affine, lambda: (params, x), key={})
    assert path.stat().st_mtime > 1_000_000


@pytest.mark.parametrize("value", ["lots", "0"])
def test_a_bad_cache_bound_is_one_line_before_anything_changes(tmp_path, monkeypatch, value):
    monkeypatch.setenv(parallel.COMPILATION_CACHE_ENV, str(tmp_path / "xla"))
    monkeypatch.setenv(parallel.COMPILATION_CACHE_MAX_ENV, value)
    before = jax.config.jax_compilation_cache_dir
    with pytest.raises(UserError, match=parallel.COMPILATION_CACHE_MAX_ENV):
        parallel.use_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == before
    assert not (tmp_path / "xla").exists()


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
