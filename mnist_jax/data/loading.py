"""Datasets as uint8 arrays: IDX parsing and validation, the three sources, the parsed-array cache.

Sources (`source=`):
- ``local``: a directory holding the four IDX files, gzipped or not (``data_dir`` or
  ``$MNIST_JAX_DATA_DIR``, else the download cache when it is complete). Never touches the network.
- ``download``: the four ``.gz`` files from the mirrors tensorflow-datasets uses, each checked
  against its registered size and SHA-256 and written atomically into the cache directory.
- ``tfds``: ``tensorflow_datasets.load`` (optional extra, imported only when asked for).
- ``auto``: a given directory, else a complete cache, else download.

Every file is validated (magic number, 28x28, counts, label range, truncation, gzip integrity) and
every problem is one `UserError` line naming the file. Parsed arrays are cached in an ``.npz``
keyed by the SHA-256 of the files' bytes, so a second load skips decompression and parsing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import importlib.util
import logging
import os
import tempfile
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mnist_jax.errors import UserError

log = logging.getLogger(__name__)

DATA_DIR_ENV = "MNIST_JAX_DATA_DIR"
CACHE_DIR_ENV = "MNIST_JAX_CACHE_DIR"
MIRROR_ENV = "MNIST_JAX_MIRROR"

SOURCES = ("auto", "local", "download", "tfds")
IMAGE_SIZE = 28
IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

# A connection that cannot be made in a few seconds will not be made at all: offline machines
# must hear so at once. Once connected, a slow mirror gets longer between bytes.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 30.0

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "kmnist": ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
}
DATASETS = tuple(CLASS_NAMES)

# (split, kind) -> file name without ".gz", in the order files are listed and hashed.
FILE_STEMS: dict[tuple[str, str], str] = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

# The mirrors and checksums registered by tensorflow-datasets 4.9
# (image_classification/mnist.py and url_checksums/{mnist,fashion_mnist,kmnist}.txt).
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": ("https://storage.googleapis.com/cvdf-datasets/mnist/",),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    "kmnist": ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
}
# dataset -> {file name: (size in bytes, SHA-256)} of the gzipped files the mirrors serve.
CHECKSUMS: dict[str, dict[str, tuple[int, str]]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": (
            9912422,
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
        "train-labels-idx1-ubyte.gz": (
            28881,
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        ),
        "t10k-images-idx3-ubyte.gz": (
            1648877,
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        "t10k-labels-idx1-ubyte.gz": (
            4542,
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": (
            26421880,
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        ),
        "train-labels-idx1-ubyte.gz": (
            29515,
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        ),
        "t10k-images-idx3-ubyte.gz": (
            4422102,
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        ),
        "t10k-labels-idx1-ubyte.gz": (
            5148,
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        ),
    },
    "kmnist": {
        "train-images-idx3-ubyte.gz": (
            18165135,
            "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",
        ),
        "train-labels-idx1-ubyte.gz": (
            29497,
            "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17",
        ),
        "t10k-images-idx3-ubyte.gz": (
            3041136,
            "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5",
        ),
        "t10k-labels-idx1-ubyte.gz": (
            5120,
            "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c",
        ),
    },
}
# MD5 of the canonical uncompressed MNIST files. The .gz bytes of a legitimate copy may differ
# (recompressed), the content may not; a mismatch is worth a warning, not a refusal.
MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

# Bump when the parsed-array layout changes, so that old caches are rebuilt rather than misread.
_CACHE_VERSION = "1"
_CACHE_NAME = "mnist-jax-cache.npz"
_TFDS_BATCH = 10_000


class DataWarning(UserWarning):
    """Data that loads but differs from the canonical files (e.g. an MD5 mismatch)."""


@dataclasses.dataclass(frozen=True, repr=False)
class Split:
    """One split: ``images`` uint8 ``[N, 28, 28]`` and ``labels`` int32 ``[N]`` (read-only)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.labels.ndim != 1:
            raise ValueError(
                f"Split wants images [N, H, W] and labels [N], got {self.images.shape} "
                f"and {self.labels.shape}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"Split(images={self.images.dtype}{list(self.images.shape)}, "
            f"labels={self.labels.dtype}{list(self.labels.shape)})"
        )


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A whole dataset, host-side. ``origin`` says where it was read from, for logs."""

    name: str
    train: Split
    test: Split
    class_names: tuple[str, ...]
    origin: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class SourcePlan:
    """Where `load_dataset` would read from, decided without reading or downloading anything.

    ``kind`` is ``local`` (a given directory), ``cache`` (the complete download cache),
    ``download`` (fetch into ``directory``) or ``tfds``; ``reason`` says why, for `data info`.
    """

    kind: str
    directory: Path | None
    reason: str


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


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What `mnist-jax data info` shows: the plan, the files there, and what they hold.

    ``dataset`` is None when nothing was loaded (download or tfds planned, or ``error``).
    """

    name: str
    plan: SourcePlan
    files: dict[str, tuple[Path, int] | None]
    urls: tuple[str, ...]
    tfds_installed: bool
    dataset: Dataset | None
    error: str | None


# ---------------------------------------------------------------------------------------------
# Public entry points


def load_dataset(
    name: str = "mnist",
    data_dir: str | Path | None = None,
    source: str = "auto",
    *,
    cache: bool = True,
    progress: bool = True,
) -> Dataset:
    """Loads `name` from the source `source` selects (see the module docstring).

    ``data_dir`` defaults to ``$MNIST_JAX_DATA_DIR``; for ``source="download"`` it is where the
    files go (default: the cache directory), for ``source="tfds"`` the TFDS data directory.
    ``cache`` reads and writes the parsed-array ``.npz``; ``progress`` shows a download bar.
    """
    plan = plan_source(name, data_dir, source)
    if plan.kind == "tfds":
        return _load_tfds(name, plan.directory)
    assert plan.directory is not None
    if plan.kind == "download":
        download(name, plan.directory, progress=progress)
    return load_idx_dir(name, plan.directory, cache=cache)


def subset(dataset: Dataset, train: int, test: int) -> Dataset:
    """The first `train` and `test` examples of each split (views, no copy), for tiny runs."""
    for split, n, have in (("train", train, len(dataset.train)), ("test", test, len(dataset.test))):
        if not 0 <= n <= have:
            raise UserError(f"subset of {n} {split} examples asked for; {dataset.name} has {have}")
    return dataclasses.replace(
        dataset,
        train=Split(dataset.train.images[:train], dataset.train.labels[:train]),
        test=Split(dataset.test.images[:test], dataset.test.labels[:test]),
    )


def plan_source(name: str, data_dir: str | Path | None, source: str = "auto") -> SourcePlan:
    """Decides where `name` comes from, without touching the network or parsing files."""
    check_name(name)
    if source not in SOURCES:
        raise UserError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
    if source == "tfds":
        return SourcePlan("tfds", Path(data_dir) if data_dir else None, "tensorflow-datasets")
    if source == "download":
        if data_dir:
            return SourcePlan("download", Path(data_dir), "download into data_dir")
        return SourcePlan("download", dataset_cache_dir(name), "download into the cache")
    if data_dir:
        return SourcePlan("local", Path(data_dir), "data_dir")
    if os.environ.get(DATA_DIR_ENV):
        return SourcePlan("local", Path(os.environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}")
    cached = dataset_cache_dir(name)
    if all(find_files(cached).values()):
        return SourcePlan("cache", cached, "complete download cache")
    if source == "local":
        raise UserError(
            f"no local {name} data: pass --data-dir DIR or set {DATA_DIR_ENV} to a directory with "
            f"the four IDX files, or run `mnist-jax data download --dataset {name}`"
        )
    return SourcePlan("download", cached, "nothing local, download into the cache")


def local_dir(name: str, data_dir: str | Path | None = None) -> Path:
    """The directory local files of `name` are looked for in: `data_dir`, else
    ``$MNIST_JAX_DATA_DIR``, else the download cache."""
    check_name(name)
    if data_dir:
        return Path(data_dir)
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    return dataset_cache_dir(name)


def describe(name: str, data_dir: str | Path | None = None, source: str = "auto") -> DataInfo:
    """Where `name` would come from and, for local files, what they hold; never downloads."""
    plan = plan_source(name, data_dir, source)
    files: dict[str, tuple[Path, int] | None] = {}
    if plan.directory is not None and plan.kind != "tfds":
        for stem, path in find_files(plan.directory).items():
            files[stem] = (path, path.stat().st_size) if path else None
    dataset = error = None
    if plan.kind in ("local", "cache") and plan.directory is not None:
        try:
            dataset = load_idx_dir(name, plan.directory)
        except UserError as e:
            error = str(e)
    urls = tuple(urllib.parse.urljoin(base, f) for base in mirrors(name) for f in CHECKSUMS[name])
    tfds_installed = importlib.util.find_spec("tensorflow_datasets") is not None
    return DataInfo(name, plan, files, urls, tfds_installed, dataset, error)


def check_name(name: str) -> None:
    """Raises a `UserError` unless `name` is a known dataset."""
    if name not in CLASS_NAMES:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def cache_root() -> Path:
    """``$MNIST_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/mnist-jax``, else ``~/.cache/mnist-jax``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mnist-jax"


def dataset_cache_dir(name: str) -> Path:
    """Where downloads of `name` go by default."""
    return cache_root() / name


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


def mirrors(name: str) -> tuple[str, ...]:
    """Base URLs for `name`: ``$MNIST_JAX_MIRROR`` (comma-separated, ``{name}`` substituted)
    replaces the registered ones, so an internal mirror is never bypassed for the internet."""
    check_name(name)
    env = os.environ.get(MIRROR_ENV, "").strip()
    if env:
        bases = tuple(u.strip().replace("{name}", name) for u in env.split(",") if u.strip())
    else:
        bases = MIRRORS[name]
    return tuple(b if b.endswith("/") else b + "/" for b in bases)


def download(
    name: str = "mnist",
    dest: str | Path | None = None,
    *,
    base_urls: Sequence[str] | None = None,
    progress: bool = True,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    read_timeout: float = READ_TIMEOUT_S,
) -> Path:
    """Fetches the four ``.gz`` files of `name` into `dest` (default: its cache directory).

    Each file is checked against its registered size and SHA-256 before it is moved into place
    (temp file + ``os.replace``), so a failed or tampered download leaves nothing behind. Files
    already present with the right checksum are kept. Mirrors are tried in order, without
    retries; an unreachable network fails within ``connect_timeout`` with what to do instead.
    Returns the directory.
    """
    check_name(name)
    dest = Path(dest) if dest else dataset_cache_dir(name)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create {dest} for the download ({e.strerror}); pass --out DIR "
            f"or set {CACHE_DIR_ENV}"
        ) from None
    urls = tuple(base_urls) if base_urls else mirrors(name)
    wanted = [
        (fname, size, sha)
        for fname, (size, sha) in CHECKSUMS[name].items()
        if not _has_checksum(dest / fname, size, sha)
    ]
    if not wanted:
        return dest
    opener = _opener(read_timeout)
    with _download_progress(progress) as bar:
        for fname, size, sha in wanted:
            _fetch(opener, name, urls, fname, size, sha, dest, bar, connect_timeout)
    return dest


def load_idx_dir(name: str, directory: str | Path, *, cache: bool = True) -> Dataset:
    """Parses and validates the four IDX files in `directory`, through the ``.npz`` cache.

    Only gzipped files are worth caching: decompressing MNIST costs ~0.2 s, while uncompressed
    files parse as views of their bytes, and a cache would only double their disk use. The key
    is the SHA-256 of the four files' bytes as stored (plus the dataset name and a layout
    version): reading and hashing the ~11 MB of MNIST .gz takes milliseconds, is exact (a
    changed byte means a new key, a copied directory keeps its key) and trusts no mtime. The
    cache sits beside the files when that directory is writable, else under the cache root;
    it is written atomically, and a corrupt or stale one is rebuilt.
    """
    check_name(name)
    directory = Path(directory)
    paths = _require_files(name, directory)
    blobs = {stem: _read_file(path) for stem, path in paths.items()}
    cache = cache and any(path.suffix == ".gz" for path in paths.values())
    key = _cache_key(name, paths, blobs) if cache else ""
    origin = str(directory)
    if cache:
        for candidate in _cache_candidates(directory, name, key):
            arrays = _read_cache(candidate, key, len(CLASS_NAMES[name]))
            if arrays is not None:
                _warn_md5(paths, arrays.pop("md5_mismatch"))
                return _assemble(name, arrays, f"{origin} (cached {candidate})")
    arrays, mismatched = _parse_all(name, paths, blobs)
    _warn_md5(paths, mismatched)
    if cache:
        _write_cache(directory, name, key, arrays, mismatched)
    return _assemble(name, arrays, origin)


def verify_dir(name: str, directory: str | Path) -> list[FileCheck]:
    """Validates each IDX file in `directory` on its own and against its partner.

    Unlike `load_idx_dir` this never raises for a bad file: every file gets a verdict.
    """
    check_name(name)
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
            raw = _decompress(path, _read_file(path))
            if name == "mnist":
                md5 = hashlib.md5(raw).hexdigest()
                md5_ok = md5 == MNIST_MD5[stem]
            array = _parse_idx(raw, path, kind, len(CLASS_NAMES[name]))
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


# ---------------------------------------------------------------------------------------------
# IDX parsing and validation


def _require_files(name: str, directory: Path) -> dict[str, Path]:
    if not directory.is_dir():
        raise UserError(
            f"data directory {directory} does not exist; pass --data-dir DIR with the four "
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


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _decompress(path: Path, blob: bytes) -> bytes:
    if path.suffix != ".gz":
        return blob
    try:
        return gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(
            f"{path}: corrupt gzip ({e}); replace it with an intact copy or run "
            "`mnist-jax data download`"
        ) from None


def _parse_idx(raw: bytes, path: Path, kind: str, num_classes: int) -> np.ndarray:
    """One IDX file's content -> uint8 images ``[N, 28, 28]`` or int32 labels ``[N]``."""
    magic, header_size, unit = (
        (IMAGES_MAGIC, 16, IMAGE_SIZE * IMAGE_SIZE) if kind == "images" else (LABELS_MAGIC, 8, 1)
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
    if kind == "images" and (header[2], header[3]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise UserError(
            f"{path}: images are {header[2]}x{header[3]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}"
        )
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
        return data.reshape(count, IMAGE_SIZE, IMAGE_SIZE)
    if count and data.max() >= num_classes:
        bad = int(np.argmax(data >= num_classes))
        raise UserError(f"{path}: label {data[bad]} at index {bad} is outside [0, {num_classes})")
    return data.astype(np.int32)


def _parse_all(
    name: str, paths: Mapping[str, Path], blobs: Mapping[str, bytes]
) -> tuple[dict[str, np.ndarray], list[str]]:
    arrays: dict[str, np.ndarray] = {}
    mismatched: list[str] = []
    for (split, kind), stem in FILE_STEMS.items():
        raw = _decompress(paths[stem], blobs[stem])
        if name == "mnist" and hashlib.md5(raw).hexdigest() != MNIST_MD5[stem]:
            mismatched.append(stem)
        arrays[f"{split}_{kind}"] = _parse_idx(raw, paths[stem], kind, len(CLASS_NAMES[name]))
    for split in ("train", "test"):
        n_images, n_labels = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_images != n_labels:
            images_stem = FILE_STEMS[(split, "images")]
            labels_path = paths[FILE_STEMS[(split, "labels")]]
            raise UserError(_count_mismatch(labels_path, n_labels, images_stem, n_images))
    return arrays, mismatched


def _count_mismatch(labels_path: Path | None, n_labels: int, images: str, n_images: int) -> str:
    return (
        f"{labels_path}: {n_labels} labels but {images} has {n_images} images; "
        "the two files must come from the same release"
    )


def _warn_md5(paths: Mapping[str, Path], mismatched: Sequence[str]) -> None:
    for stem in mismatched:
        warnings.warn(
            f"{paths[stem]}: uncompressed content differs from the canonical MNIST file "
            f"(MD5 {MNIST_MD5[stem]}); fine for a re-encoded copy, suspect otherwise",
            DataWarning,
            stacklevel=3,
        )


def _assemble(name: str, arrays: Mapping[str, np.ndarray], origin: str) -> Dataset:
    for array in arrays.values():
        array.setflags(write=False)
    return Dataset(
        name=name,
        train=Split(arrays["train_images"], arrays["train_labels"]),
        test=Split(arrays["test_images"], arrays["test_labels"]),
        class_names=CLASS_NAMES[name],
        origin=origin,
    )


# ---------------------------------------------------------------------------------------------
# The parsed-array cache


def _cache_key(name: str, paths: Mapping[str, Path], blobs: Mapping[str, bytes]) -> str:
    h = hashlib.sha256(f"mnist-jax/{_CACHE_VERSION}/{name}".encode())
    for stem, blob in blobs.items():
        h.update(f"\0{paths[stem].name}\0{len(blob)}\0".encode())
        h.update(hashlib.sha256(blob).digest())
    return h.hexdigest()


def _cache_candidates(directory: Path, name: str, key: str) -> list[Path]:
    return [directory / _CACHE_NAME, cache_root() / "parsed" / f"{name}-{key[:20]}.npz"]


def _read_cache(path: Path, key: str, num_classes: int) -> dict[str, Any] | None:
    """The cached arrays if `path` is an intact cache for `key`, else None (it gets rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["key"]) != key:
                return None
            arrays: dict[str, Any] = {
                f"{split}_{kind}": npz[f"{split}_{kind}"]
                for split in ("train", "test")
                for kind in ("images", "labels")
            }
            arrays["md5_mismatch"] = [str(s) for s in npz["md5_mismatch"]]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.info("ignoring unreadable cache %s (%s); rebuilding it", path, e)
        return None
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if (
            images.dtype != np.uint8
            or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE)
            or labels.dtype != np.int32
            or labels.shape != images.shape[:1]
            or (labels.size and not 0 <= labels.min() <= labels.max() < num_classes)
        ):
            log.info("ignoring inconsistent cache %s; rebuilding it", path)
            return None
    return arrays


def _write_cache(
    directory: Path, name: str, key: str, arrays: Mapping[str, np.ndarray], md5_mismatch: list[str]
) -> None:
    """Writes the cache beside the files if allowed, else under the cache root; never fails."""
    payload = dict(arrays, key=np.array(key), md5_mismatch=np.array(md5_mismatch, dtype=str))
    beside, fallback = _cache_candidates(directory, name, key)
    targets = [beside, fallback] if _writable_dir(directory) else [fallback]
    for target in targets:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with _atomic_file(target) as f:
                np.savez(f, **payload)
            return
        except OSError as e:
            log.info("could not write cache %s (%s)", target, e)


def _writable_dir(directory: Path) -> bool:
    # Write permission bits are honoured even for root, who could otherwise write into a data
    # directory its owner marked read-only.
    try:
        mode = directory.stat().st_mode
    except OSError:
        return False
    return bool(mode & 0o222) and os.access(directory, os.W_OK)


@contextlib.contextmanager
def _atomic_file(target: Path) -> Iterator[BinaryIO]:
    """A temp file beside `target` that replaces it on success and vanishes on any failure."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        # mkstemp's 0600 would hide a shared cache or download from other users.
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Download


def _has_checksum(path: Path, size: int, sha256: str) -> bool:
    if not path.is_file() or path.stat().st_size != size:
        return False
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest() == sha256


def _fetch(
    opener: urllib.request.OpenerDirector,
    name: str,
    urls: Sequence[str],
    fname: str,
    size: int,
    sha256: str,
    dest: Path,
    bar: Any,
    connect_timeout: float,
) -> None:
    failures: list[str] = []
    tampered = ""
    for base in urls:
        url = urllib.parse.urljoin(base if base.endswith("/") else base + "/", fname)
        try:
            with opener.open(url, timeout=connect_timeout) as response:
                _stream_verified(response, url, dest / fname, size, sha256, bar)
            return
        except _ChecksumError as e:
            tampered = str(e)
            failures.append(tampered)
        except (OSError, ValueError, http.client.HTTPException) as e:
            # URLError and socket timeouts are OSErrors; ValueError is a malformed URL.
            failures.append(f"{url}: {getattr(e, 'reason', e)}")
    if tampered:
        raise UserError(
            f"{tampered}; the download was discarded, nothing was written. The mirror "
            "serves other bytes than registered: use another mirror or --data-dir DIR"
        )
    raise UserError(
        f"could not download {name} ({failures[-1]}); offline? pass --data-dir DIR or set "
        f"{DATA_DIR_ENV} to a directory holding the four IDX files, or run "
        f"`mnist-jax data download --dataset {name}` on a connected machine and copy the "
        f"files into {dest}"
    )


class _ChecksumError(Exception):
    pass


def _stream_verified(
    response: BinaryIO, url: str, target: Path, size: int, sha256: str, bar: Any
) -> None:
    """Streams into a temp file, hashing on the way; only a verified file gets its name."""
    task = bar.add_task(target.name, total=size) if bar else None
    digest = hashlib.sha256()
    received = 0
    with _atomic_file(target) as out:
        # Reading one chunk past the registered size is enough to know the file is wrong.
        while chunk := response.read(1 << 16):
            received += len(chunk)
            if received > size:
                break
            digest.update(chunk)
            out.write(chunk)
            if task is not None:
                bar.update(task, completed=received)
        if received != size or digest.hexdigest() != sha256:
            if received == size:
                got = f"SHA-256 {digest.hexdigest()}"
            else:
                got = f"more than {size} bytes" if received > size else f"{received} bytes"
            raise _ChecksumError(
                f"{url}: {got} does not match the registered {size} bytes with SHA-256 {sha256}"
            )


def _opener(read_timeout: float) -> urllib.request.OpenerDirector:
    """A urllib opener (proxies, redirects, HTTPS) whose sockets wait `read_timeout` per read.

    `urlopen`'s single timeout bounds the connection; this lengthens it once connected.
    """

    class ReadTimeout:
        def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
            class Connection(http_class):  # type: ignore[misc, valid-type]
                def connect(self) -> None:
                    super().connect()
                    self.sock.settimeout(read_timeout)

            return super().do_open(Connection, req, **kwargs)  # type: ignore[misc]

    class HTTPHandler(ReadTimeout, urllib.request.HTTPHandler):
        pass

    class HTTPSHandler(ReadTimeout, urllib.request.HTTPSHandler):
        pass

    opener = urllib.request.build_opener(HTTPHandler, HTTPSHandler)
    opener.addheaders = [("User-Agent", "mnist-jax")]
    return opener


@contextlib.contextmanager
def _download_progress(enabled: bool) -> Iterator[Any]:
    """A rich progress bar on stderr when `enabled`, else None."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    columns += (TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        yield bar


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets


def _load_tfds(name: str, data_dir: Path | None) -> Dataset:
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise UserError(
            f"source 'tfds' needs tensorflow and tensorflow-datasets ({e}); "
            'pip install "mnist-jax[tfds]", or use --data-dir DIR or --source download'
        ) from None
    # TensorFlow only feeds numpy here; it must not claim accelerator memory JAX will need.
    tf.config.set_visible_devices([], "GPU")
    splits = {}
    for split in ("train", "test"):
        try:
            # Never download: this source is for data already prepared in a TFDS data dir, and
            # offline a TFDS download retries for minutes before it gives up.
            ds = tfds.load(
                name,
                split=split,
                batch_size=_TFDS_BATCH,
                as_supervised=True,
                data_dir=str(data_dir) if data_dir else None,
                download=False,
            )
            batches = list(tfds.as_numpy(ds))
        except Exception as e:  # tfds raises many types; all mean "could not load"
            raise _tfds_error(tfds, name, split, data_dir, e) from None
        splits[split] = _split_from_batches(name, split, batches)
    return Dataset(name, splits["train"], splits["test"], CLASS_NAMES[name], origin="tfds")


def _tfds_error(
    tfds: Any, name: str, split: str, data_dir: Path | None, error: Exception
) -> UserError:
    """One line for a failed `tfds.load`: "not prepared" (and how to prepare it) when the TFDS
    data dir lacks the dataset, else the first line of what tfds said."""
    try:
        builder = tfds.builder(name, data_dir=str(data_dir) if data_dir else None)
        prepared, root = builder.is_prepared(), builder.data_dir_root
    except Exception:  # the builder cannot say: fall back to tfds's own message
        prepared, root = True, data_dir
    if not prepared:
        return UserError(
            f"{name} is not prepared in the TFDS data dir {root} and source 'tfds' never "
            f"downloads; prepare it on a connected machine (`tfds build {name} --data_dir "
            f"{root}`), point --data-dir at the TFDS data dir that holds it, or use "
            "--source download"
        )
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    return UserError(
        f"tensorflow-datasets could not load {name} {split}: {first_line}; "
        "try --source download or --data-dir DIR"
    )


def _split_from_batches(
    name: str, split: str, batches: Sequence[tuple[np.ndarray, np.ndarray]]
) -> Split:
    images = np.concatenate([b[0] for b in batches]) if batches else np.zeros((0, 28, 28, 1))
    labels = np.concatenate([b[1] for b in batches]) if batches else np.zeros((0,))
    if images.shape[1:] not in ((IMAGE_SIZE, IMAGE_SIZE, 1), (IMAGE_SIZE, IMAGE_SIZE)):
        raise UserError(f"tfds {name} {split}: images have shape {images.shape[1:]}, not 28x28")
    if labels.size and not 0 <= labels.min() <= labels.max() < len(CLASS_NAMES[name]):
        raise UserError(f"tfds {name} {split}: labels outside [0, {len(CLASS_NAMES[name])})")
    images = images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE).astype(np.uint8, copy=False)
    labels = labels.astype(np.int32)
    for array in (images, labels):
        array.setflags(write=False)
    return Split(images, labels)
