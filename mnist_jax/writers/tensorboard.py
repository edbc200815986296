"""TensorBoard: every numeric metric of every log event as a scalar, under RUN_DIR/tensorboard.

Uses tensorboardX (`pip install "mnist-jax[tensorboard]"`), which writes event files without
TensorFlow; view them with `tensorboard --logdir runs/`. Like every writer it never stops
training: a failure is reported once and the writer goes quiet.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mnist_jax.errors import UserError
from mnist_jax.writers import Writer

SUBDIR = "tensorboard"


def require_tensorboardx() -> None:
    """Checked before a run starts, so a missing extra is one line and nothing written."""
    if importlib.util.find_spec("tensorboardX") is None:
        raise UserError(
            'TensorBoard logging needs tensorboardX: pip install "mnist-jax[tensorboard]"'
        )


class TensorBoardWriter(Writer):
    def __init__(self, run_dir: Path) -> None:
        from tensorboardX import SummaryWriter

        self.directory = Path(run_dir) / SUBDIR
        self._writer: Any = SummaryWriter(logdir=str(self.directory))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._writer is None:
            return
        try:
            for key, value in metrics.items():
                if _is_scalar(value) and key not in ("step", "epoch"):
                    self._writer.add_scalar(key, float(value), global_step=step)
            self._writer.flush()
        except Exception as e:
            self._writer = None
            print(f"TensorBoard writer stopped: {type(e).__name__}: {e}", file=sys.stderr)

    def close(self, status: str, summary: Mapping[str, Any]) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _is_scalar(value: Any) -> bool:
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return real and math.isfinite(value)
