"""The data layer: IDX validation, the three sources, the parsed-array cache, the data commands.

Oracles: the real MNIST files read with plain gzip + numpy, the canonical class counts and
normalisation constants, IDX files written here with `struct`, and a local HTTP mirror.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import importlib.metadata
import importlib.util
import socket
import struct
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cli
from mnist_jax import config, data
from mnist_jax.errors import UserError

# The tfds extra is installed in CI; where it is absent (an accelerator image) these tests skip.
needs_tfds = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow_datasets") is None,
    reason='tensorflow-datasets is not installed (pip install "mnist-jax[tfds]")',
)

STEMS = list(data.FILE_STEMS.values())
TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = STEMS
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
# The widely published MNIST normalisation constants (0.1307, 0.3081) at full precision, x255.
TRAIN_PIXEL_MEAN = 33.318421449829934
TRAIN_PIXEL_STD = 78.56748998339798


# ---------------------------------------------------------------------------------------------
# helpers and fixtures


def idx(array: np.ndarray, magic: int | None = None) -> bytes:
    """IDX bytes for a uint8 array, written independently of the parser (struct, big-endian)."""
    array = np.asarray(array, dtype=np.uint8)
    magic = magic if magic is not None else (2051 if array.ndim == 3 else 2049)
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()


def write_files(directory: Path, contents: dict[str, bytes], gz: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for stem, raw in contents.items():
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw, mtime=0))
        else:
            (directory / stem).write_bytes(raw)
    return directory


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty cache root and no ambient data dir or mirror."""
    root = tmp_path / "cache-root"
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(root))
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.delenv(data.MIRROR_ENV, raising=False)
    return root


@pytest.fixture(scope="session")
def real(mnist_dir: Path) -> data.Dataset:
    return data.load_dataset("mnist", mnist_dir, "local", cache=False, progress=False)


@pytest.fixture(scope="session")
def real_raw(mnist_dir: Path) -> dict[str, bytes]:
    """Uncompressed content of the four real files."""
    return {stem: gzip.decompress((mnist_dir / f"{stem}.gz").read_bytes()) for stem in STEMS}


def small_contents(real: data.Dataset, n_train: int = 50, n_test: int = 20) -> dict[str, bytes]:
    """Real images and labels, few enough to parse in microseconds."""
    return {
        TRAIN_IMAGES: idx(real.train.images[:n_train]),
        TRAIN_LABELS: idx(real.train.labels[:n_train]),
        TEST_IMAGES: idx(real.test.images[:n_test]),
        TEST_LABELS: idx(real.test.labels[:n_test]),
    }


@pytest.fixture
def small_dir(tmp_path: Path, real: data.Dataset) -> Path:
    return write_files(tmp_path / "small", small_contents(real))


def load_quiet(name: str, directory: Path, **kwargs) -> data.Dataset:
    """Loads without the (expected) MD5 warnings of non-canonical test files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data.DataWarning)
        return data.load_idx_dir(name, directory, **kwargs)


def assert_same(a: data.Dataset, b: data.Dataset) -> None:
    for x, y in ((a.train, b.train), (a.test, b.test)):
        np.testing.assert_array_equal(x.images, y.images)
        np.testing.assert_array_equal(x.labels, y.labels)
        assert (x.images.dtype, x.labels.dtype) == (np.uint8, np.int32)


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[tuple[str, list[str]]]:
    """An HTTP mirror of `directory` on 127.0.0.1; yields its base URL and the paths requested."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)

        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", requests
    finally:
        server.shutdown()
        server.server_close()


