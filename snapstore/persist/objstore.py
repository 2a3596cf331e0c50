"""The persisted tier on an fsspec URL (object storage): same layout, no directory renames.

:mod:`snapstore.persist` calls these when its root is a URL (``s3://``,
``gs://``, ``abfs://``, ``file://`` ...); everything else (the manifest,
the checksums, who calls what) is shared with the directory tier. Object
stores have no atomic rename of a directory, and a ``mv`` there is a copy,
so publication works by the order of writes instead::

    <root>/<job>/step-<N>/rank-<r>.bin       written first, one object per rank
    <root>/<job>/step-<N>/MANIFEST.msgpack   written last (one PUT: whole or absent)

A step is complete exactly when its manifest exists; readers never look at
a step without one, whatever rank objects it holds (a flush that died, or
one in progress). Deleting (retention, or re-flushing a step) removes the
manifest first, so a half-deleted step is never taken for a complete one.
:func:`clean_leftovers` removes steps without a manifest at the start of
the job's next flush, when none of its flushes runs.

Credentials and options are fsspec's own: its configuration file or
``FSSPEC_<PROTOCOL>_<OPTION>`` environment variables, set wherever an SMP,
the coordinator or a reader runs. Never in the URL: the URL is shown by
``snapstore status`` and the REST server (:func:`check_url` refuses a
password there: :class:`snapstore.config.StoreConfig` does). A filesystem
that lives in one process (``memory://``) is refused there too: the SMPs,
the coordinator and readers are separate processes.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
import urllib.parse
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
from fsspec.spec import AbstractFileSystem

from snapstore.config import JOB_NAME_RE
from snapstore.errors import ConfigError, PersistFailedError, SnapstoreError

__all__ = [
    "Sink",
    "begin_step",
    "clean_leftovers",
    "complete_steps",
    "list_jobs",
    "open_read",
    "prepare_dir",
    "publish",
    "reach",
    "read_bytes",
    "remove_step",
]

MANIFEST_NAME = "MANIFEST.msgpack"  # of every step, at a URL or in a directory
STEP_RE = re.compile(r"^step-(\d+)$")  # a step directory's name, at a URL or in a directory


def _fs(url: str) -> tuple[AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def reach(url: str) -> None:
    """ConfigError unless ``url``'s filesystem driver is installed and its root can be made."""
    protocol = urllib.parse.urlsplit(url).scheme
    try:
        fsspec.get_filesystem_class(protocol)
        prepare_dir(url)
    except (ValueError, ImportError, OSError, PersistFailedError) as e:
        raise ConfigError(f"persist_dir {url!r}: {e}") from None


@contextlib.contextmanager
def _failing_as(kind: type[Exception], what: str) -> Iterator[None]:
    """Re-raise what a driver raises (its own exception types) as ``kind``, naming ``what``.

    OSError passes through: callers already handle it as an I/O failure (and
    reads ask for OSError: a reader treats a file it cannot read as damaged).
    """
    try:
        yield
    except (OSError, SnapstoreError):
        raise
    except Exception as e:
        raise kind(f"{what}: {type(e).__name__}: {e}") from e


def prepare_dir(url: str) -> None:
    """Create ``url`` as a directory where the filesystem has them (a no-op on object stores)."""
    fs, path = _fs(url)
    with _failing_as(PersistFailedError, f"creating {url}"):
        fs.makedirs(path, exist_ok=True)


def begin_step(job_url: str, step_url: str) -> str:
    """Ready ``step_url`` for a flush (no flush of the job runs): return where ranks go.

    Leftovers of flushes that died are removed; an existing copy of the same
    step is removed manifest first (it stops being a step before any of its
    files is overwritten).
    """
    prepare_dir(job_url)
    clean_leftovers(job_url)
    # Unconditionally: fsspec's exists() says False on any error, and a
    # complete step taken for absent would get new bytes under its old manifest.
    remove_step(step_url)
    prepare_dir(step_url)
    return step_url


