"""A plain `pip install mnist-jax` (no extras) is enough for the main job: train (with the
compilation cache and W&B offline), evaluate and analyze import nothing outside the package's
declared dependencies and theirs, even where this environment has more installed (CI installs
the extras, whose packages could otherwise hide a dependency the package forgot to declare)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]

try:  # what the package declares is read from its installed metadata
    importlib.metadata.distribution("mnist-jax")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("mnist-jax is not installed (pip install -e .)", allow_module_level=True)

# Run in the subprocess before the CLI: a module of a distribution outside the declared ones
# is absent, as on a machine that has only what `pip install mnist-jax` installs.
ONLY_DECLARED = r"""
import json, os, sys

absent = frozenset(json.loads(os.environ["UNDECLARED_MODULES"]))

class OnlyDeclared:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in absent:
            return None  # imports raise ModuleNotFoundError, importlib.util.find_spec is None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, name):
        return getattr(self.finder, name)

sys.meta_path[:] = [OnlyDeclared(finder) for finder in sys.meta_path]
import cli
sys.argv[0] = "mnist-jax"
cli.run()
"""


def declared_distributions(root: str = "mnist-jax") -> set[str]:
    """`root` and what its requirements need, transitively, without extras it does not ask
    for, for this platform's markers."""
    todo = [(root, frozenset({""}))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        try:
            requirements = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue  # optional at runtime, and not installed here either
        for text in requirements:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in extras):
                todo.append((requirement.name, frozenset({"", *requirement.extras})))
    return {name for name, _ in seen}


def undeclared_modules() -> list[str]:
    """Top-level modules that only distributions outside the declared ones provide."""
    declared = declared_distributions()
    return sorted(
        module
        for module, distributions in importlib.metadata.packages_distributions().items()
        if not {canonicalize_name(d) for d in distributions} & declared
    )


def test_the_declared_closure_follows_requirements_and_leaves_out_unasked_extras():
    declared = declared_distributions()
    assert {"mnist-jax", "jax", "jaxlib", "flax", "optax", "wandb", "typer"} <= declared
    assert "numpy" in declared  # through jax too
    assert "flatbuffers" in declared  # jax leaves it optional; kept programs need it
    assert not {"pytest", "scikit-learn", "tensorflow-datasets"} & declared  # extras
    modules = undeclared_modules()
    assert "pytest" in modules and "_pytest" in modules  # the dev extra's, running this test
    assert "jax" not in modules and "mnist_jax" not in modules


def only_declared(*args: str, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", ONLY_DECLARED, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **env, "UNDECLARED_MODULES": json.dumps(undeclared_modules())},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
def test_the_main_job_needs_only_the_declared_dependencies(tmp_path, mnist_dir):
    wandb_dir = tmp_path / "wandb"
    env = {
        "MNIST_JAX_COMPILATION_CACHE": str(tmp_path / "xla"),  # the default: on
        "WANDB_MODE": "offline",
        **{v: str(wandb_dir) for v in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")},
    }
    runs, run = tmp_path / "runs", tmp_path / "runs" / "plain"
    only_declared(
        "train", "--data-dir", str(mnist_dir), "--runs-dir", str(runs), "--name", "plain",
        "--train-examples", "512", "--test-examples", "300", "--conv-features", "8,16",
        "--dense-features", "32", "--epochs", "1", "--wandb", "offline", env=env,
    )  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert sum(map(sum, summary["test/confusion_matrix"])) == 300
    assert any((tmp_path / "xla").rglob("*.pkl"))  # the programs kept for the next run
    assert any(wandb_dir.rglob("*.wandb"))
    only_declared("evaluate", str(run), "--data-dir", str(mnist_dir), env=env)
    evaluated = json.loads((run / "eval.json").read_text())  # the best epoch: the only one
    assert evaluated["test/accuracy"] == pytest.approx(summary["test/accuracy"], abs=1e-6)
    out = tmp_path / "report"
    only_declared(
        "analyze", "--data-dir", str(mnist_dir), "--runs", str(run), "--out", str(out), env=env
    )
    assert (out / "report.html").stat().st_size > 0
