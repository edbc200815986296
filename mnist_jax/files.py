"""Atomic file writes: a reader sees the old file or the new one, never a partial one.

Every file the toolkit writes (downloads, the parsed-array cache, the run record, predictions,
evaluation results, the report) goes through `atomic_write`, so a crash, a full disk or a signal
at any moment leaves the previous version intact and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(target: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """A temp file beside `target` that replaces it on success and vanishes on any failure."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        # mkstemp's 0600 would hide a shared cache, a download or a record from other users.
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Writes `payload` as readable JSON (see `dumps`)."""
    write_text_atomic(path, dumps(payload) + "\n")


_NUMBER_LIST = re.compile(r"\[\s+((?:-?[\d.eE+-]+|null)(?:,\s+(?:-?[\d.eE+-]+|null))*)\s+\]")


def dumps(payload: Any) -> str:
    """Indented, sorted JSON with lists of numbers kept on one line (a confusion matrix reads
    as a matrix); non-finite floats become null."""
    text = json.dumps(finite(payload), indent=2, sort_keys=True)
    return _NUMBER_LIST.sub(lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)


def finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: non-finite floats are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file size limit is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# Libraries that write through their own I/O layers (Orbax's TensorStore) report the OS error
# in their message only.
_STORAGE_MESSAGES = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "File too large": errno.EFBIG,
    "Read-only file system": errno.EROFS,
}


def storage_problem(error: BaseException) -> str | None:
    """What the disk refused, in a few words, when `error` is a storage failure (full, quota,
    file size limit, read-only, permission); None for any other error."""
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
        problem, detail = _STORAGE_ERRNOS[error.errno], error.strerror
        # A refusal made before writing (checkpoint.require_space) says how much is missing.
        return f"{problem} ({detail})" if detail and detail != os.strerror(error.errno) else problem
    text = str(error)
    for marker, number in _STORAGE_MESSAGES.items():
        if marker in text:
            return _STORAGE_ERRNOS[number]
    return None
