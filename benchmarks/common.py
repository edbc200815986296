"""What every benchmark records beside its figures: the machine they come from."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
import optax

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    """Where the figures come from: CPU model, cores, backend, device and versions."""
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
    }


def write_results(path: Path, **figures: Any) -> None:
    """Writes the figures, with the machine they come from, as JSON (atomically)."""
    from mnist_jax.files import write_json_atomic

    write_json_atomic(path, {"machine": machine(), **figures})
    print(f"wrote {path}")


def train_command() -> list[str]:
    """The installed `mnist-jax train` beside this Python, else the repository's cli.py."""
    script = Path(sys.executable).with_name("mnist-jax")
    if script.is_file():
        return [str(script), "train"]
    found = shutil.which("mnist-jax")
    return [found, "train"] if found else [sys.executable, str(REPO / "cli.py"), "train"]
