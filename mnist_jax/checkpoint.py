"""Orbax checkpoints of the train state: `checkpoints/last` and `checkpoints/best`.

Each kind keeps one step directory. Orbax writes a new step into a temporary directory and
renames it when complete, then removes the older step, so a crash while saving leaves the
previous checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

KINDS = ("last", "best")


def _to_tree(payload: Any) -> Any:
    """nnx.State objects become plain nested dicts, which Orbax stores as-is."""
    return jax.tree.map(
        lambda x: nnx.to_pure_dict(x) if isinstance(x, nnx.State) else x,
        payload,
        is_leaf=lambda x: isinstance(x, nnx.State),
    )


def _from_tree(template: Any, tree: Any) -> Any:
    """Puts restored plain dicts back into the nnx.State structure of `template`."""

    def restore(t: Any, r: Any) -> Any:
        if isinstance(t, nnx.State):
            nnx.replace_by_pure_dict(t, r)
            return t
        return r

    is_state = lambda x: isinstance(x, nnx.State)  # noqa: E731
    flat_t, treedef = jax.tree.flatten(template, is_leaf=is_state)
    flat_r = treedef.flatten_up_to(tree)
    return treedef.unflatten([restore(t, r) for t, r in zip(flat_t, flat_r, strict=True)])


class Checkpoints:
    """The run's checkpoints: save, find and restore the last and the best train state."""

    def __init__(self, directory: Path, *, read_only: bool = False) -> None:
        """`read_only` (evaluate, predict) creates nothing and sees only kinds already saved."""
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=1,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=False,
        )
        kinds = [k for k in KINDS if not read_only or (self.directory / k).is_dir()]
        self._managers = {
            kind: ocp.CheckpointManager(self.directory / kind, options=options) for kind in kinds
        }

    def save(self, kind: str, step: int, payload: Any, meta: dict[str, Any]) -> Path:
        manager = self._managers[kind]
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_tree(payload)), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        manager.wait_until_finished()
        return self.directory / kind / str(step)

    def latest_step(self, kind: str) -> int | None:
        manager = self._managers.get(kind)
        return None if manager is None else manager.latest_step()

    def restore(self, kind: str, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores into the structure (and shapes) of `template`; returns (payload, meta)."""
        manager = self._managers[kind]
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no {kind} checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_tree(template))
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return _from_tree(template, restored["state"]), dict(restored["meta"])

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()