class Sink:
    """One rank object being written: the object store sees it whole when it is closed.

    Large objects go up in parts as the buffer fills (multipart upload); the
    object exists only after :meth:`finish`. A failed write leaves at most an
    object in a step without a manifest, which no reader lists.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        fs, path = _fs(url)
        with _failing_as(PersistFailedError, f"opening {url} for writing"):
            self._f = fs.open(path, "wb")

    def write(self, view: np.ndarray) -> None:
        with _failing_as(PersistFailedError, f"writing {self.url}"):
            self._f.write(view.data)

    def finish(self) -> None:
        with _failing_as(PersistFailedError, f"completing {self.url}"):
            self._f.close()

    def close(self) -> None:
        if not self._f.closed:
            with contextlib.suppress(Exception):
                self._f.close()


def publish(step_url: str, files: dict[str, int], manifest: bytes) -> None:
    """Check the rank objects (name -> size) are all there, then write the manifest.

    The manifest goes up under a temporary name and is moved into place, so
    that also a filesystem whose writes are not atomic (``file://``) shows
    it whole or not at all.
    """
    fs, path = _fs(step_url)
    try:
        entries = _listing(fs, path, step_url, detail=True)
    except FileNotFoundError:
        entries = []
    except OSError as e:
        raise PersistFailedError(f"cannot publish {step_url}: {e}") from e
    have = {_name(e["name"]): e.get("size") for e in entries}
    for name, size in files.items():
        if name not in have:
            raise PersistFailedError(f"cannot publish {step_url}: {name} is missing")
        if have[name] != size:
            raise PersistFailedError(
                f"cannot publish {step_url}: {name} holds {have[name]} bytes, the manifest "
                f"says {size}"
            )
    tmp = posixpath.join(path, MANIFEST_NAME + ".new")
    with _failing_as(PersistFailedError, f"writing the manifest of {step_url}"):
        fs.pipe_file(tmp, manifest)
        fs.mv(tmp, posixpath.join(path, MANIFEST_NAME))


def remove_step(step_url: str) -> None:
    """Delete a step: its manifest first (it is no step from then on), then the rest."""
    fs, path = _fs(step_url)
    with _failing_as(PersistFailedError, f"deleting {step_url}"):
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(posixpath.join(path, MANIFEST_NAME))
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=True)


def _listing(fs: AbstractFileSystem, path: str, url: str, detail: bool = False) -> list[Any]:
    """``fs.ls`` as written by other processes just now, driver errors as OSError.

    Listings are read fresh (drivers such as s3fs cache them, and the rank
    objects are written by the SMPs, not by this process); FileNotFoundError
    means there is nothing there.
    """
    with _failing_as(OSError, f"listing {url}"):
        fs.invalidate_cache(path)
        return list(fs.ls(path, detail=detail))


def _name(entry: Any) -> str:
    return posixpath.basename(str(entry).rstrip("/"))


def _steps(job_url: str) -> tuple[AbstractFileSystem, str, dict[str, bool]]:
    """The job's step directories and whether each has its manifest.

    Listed directory by directory, never with glob: a glob leaves out what it
    cannot list, and a complete step missed here would be deleted as a
    leftover.
    """
    fs, path = _fs(job_url)
    try:
        names = [_name(e) for e in _listing(fs, path, job_url)]
    except FileNotFoundError:
        return fs, path, {}
    out = {}
    for n in names:
        if not STEP_RE.fullmatch(n):
            continue
        try:
            inside = _listing(fs, posixpath.join(path, n), posixpath.join(job_url, n))
        except FileNotFoundError:
            continue  # deleted meanwhile
        out[n] = any(_name(e) == MANIFEST_NAME for e in inside)
    return fs, path, out


def complete_steps(job_url: str) -> list[int]:
    """Steps of the job that have a manifest, oldest first."""
    _, _, steps = _steps(job_url)
    return sorted(int(n.removeprefix("step-")) for n, complete in steps.items() if complete)


def clean_leftovers(job_url: str, keep: str | None = None) -> list[str]:
    """Delete step directories without a manifest (flushes or deletions that died)."""
    fs, path, steps = _steps(job_url)
    removed = []
    for n, complete in sorted(steps.items()):
        if complete or posixpath.join(job_url, n) == keep:
            continue
        gone = contextlib.suppress(FileNotFoundError)
        with _failing_as(PersistFailedError, f"deleting {job_url}/{n}"), gone:
            fs.rm(posixpath.join(path, n), recursive=True)
        removed.append(n)
    return removed


def list_jobs(root_url: str) -> list[str]:
    fs, path = _fs(root_url)
    try:
        entries = _listing(fs, path, root_url, detail=True)
    except FileNotFoundError:
        return []
    names = [_name(e["name"]) for e in entries if e.get("type") == "directory"]
    return sorted(n for n in names if JOB_NAME_RE.fullmatch(n))


def read_bytes(url: str, limit: int | None = None) -> bytes:
    """The object's bytes; with ``limit``, at most ``limit + 1`` of them (the caller
    refuses more than ``limit``: a forged object must not fill memory)."""
    fs, path = _fs(url)
    with _failing_as(OSError, f"reading {url}"):
        if limit is None:
            return bytes(fs.cat_file(path))
        return bytes(fs.cat_file(path, start=0, end=limit + 1))


def open_read(url: str) -> tuple[Any, int]:
    """A binary file object for ``url`` (seek, readinto) and the object's size."""
    fs, path = _fs(url)
    with _failing_as(OSError, f"opening {url}"):
        f = fs.open(path, "rb", cache_type="none")
        size = getattr(f, "size", None)
        return f, int(fs.size(path) if size is None else size)
