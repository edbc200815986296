"""Orbax checkpoints of the train state: `checkpoints/last` and `checkpoints/best`.

In a multi-process run every process calls the same saves and restores (Orbax synchronises
them, and process 0 writes the replicated state), on a directory they all see.

Each kind keeps one step directory. Orbax writes a new step into a temporary directory and
renames it when complete, then removes the older step, so a crash while saving leaves the
previous checkpoint intact. A step that both kinds hold (an epoch's best is often its last) is
written by Orbax once and copied, the same way, into the other kind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

KINDS = ("last", "best")
# A run keeps one `best` and one `last` step, and writes a new step before removing the old one.
COPIES_AT_ONCE = 3
_SLACK = 1.1  # Orbax's metadata and file-system blocks on top of the arrays' bytes


def payload_bytes(payload: Any) -> int:
    """The bytes of a payload's arrays (concrete or abstract, e.g. from `jax.eval_shape`)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(payload))


def require_space(directory: Path, nbytes: int, what: str) -> None:
    """Refuses, with ENOSPC, to start writing `nbytes` where the disk has less free: a full
    disk is found before anything is half-written rather than in the middle of a save."""
    existing = Path(directory).absolute()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    needed = int(nbytes * _SLACK) + (1 << 16)
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"{what}: about {_megabytes(needed)} needed in {directory}, {_megabytes(free)} free",
        )


@contextlib.contextmanager
def _quiet_absl(quietest: int = logging.ERROR) -> Iterator[None]:
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(quietest)
    try:
        yield
    finally:
        logger.setLevel(level)


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MB"


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
        kinds = [k for k in KINDS if not read_only or (self.directory / k).is_dir()]
        with _quiet_absl():  # read-only managers warn about options they override: noise to users
            options = ocp.CheckpointManagerOptions(
                max_to_keep=1,
                create=not read_only,
                read_only=read_only,
                enable_async_checkpointing=False,
            )
            self._managers = {
                kind: ocp.CheckpointManager(self.directory / kind, options=options)
                for kind in kinds
            }

    def save(
        self,
        kind: str,
        step: int,
        payload: Any,
        meta: dict[str, Any],
        *,
        same_as: str | None = None,
    ) -> Path:
        """Saves a step; on failure (a full disk) the partial step is removed and the previous
        checkpoint of this kind is left as it was.

        `same_as` names a kind that holds this step saved from this very payload (an epoch's
        best checkpoint that is also its last): its files are copied instead of written by
        Orbax a second time, which on 2 CPU cores took 0.13-0.4 s a save against a few ms.
        """
        if same_as is not None and jax.process_count() == 1:
            return self._copy(same_as, kind, step, meta)
        manager = self._managers[kind]
        require_space(self.directory, payload_bytes(payload), f"the {kind} checkpoint")
        try:
            # A failed save raises here; Orbax's own log of it (a traceback from a worker
            # thread, e.g. when another process of a distributed run is lost) is noise.
            with _quiet_absl(logging.CRITICAL):
                manager.save(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(_to_tree(payload)),
                        meta=ocp.args.JsonSave(meta),
                    ),
                    force=True,
                )
                manager.wait_until_finished()
        except BaseException:
            if jax.process_index() != 0:  # process 0 writes (and cleans up) for all
                raise
            for partial in (self.directory / kind).glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
            raise
        return self.directory / kind / str(step)

    def _copy(self, source: str, kind: str, step: int, meta: dict[str, Any]) -> Path:
        """`source`'s step `step` copied into `kind` with `meta`, the way Orbax saves: into a
        temporary directory renamed whole, the older step removed only after (a crash leaves
        the previous checkpoint). Copies, not links: each kind stays whole if the other's files
        are damaged."""
        origin, target = self.directory / source / str(step), self.directory / kind / str(step)
        nbytes = sum(p.stat().st_size for p in origin.rglob("*") if p.is_file())
        require_space(self.directory, nbytes, f"the {kind} checkpoint")
        partial = target.with_name(f"{step}.orbax-checkpoint-tmp-copy")
        try:
            shutil.copytree(origin, partial)
            (partial / "meta" / "metadata").write_text(json.dumps(meta))
            for note in partial.rglob("commit_success.txt"):  # Orbax's notes name their directory
                note.write_text(note.read_text().replace(str(origin), str(target)))
            partial.rename(target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        manager = self._managers[kind]
        manager.reload()
        for older in manager.all_steps():
            if older != step:
                manager.delete(older)
        return target

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
        self._managers.clear()