def registered(directory: Path, order: list[str] | None = None) -> dict[str, tuple[int, str]]:
    """A checksum table for the .gz files in `directory` (in `order`, default the usual one)."""
    names = order or [f"{stem}.gz" for stem in STEMS]
    table = {}
    for name in names:
        blob = (directory / name).read_bytes()
        table[name] = (len(blob), hashlib.sha256(blob).hexdigest())
    return table


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """A 127.0.0.1 port whose accept queue is full: SYNs are dropped, as on an unroutable net."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        for s in [*fillers, server]:
            s.close()


# ---------------------------------------------------------------------------------------------
# the real data


def test_real_mnist_matches_independent_oracle(real: data.Dataset, real_raw: dict) -> None:
    pixels = np.frombuffer(real_raw[TRAIN_IMAGES], np.uint8, offset=16)
    labels = np.frombuffer(real_raw[TRAIN_LABELS], np.uint8, offset=8)
    test_labels = np.frombuffer(real_raw[TEST_LABELS], np.uint8, offset=8)
    assert real.train.images.shape == (60000, 28, 28)
    assert real.test.images.shape == (10000, 28, 28)
    assert real.train.images.tobytes() == real_raw[TRAIN_IMAGES][16:]
    np.testing.assert_array_equal(real.train.labels, labels)
    np.testing.assert_array_equal(real.test.labels, test_labels)
    assert np.bincount(real.train.labels).tolist() == TRAIN_COUNTS
    assert np.bincount(real.test.labels).tolist() == TEST_COUNTS
    mean, std = real.train.images.mean(dtype=np.float64), real.train.images.std(dtype=np.float64)
    # The oracle takes another road: integer sums, exact in float64 (< 2**53).
    as_float = pixels.astype(np.float64)
    oracle_mean = as_float.sum() / pixels.size
    oracle_var = np.dot(as_float, as_float) / pixels.size - oracle_mean**2
    assert mean == pytest.approx(oracle_mean, rel=1e-12)
    assert std == pytest.approx(np.sqrt(oracle_var), rel=1e-9)
    assert mean == pytest.approx(TRAIN_PIXEL_MEAN, rel=1e-9)
    assert std == pytest.approx(TRAIN_PIXEL_STD, rel=1e-9)
    assert real.class_names == tuple("0123456789") and real.num_classes == 10


def test_real_mnist_raises_no_md5_warning(mnist_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", data.DataWarning)
        data.load_idx_dir("mnist", mnist_dir, cache=False)


def test_uncompressed_copy_loads_identically(
    tmp_path: Path, real: data.Dataset, real_raw: dict
) -> None:
    raw_dir = write_files(tmp_path / "raw", real_raw, gz=False)
    assert all(p is not None and p.suffix != ".gz" for p in data.find_files(raw_dir).values())
    with warnings.catch_warnings():
        warnings.simplefilter("error", data.DataWarning)
        assert_same(data.load_idx_dir("mnist", raw_dir, cache=False), real)


def test_arrays_are_read_only(small_dir: Path) -> None:
    ds = load_quiet("mnist", small_dir)
    with pytest.raises(ValueError):
        ds.train.images[0, 0, 0] = 1
    with pytest.raises(ValueError):
        ds.test.labels[0] = 1


def test_uncompressed_file_preferred_over_gz(tmp_path: Path, real: data.Dataset) -> None:
    directory = write_files(tmp_path / "both", small_contents(real, 5, 5))
    write_files(directory, small_contents(real, 7, 5), gz=False)
    assert len(load_quiet("mnist", directory, cache=False).train) == 7


# ---------------------------------------------------------------------------------------------
# validation: every malformed file is one UserError naming the file


def _set(stem: str, value: bytes) -> Callable[[dict], None]:
    return lambda c: c.__setitem__(stem, value)


def _edit(stem: str, fn: Callable[[bytes], bytes]) -> Callable[[dict], None]:
    return lambda c: c.__setitem__(stem, fn(c[stem]))


IMAGES_5 = np.arange(5 * 28 * 28, dtype=np.uint8).reshape(5, 28, 28)
MALFORMED = {
    "images magic": (_edit(TRAIN_IMAGES, lambda b: idx(IMAGES_5, 2049)), TRAIN_IMAGES, "2049"),
    "labels magic": (_edit(TEST_LABELS, lambda b: idx([1, 2], 2051)), TEST_LABELS, "not 2049"),
    "27x28 images": (_set(TRAIN_IMAGES, idx(np.zeros((50, 27, 28)))), TRAIN_IMAGES, "27x28"),
    "counts differ": (_set(TRAIN_LABELS, idx(np.zeros(49))), TRAIN_LABELS, "49 labels"),
    "label 10": (_set(TEST_LABELS, idx([3] * 19 + [10])), TEST_LABELS, "label 10 at index 19"),
    "truncated": (_edit(TEST_IMAGES, lambda b: b[:-100]), TEST_IMAGES, "truncated"),
    "trailing bytes": (_edit(TRAIN_LABELS, lambda b: b + b"xx"), TRAIN_LABELS, "2 unexpected"),
    "short header": (_set(TRAIN_IMAGES, b"\x00\x00\x08"), TRAIN_IMAGES, "16-byte"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_malformed_file_is_named(tmp_path: Path, real: data.Dataset, case: str, gz: bool) -> None:
    mutate, stem, fragment = MALFORMED[case]
    contents = small_contents(real)
    mutate(contents)
    directory = write_files(tmp_path / "bad", contents, gz=gz)
    with pytest.raises(UserError, match=fragment) as err:
        load_quiet("mnist", directory, cache=False)
    message = str(err.value)
    assert f"{directory / stem}" in message and "\n" not in message
    verdicts = {c.stem: c for c in data.verify_dir("mnist", directory)}
    assert verdicts[stem].status == "error" and fragment in verdicts[stem].message
    assert sum(c.status == "ok" for c in verdicts.values()) == 3


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda b: b[: len(b) // 2], "corrupt gzip"),
        (lambda b: b[:200] + bytes(x ^ 0xFF for x in b[200:260]) + b[260:], "corrupt gzip"),
        (lambda b: b"plain bytes, not gzip", "corrupt gzip"),
    ],
    ids=["cut", "flipped", "not-gzip"],
)
def test_corrupt_gzip_is_named(tmp_path: Path, real: data.Dataset, damage, fragment) -> None:
    directory = write_files(tmp_path / "gz", small_contents(real))
    path = directory / f"{TRAIN_IMAGES}.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=fragment) as err:
        load_quiet("mnist", directory, cache=False)
    assert str(path) in str(err.value)


def test_gzipped_file_without_gz_suffix_gets_a_hint(tmp_path: Path, real: data.Dataset) -> None:
    directory = write_files(tmp_path / "d", small_contents(real), gz=False)
    labels = directory / TEST_LABELS
    labels.write_bytes(gzip.compress(labels.read_bytes()))
    with pytest.raises(UserError, match="looks gzipped"):
        load_quiet("mnist", directory, cache=False)


def test_missing_files_are_listed(tmp_path: Path, real: data.Dataset) -> None:
    contents = small_contents(real)
    del contents[TRAIN_LABELS], contents[TEST_IMAGES]
    directory = write_files(tmp_path / "partial", contents)
    with pytest.raises(UserError) as err:
        data.load_dataset("mnist", directory, progress=False)
    message = str(err.value)
    assert f"{TRAIN_LABELS}[.gz]" in message and f"{TEST_IMAGES}[.gz]" in message
    assert TRAIN_IMAGES not in message and str(directory) in message


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        data.load_dataset("mnist", tmp_path / "nope")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="a-file is not a directory"):
        data.load_dataset("mnist", tmp_path / "a-file")


# ---------------------------------------------------------------------------------------------
# canonical MD5: a warning, not an error


def test_md5_mismatch_warns_per_file(small_dir: Path) -> None:
    with pytest.warns(data.DataWarning) as record:
        ds = data.load_idx_dir("mnist", small_dir)
    named = {stem for stem in STEMS for w in record if f"{stem}.gz" in str(w.message)}
    assert named == set(STEMS) and len(ds.train) == 50
    with pytest.warns(data.DataWarning) as record:
        ds = data.load_idx_dir("mnist", small_dir)
    assert "cached" in ds.origin and len(record) == 4


def test_canonical_files_under_each_others_names_are_refused(
    tmp_path: Path, mnist_dir: Path
) -> None:
    # train and test swapped would train on the 10,000 test images and test on the training set
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for (split, kind), stem in data.FILE_STEMS.items():
        other = data.FILE_STEMS[("test" if split == "train" else "train", kind)]
        (swapped / f"{stem}.gz").write_bytes((mnist_dir / f"{other}.gz").read_bytes())
    for cache in (True, False):
        with pytest.raises(UserError, match=f"holds the canonical {TEST_IMAGES} .*misnamed"):
            data.load_idx_dir("mnist", swapped, cache=cache)
    result = invoke("verify", "--data-dir", str(swapped))
    assert result.exit_code == 1
    for line in result.stdout.splitlines()[1:]:
        assert line.split()[0] == "ERROR" and "misnamed" in line, line


@pytest.mark.parametrize("name", ["fashion_mnist", "kmnist"])
def test_mnist_files_read_as_another_dataset_are_refused(mnist_dir: Path, name: str) -> None:
    # MNIST_JAX_DATA_DIR set for MNIST applies to every dataset: the wrong images, silently
    with pytest.raises(UserError, match=f"is MNIST's {TRAIN_IMAGES} .*not {name}'s"):
        data.load_idx_dir(name, mnist_dir, cache=False)
    result = invoke("verify", "--dataset", name, "--data-dir", str(mnist_dir))
    assert result.exit_code == 1 and result.stdout.count("is MNIST's") == 4


def test_md5_only_checked_for_mnist(small_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", data.DataWarning)
        assert data.load_idx_dir("fashion_mnist", small_dir).name == "fashion_mnist"


# ---------------------------------------------------------------------------------------------
# the parsed-array cache


def test_second_load_comes_from_cache(small_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_quiet("mnist", small_dir)
    assert (small_dir / "mnist-jax-cache.npz").is_file()

    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed although cached")

    monkeypatch.setattr("mnist_jax.data.idx._parse_idx", no_parsing)
    second = load_quiet("mnist", small_dir)
    assert_same(first, second)
    assert "cached" in second.origin and "cached" not in first.origin


def test_cache_goes_to_cache_root_when_dir_is_read_only(
    small_dir: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = sorted(p.name for p in small_dir.iterdir())
    small_dir.chmod(0o555)
    try:
        first = load_quiet("mnist", small_dir)
        assert sorted(p.name for p in small_dir.iterdir()) == before
        cached = list((isolated / "parsed").glob("mnist-*.npz"))
        assert len(cached) == 1
        monkeypatch.setattr("mnist_jax.data.idx._parse_idx", None)
        assert_same(first, load_quiet("mnist", small_dir))
    finally:
        small_dir.chmod(0o755)


@pytest.mark.parametrize(
    "corrupt",
    [lambda b: b[: len(b) // 2], lambda b: b"garbage" * 10, lambda b: b[:-9] + b"\x00" * 9],
    ids=["truncated", "garbage", "damaged-tail"],
)
def test_corrupt_cache_is_rebuilt(small_dir: Path, corrupt) -> None:
    first = load_quiet("mnist", small_dir)
    cache_file = small_dir / "mnist-jax-cache.npz"
    cache_file.write_bytes(corrupt(cache_file.read_bytes()))
    second = load_quiet("mnist", small_dir)
    assert_same(first, second)
    assert "cached" not in second.origin
    with np.load(cache_file) as npz:  # rewritten intact
        np.testing.assert_array_equal(npz["train_images"], first.train.images)


def test_changed_files_invalidate_cache(tmp_path: Path, real: data.Dataset) -> None:
    contents = small_contents(real)
    contents[TEST_LABELS] = idx([6] * 20)
    directory = write_files(tmp_path / "d", contents)
    size = (directory / f"{TEST_LABELS}.gz").stat().st_size
    load_quiet("mnist", directory)
    write_files(directory, {TEST_LABELS: idx([7] * 20)})
    assert (directory / f"{TEST_LABELS}.gz").stat().st_size == size  # only content differs
    reloaded = load_quiet("mnist", directory)
    assert reloaded.test.labels.tolist() == [7] * 20 and "cached" not in reloaded.origin


def test_uncompressed_files_are_not_cached(tmp_path: Path, real: data.Dataset, isolated) -> None:
    directory = write_files(tmp_path / "raw", small_contents(real), gz=False)
    load_quiet("mnist", directory)
    assert "cached" not in load_quiet("mnist", directory).origin
    assert len(list(directory.iterdir())) == 4 and not isolated.exists()


def test_failed_cache_write_leaves_nothing(
    small_dir: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_write(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("mnist_jax.data.cache.np.savez", half_write)
    ds = load_quiet("mnist", small_dir)
    assert len(ds.train) == 50
    leftovers = [p for p in small_dir.rglob("*") if not p.name.endswith("-ubyte.gz")]
    assert leftovers == []
    assert not any(p.is_file() for p in isolated.rglob("*"))


def test_cache_false_writes_nothing(small_dir: Path, isolated: Path) -> None:
    load_quiet("mnist", small_dir, cache=False)
    assert len(list(small_dir.iterdir())) == 4 and not isolated.exists()


# ---------------------------------------------------------------------------------------------
# where data comes from


def test_plan_prefers_argument_then_env_then_cache(
    tmp_path: Path, small_dir: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert data.plan_source("mnist", None).kind == "download"
    with pytest.raises(UserError, match="mnist-jax data download"):
        data.plan_source("mnist", None, "local")
    cache_dir = write_files(isolated / "mnist", {s: b"" for s in STEMS})
    assert data.plan_source("mnist", None) == data.SourcePlan(
        "cache", cache_dir, "complete download cache"
    )
    monkeypatch.setenv(data.DATA_DIR_ENV, str(small_dir))
    assert data.plan_source("mnist", None).directory == small_dir
    assert data.plan_source("mnist", tmp_path).directory == tmp_path
    assert data.plan_source("mnist", None, "download").directory == cache_dir
    assert data.plan_source("mnist", tmp_path, "download").directory == tmp_path
    with pytest.raises(UserError, match="unknown source"):
        data.plan_source("mnist", None, "ftp")
    with pytest.raises(UserError, match="unknown dataset"):
        data.load_dataset("cifar10")


def test_env_data_dir_is_loaded(small_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.DATA_DIR_ENV, str(small_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data.DataWarning)
        assert len(data.load_dataset(progress=False).test) == 20


def test_cache_root_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(data.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.dataset_cache_dir("kmnist") == tmp_path / "mnist-jax" / "kmnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.cache_root() == Path.home() / ".cache" / "mnist-jax"


def test_subset_takes_the_first_examples(real: data.Dataset) -> None:
    small = data.subset(real, 100, 30)
    assert (len(small.train), len(small.test)) == (100, 30)
    np.testing.assert_array_equal(small.train.images, real.train.images[:100])
    np.testing.assert_array_equal(small.test.labels, real.test.labels[:30])
    assert small.class_names == real.class_names
    with pytest.raises(UserError, match="60000"):
        data.subset(real, 60001, 10)


def test_names_agree_with_config() -> None:
    assert config.DATASETS == data.DATASETS and config.SOURCES == data.SOURCES
    assert data.CLASS_NAMES["kmnist"] == (
        "o",
        "ki",
        "su",
        "tsu",
        "na",
        "ha",
        "ma",
        "ya",
        "re",
        "wo",
    )
    assert data.CLASS_NAMES["fashion_mnist"][0] == "T-shirt/top"
    assert all(len(names) == 10 for names in data.CLASS_NAMES.values())


@needs_tfds
def test_mirrors_and_checksums_match_tfds_registry() -> None:
    spec = importlib.util.find_spec("tensorflow_datasets")  # locates it without importing TF
    assert spec is not None and spec.submodule_search_locations
    registry = Path(spec.submodule_search_locations[0]) / "url_checksums"
    for name in data.DATASETS:
        rows = [line.split("\t") for line in (registry / f"{name}.txt").read_text().splitlines()]
        theirs = {(url, int(size), sha) for url, size, sha, _ in rows}
        ours = {
            (data.MIRRORS[name][0] + fname, size, sha)
            for fname, (size, sha) in data.CHECKSUMS[name].items()
        }
        assert ours == theirs


def test_mirror_env_replaces_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.MIRROR_ENV, "http://a.example/{name}, http://b.example/x/")
    assert data.mirrors("kmnist") == ("http://a.example/kmnist/", "http://b.example/x/")


# ---------------------------------------------------------------------------------------------
# download


def test_download_from_mirror_then_load(
    tmp_path: Path, mnist_dir: Path, real: data.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(data.CHECKSUMS, "mnist", registered(mnist_dir))
    with serve(mnist_dir) as (url, requests):
        monkeypatch.setenv(data.MIRROR_ENV, f"http://127.0.0.1:{closed_port()}/,{url}")
        ds = data.load_dataset("mnist", progress=False)
        assert len(requests) == 4
        again = data.download("mnist", progress=False)  # verified files are kept
        assert len(requests) == 4
    assert again == data.dataset_cache_dir("mnist")
    for stem in STEMS:
        downloaded = (again / f"{stem}.gz").read_bytes()
        assert downloaded == (mnist_dir / f"{stem}.gz").read_bytes()
    assert_same(ds, real)
    assert data.plan_source("mnist", None).kind == "cache"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:],
        lambda b: b + b"\x00",
        lambda b: b[:-1],
    ],
    ids=["flipped-byte", "longer", "shorter"],
)
def test_tampered_download_is_rejected_and_leaves_nothing(
    tmp_path: Path, mnist_dir: Path, monkeypatch: pytest.MonkeyPatch, tamper
) -> None:
    order = [f"{TRAIN_LABELS}.gz", f"{TEST_LABELS}.gz"]
    monkeypatch.setitem(data.CHECKSUMS, "mnist", registered(mnist_dir, order))
    served = tmp_path / "served"
    served.mkdir()
    for name in order:
        (served / name).write_bytes((mnist_dir / name).read_bytes())
    target = served / order[0]
    target.write_bytes(tamper(target.read_bytes()))
    dest = tmp_path / "dest"
    with serve(served) as (url, _), pytest.raises(UserError, match="does not match") as err:
        data.download("mnist", dest, base_urls=[url], progress=False)
    assert "nothing was written" in str(err.value) and "\n" not in str(err.value)
    assert list(dest.iterdir()) == []


def test_offline_fails_fast_with_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.MIRROR_ENV, f"http://127.0.0.1:{closed_port()}/")
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        data.load_dataset("mnist", progress=False)
    assert time.monotonic() - start < 5
    message = str(err.value)
    for hint in ("--data-dir", data.DATA_DIR_ENV, "mnist-jax data download"):
        assert hint in message
    assert "\n" not in message


def test_unroutable_mirror_times_out_within_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert data.CONNECT_TIMEOUT_S <= 3
    with black_hole() as url:
        monkeypatch.setenv(data.MIRROR_ENV, url)
        start = time.monotonic()
        with pytest.raises(UserError, match="offline"):
            data.load_dataset("mnist", progress=False)
        assert time.monotonic() - start < 5


def test_stalled_mirror_times_out(tmp_path: Path) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # the kernel completes the handshake; nobody ever answers
        url = f"http://127.0.0.1:{server.getsockname()[1]}/"
        start = time.monotonic()
        with pytest.raises(UserError, match="timed out"):
            data.download("mnist", tmp_path, base_urls=[url], progress=False, read_timeout=0.3)
        assert time.monotonic() - start < 3


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets


@needs_tfds
def test_tfds_source_with_mock_data() -> None:
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        ds = data.load_dataset("fashion_mnist", source="tfds")
    for split in (ds.train, ds.test):
        assert split.images.shape == (12, 28, 28) and split.images.dtype == np.uint8
        assert split.labels.dtype == np.int32 and 0 <= split.labels.min() <= split.labels.max() < 10
    assert ds.class_names == data.CLASS_NAMES["fashion_mnist"] and ds.origin == "tfds"


@needs_tfds
def test_tfds_extra_brings_what_tfds_imports_to_prepare_data() -> None:
    from tensorflow_datasets.core import dataset_builder

    # tfds imports it lazily, only once a dataset is being prepared: check both ends.
    assert dataset_builder.importlib_resources.abc.Traversable
    requires = importlib.metadata.requires("mnist-jax") or []
    assert any(r.startswith("importlib_resources") and 'extra == "tfds"' in r for r in requires)


@needs_tfds
def test_tfds_unprepared_fails_fast_without_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorflow_datasets as tfds

    def no_download(*args, **kwargs):
        pytest.fail("source 'tfds' tried to download")  # BaseException: nothing catches it

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    tfds_dir = tmp_path / "tfds"
    tfds_dir.mkdir()
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        data.load_dataset("mnist", tfds_dir, source="tfds")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert f"mnist is not prepared in the TFDS data dir {tfds_dir}" in message
    for hint in ("tfds build mnist", "--data-dir", "--source download"):
        assert hint in message
    assert "\n" not in message
    assert list(tfds_dir.iterdir()) == []  # nothing was started in it either


def test_tfds_missing_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(UserError, match=r'pip install "mnist-jax\[tfds\]".*--data-dir'):
        data.load_dataset(source="tfds")


# ---------------------------------------------------------------------------------------------
# the data commands


def invoke(*args: str):
    return CliRunner().invoke(cli.app, ["data", *args])


def test_cli_info_shows_files_shapes_and_counts(mnist_dir: Path) -> None:
    result = invoke("info", "--data-dir", str(mnist_dir))
    assert result.exit_code == 0, result.output
    assert f"{TRAIN_IMAGES}.gz" in result.stdout and "9,630,634 bytes" in result.stdout
    assert "images uint8[60000, 28, 28]" in result.stdout
    assert "0:5923 1:6742" in result.stdout and "0:980 1:1135" in result.stdout


def test_cli_info_before_download(isolated: Path) -> None:
    result = invoke("info", "--dataset", "kmnist")
    assert result.exit_code == 0, result.output
    assert str(isolated / "kmnist") in result.stdout
    assert "codh.rois.ac.jp" in result.stdout and "missing" in result.stdout


def test_cli_verify_real_files(mnist_dir: Path) -> None:
    result = invoke("verify", "--data-dir", str(mnist_dir))
    assert result.exit_code == 0, result.output
    assert result.stdout.count("MD5 ok") == 4


def test_cli_verify_reports_each_file(tmp_path: Path, real: data.Dataset) -> None:
    contents = small_contents(real)
    contents[TRAIN_IMAGES] = idx(IMAGES_5, 2049)
    del contents[TEST_LABELS]
    directory = write_files(tmp_path / "bad", contents)
    result = invoke("verify", "--data-dir", str(directory))
    assert result.exit_code == 1
    lines = {line.split()[1].rstrip(":"): line for line in result.stdout.splitlines()[1:]}
    assert lines[f"{TRAIN_IMAGES}.gz"].split()[0] == "ERROR"
    assert lines[TEST_LABELS].split()[0] == "MISSING"
    assert "MD5 mismatch" in lines[f"{TRAIN_LABELS}.gz"]
    assert "2 of 4 mnist files failed" in result.stderr


def test_cli_download_and_offline(
    tmp_path: Path, mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(data.CHECKSUMS, "mnist", registered(mnist_dir))
    monkeypatch.setenv(data.MIRROR_ENV, f"http://127.0.0.1:{closed_port()}/")
    result = invoke("download", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: could not download") and result.stderr.count("\n") == 1
    with serve(mnist_dir) as (url, _):
        monkeypatch.setenv(data.MIRROR_ENV, url)
        result = invoke("download", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "60000 train and 10000 test" in result.stdout
    assert len(list((tmp_path / "out").glob("*.gz"))) == 4


def test_cli_unknown_dataset() -> None:
    result = invoke("verify", "--dataset", "emnist")
    assert result.exit_code == 2 and "unknown dataset 'emnist'" in result.stderr
