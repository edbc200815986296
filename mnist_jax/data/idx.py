"""IDX files: finding, reading, parsing and validating them, one file or a whole directory.

Every problem (missing or unreadable file, corrupt gzip, wrong magic number or image size,
truncation, trailing bytes, labels out of range, image/label count mismatch) is one `UserError`
line naming the file.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import warnings
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mnist_jax.data.registry import FILE_STEMS, MNIST_MD5, DatasetSpec, spec
from mnist_jax.errors import UserError

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


class DataWarning(UserWarning):
    """Data that loads but differs from the canonical files (e.g. an MD5 mismatch)."""


@dataclasses.dataclass(frozen=True)
class FileCheck:
    """The verdict on one IDX file, for `mnist-jax data verify`.

    ``status`` is ``ok``, ``missing`` or ``error`` (with ``message``); ``md5_ok`` is None where
    no canonical MD5 is known (datasets other than MNIST) or the file could not be read.
    """

    stem: str
    path: Path | None
    status: str
    message: str = ""
    count: int | None = None
    md5: str | None = None
    md5_ok: bool | None = None


def find_files(directory: str | Path) -> dict[str, Path | None]:
    """Each IDX file stem -> the file present in `directory` (uncompressed preferred) or None.

    The uncompressed file wins when both exist because it parses without decompression.
    """
    directory = Path(directory)
    found: dict[str, Path | None] = {}
    for stem in FILE_STEMS.values():
        raw, gz = directory / stem, directory / f"{stem}.gz"
        found[stem] = raw if raw.is_file() else gz if gz.is_file() else None
    return found


def verify_dir(name: str, directory: str | Path) -> list[FileCheck]:
    """Validates each IDX file in `directory` on its own and against its partner.

    Unlike `load_idx_dir` this never raises for a bad file: every file gets a verdict.
    """
    dataset = spec(name)
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; pass --data-dir DIR")
    checks: dict[str, FileCheck] = {}
    counts: dict[str, int] = {}
    found = find_files(directory)
    for (_, kind), stem in FILE_STEMS.items():
        path = found[stem]
        if path is None:
            checks[stem] = FileCheck(stem, None, "missing", f"neither {stem} nor {stem}.gz")
            continue
        md5 = md5_ok = None
        try:
            raw = decompress(path, read_file(path))
            digest = hashlib.md5(raw).hexdigest()
            if name == "mnist":  # the one dataset with canonical MD5s to compare with
                md5, md5_ok = digest, digest == MNIST_MD5[stem]
            _require_own_content(name, path, stem, digest)
            array = _parse_idx(raw, path, kind, dataset)
        except UserError as e:
            checks[stem] = FileCheck(stem, path, "error", str(e), md5=md5, md5_ok=md5_ok)
            continue
        counts[stem] = len(array)
        checks[stem] = FileCheck(stem, path, "ok", "", len(array), md5, md5_ok)
    for split in ("train", "test"):
        images, labels = FILE_STEMS[(split, "images")], FILE_STEMS[(split, "labels")]
        if images in counts and labels in counts and counts[images] != counts[labels]:
            message = _count_mismatch(checks[labels].path, counts[labels], images, counts[images])
            checks[labels] = dataclasses.replace(checks[labels], status="error", message=message)
    return list(checks.values())


def require_files(name: str, directory: Path) -> dict[str, Path]:
    """Each IDX file stem -> its file in `directory`; a missing directory or file is an error."""
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "does not exist"
        raise UserError(
            f"data directory {directory} {problem}; pass --data-dir DIR with the four "
            f"IDX files, or run `mnist-jax data download --dataset {name} --out {directory}`"
        )
    found = find_files(directory)
    missing = [f"{stem}[.gz]" for stem, path in found.items() if path is None]
    if missing:
        raise UserError(
            f"{directory} lacks {', '.join(missing)}; put the four {name} IDX files there "
            f"(gzipped or not), or run `mnist-jax data download --dataset {name} --out {directory}`"
        )
    return {stem: path for stem, path in found.items() if path is not None}


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def decompress(path: Path, blob: bytes) -> bytes:
    if path.suffix != ".gz":
        return blob
    try:
        return gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(
            f"{path}: corrupt gzip ({e}); replace it with an intact copy or run "
            "`mnist-jax data download`"
        ) from None


def _parse_idx(raw: bytes, path: Path, kind: str, dataset: DatasetSpec) -> np.ndarray:
    """One IDX file's content -> uint8 images ``[N, H, W]`` or int32 labels ``[N]``."""
    height, width, num_classes = dataset.height, dataset.width, dataset.num_classes
    magic, header_size, unit = (
        (IMAGES_MAGIC, 16, height * width) if kind == "images" else (LABELS_MAGIC, 8, 1)
    )
    if len(raw) < header_size:
        raise UserError(
            f"{path}: truncated, {len(raw)} bytes is shorter than the {header_size}-byte "
            f"IDX {kind} header"
        )
    header = np.frombuffer(raw, dtype=">u4", count=header_size // 4)
    if header[0] != magic:
        hint = "; it looks gzipped, name it *.gz" if raw[:2] == b"\x1f\x8b" else ""
        raise UserError(
            f"{path}: magic number {int(header[0])} is not {magic} (IDX {kind}){hint}; "
            "is this the right file?"
        )
    count = int(header[1])
    if kind == "images" and (header[2], header[3]) != (height, width):
        raise UserError(f"{path}: images are {header[2]}x{header[3]}, expected {height}x{width}")
    expected = header_size + count * unit
    if len(raw) < expected:
        raise UserError(
            f"{path}: truncated, the header promises {count} {kind} ({expected} bytes) but the "
            f"file has {len(raw)} bytes; replace it with an intact copy"
        )
    if len(raw) > expected:
        raise UserError(
            f"{path}: {len(raw) - expected} unexpected bytes after the {count} {kind} the "
            "header declares"
        )
    data = np.frombuffer(raw, dtype=np.uint8, offset=header_size)
    if kind == "images":
        return data.reshape(count, height, width)
    if count and data.max() >= num_classes:
        bad = int(np.argmax(data >= num_classes))
        raise UserError(f"{path}: label {data[bad]} at index {bad} is outside [0, {num_classes})")
    return data.astype(np.int32)


def parse_all(
    name: str, paths: Mapping[str, Path], blobs: Mapping[str, bytes]
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The four files' bytes -> arrays keyed ``{split}_{kind}``, and the stems whose content
    differs from the canonical MNIST MD5 (always empty for other datasets)."""
    dataset = spec(name)
    arrays: dict[str, np.ndarray] = {}
    mismatched: list[str] = []
    for (split, kind), stem in FILE_STEMS.items():
        raw = decompress(paths[stem], blobs[stem])
        md5 = hashlib.md5(raw).hexdigest()
        _require_own_content(name, paths[stem], stem, md5)
        if name == "mnist" and md5 != MNIST_MD5[stem]:
            mismatched.append(stem)
        arrays[f"{split}_{kind}"] = _parse_idx(raw, paths[stem], kind, dataset)
    for split in ("train", "test"):
        n_images, n_labels = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_images != n_labels:
            images_stem = FILE_STEMS[(split, "images")]
            labels_path = paths[FILE_STEMS[(split, "labels")]]
            raise UserError(_count_mismatch(labels_path, n_labels, images_stem, n_images))
    return arrays, mismatched


def _require_own_content(name: str, path: Path, stem: str, md5: str) -> None:
    """A canonical MNIST file under another file's name (train and test swapped) or read as
    another dataset (MNIST_JAX_DATA_DIR set for MNIST, `--dataset kmnist`) loads, and would
    train on the wrong images: refused."""
    for other, canonical in MNIST_MD5.items():
        if md5 != canonical or (name == "mnist" and other == stem):
            continue
        if name != "mnist":
            raise UserError(
                f"{path} is MNIST's {other} (by its MD5), not {name}'s; pass --data-dir with "
                f"{name}'s files (MNIST_JAX_DATA_DIR applies to every dataset), or --source "
                "download"
            )
        raise UserError(
            f"{path} holds the canonical {other} (by its MD5), not {stem}; "
            "the files are misnamed: give each its own name"
        )


def _count_mismatch(labels_path: Path | None, n_labels: int, images: str, n_images: int) -> str:
    return (
        f"{labels_path}: {n_labels} labels but {images} has {n_images} images; "
        "the two files must come from the same release"
    )


def warn_md5(paths: Mapping[str, Path], mismatched: Sequence[str]) -> None:
    """One `DataWarning` per file whose content is not the canonical MNIST file's.

    The warning points at the caller of the function that called this one (`load_idx_dir`'s).
    """
    for stem in mismatched:
        warnings.warn(
            f"{paths[stem]}: uncompressed content differs from the canonical MNIST file "
            f"(MD5 {MNIST_MD5[stem]}); fine for a deliberately changed copy, suspect otherwise",
            DataWarning,
            stacklevel=3,
        )
