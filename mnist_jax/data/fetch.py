"""Verified downloads of the four ``.gz`` files of a dataset from its mirrors.

Each file is streamed into a temp file while it is hashed, and gets its name only once its size
and SHA-256 match the registry; a failed or tampered download leaves nothing behind. Mirrors come
from the registry or ``$MNIST_JAX_MIRROR``; a rich progress bar shows on stderr when asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from mnist_jax.data.locations import CACHE_DIR_ENV, DATA_DIR_ENV, dataset_cache_dir
from mnist_jax.data.registry import CHECKSUMS, MIRRORS, check_name
from mnist_jax.errors import UserError
from mnist_jax.files import atomic_write

MIRROR_ENV = "MNIST_JAX_MIRROR"

# A connection that cannot be made in a few seconds will not be made at all: offline machines
# must hear so at once. Once connected, a slow mirror gets longer between bytes.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 30.0


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
    with atomic_write(target, "wb") as out:
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
