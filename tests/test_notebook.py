"""notebooks/colab.ipynb, executed top to bottom on the CPU with a tiny model, as CI runs it.

The kernel is this interpreter (a kernelspec written for `sys.executable` into a temporary
folder), so the test needs no Jupyter set up for the user, and the notebook finds the checkout it
runs in and installs nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# The dev extra's Jupyter packages; a machine without them (a bare accelerator image) skips.
for module in ("nbformat", "nbclient", "ipykernel"):
    pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[dev]')")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab.ipynb"
TINY = (
    "--train-examples 512 --test-examples 300 --epochs 1 --conv-features 8,16 "
    "--dense-features 32 --batch-size 64 --log-every 4"
)


def read_notebook():
    import nbformat

    return nbformat.read(NOTEBOOK, as_version=4)


def execute(nb, tmp_path: Path):
    """Runs `nb` in a fresh kernel of this interpreter, from the checkout; returns it executed."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    kernels = tmp_path / "kernels"
    write_kernel_spec(kernels / "mnist-jax-test")
    km = AsyncKernelManager(
        kernel_name="mnist-jax-test",
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]),
    )
    client = NotebookClient(nb, km=km, timeout=300, resources={"metadata": {"path": str(REPO)}})
    return client.execute()


@pytest.fixture
def notebook_env(monkeypatch, tmp_path, mnist_dir):
    """The settings CI gives the notebook: local MNIST, a tiny model, outputs under tmp_path."""
    # The command is installed beside this interpreter; `!mnist-jax` must find that one.
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent), prepend=":")
    monkeypatch.setenv("MNIST_JAX_DATA_DIR", str(mnist_dir))
    monkeypatch.setenv("MNIST_JAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MNIST_JAX_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MNIST_JAX_TRAIN_ARGS", TINY)
    monkeypatch.delenv("MNIST_JAX_RUNTIME", raising=False)
    monkeypatch.delenv("MNIST_JAX_WANDB", raising=False)  # "auto": no Colab secret, so disabled
    return tmp_path / "out"


def outputs(nb, tag: str) -> list[dict]:
    (cell,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    return cell.outputs


def text(cell_outputs: list[dict]) -> str:
    return "".join(o.get("text", "") for o in cell_outputs if o.output_type == "stream")


def test_notebook_is_committed_without_outputs():
    import nbformat

    nb = read_notebook()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.tags  # the settings come first


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_on_cpu(notebook_env, tmp_path):
    from nbformat.v4 import new_code_cell

    nb = read_notebook()
    # JAX must stay out of the kernel: a TPU serves one process, and that is `mnist-jax train`.
    check = 'import sys\nprint("jax in kernel:", "jax" in sys.modules)'
    nb.cells.append(new_code_cell(check, metadata={"tags": ["check"]}))
    nb = execute(nb, tmp_path)

    assert "nothing to install" in text(outputs(nb, "install"))
    (run,) = [p.parent for p in (notebook_env / "runs").glob("*/summary.json")]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    # The probe shows the backend that training then ran on.
    backend = json.loads((run / "config.json").read_text())["environment"]["backend"]
    assert f"backend {backend}," in text(outputs(nb, "devices"))
    assert "status:   completed" in text(outputs(nb, "run"))
    analysis = notebook_env / "analysis"
    assert (analysis / "report.html").is_file()
    pngs = sorted((analysis / "figures").rglob("*.png"))
    images = [o for o in outputs(nb, "figures") if "image/png" in o.get("data", {})]
    assert pngs and len(images) == len(pngs)
    assert "jax in kernel: False" in text(outputs(nb, "check"))


@pytest.mark.slow
def test_notebook_says_loudly_when_an_accelerator_runtime_falls_back_to_cpu(
    notebook_env, tmp_path, monkeypatch
):
    monkeypatch.setenv("MNIST_JAX_RUNTIME", "tpu")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = read_notebook()
    last = next(i for i, c in enumerate(nb.cells) if "devices" in c.metadata.get("tags", []))
    nb.cells = nb.cells[: last + 1]
    nb = execute(nb, tmp_path)

    warning = [o for o in outputs(nb, "devices") if o.get("name") == "stderr"]
    assert "A TPU RUNTIME WAS DETECTED, BUT JAX RUNS ON THE CPU" in text(warning)
