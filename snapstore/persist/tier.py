"""The persisted tier: layout, atomic publication, retention, verified reads.

The manifest's format and checks are :mod:`snapstore.persist.manifest`.

Pure files (no Ray, no torch), so it is tested on its own and read with no
running store (``snapstore export``). The root is a directory (local disk or
a mount every node shares) or an fsspec URL (object storage); a URL is
handled by :mod:`snapstore.persist.objstore` with the same layout and manifest but
its own publication protocol (no directory renames there: a step is
complete when its manifest, written last, exists). Layout under a directory::

    <root>/<job>/step-<N>/MANIFEST.msgpack   the step's manifest (written last)
    <root>/<job>/step-<N>/rank-<r>.bin       rank r's staged buffer, byte for byte
    <root>/<job>/step-<N>.partial/           a flush in progress, or one that died
    <root>/<job>/step-<N>.trash/             a step being deleted by retention

A rank file is exactly the buffer the rank staged in memory (tensor data,
its msgpack manifest, the 32-byte trailer of :mod:`snapstore.format.frame`), so it
unpacks with :func:`snapstore.format.pack.unpack` after :func:`snapstore.format.frame.read_frame`.

Protocol of one flush (see :mod:`snapstore.control.flush` for who calls what):

1. :func:`write_rank` for each rank into ``step-<N>.partial/``: chunked
   writes through a token bucket, each of the k pieces hashed (XXH3-64) as it
   is written, fsync at the end.
2. :func:`publish_step`: ``MANIFEST.msgpack`` (format version, job, step,
   world size, per rank its file, size and piece checksums) written and
   fsynced into the partial directory, which is then renamed to
   ``step-<N>`` and its parent fsynced. A step is visible (complete) only
   after this rename: a crash at any earlier point leaves a ``.partial``
   directory that readers ignore and :func:`clean_leftovers` removes.
3. :func:`retain` removes the oldest complete steps beyond K, each first
   renamed to ``.trash`` so that a half-deleted step is never mistaken for
   a complete one.

The protocol of a URL root differs in steps 1-3 only: rank objects go
straight into ``step-<N>/``, the manifest is written last, and deletion
removes the manifest first (see :mod:`snapstore.persist.objstore`).

Reads verify every piece against the manifest (:func:`read_rank`,
:func:`verify_rank`) and raise :class:`PersistedStepCorruptError` naming the
file and what is wrong.

Whoever can write the root is not trusted further than that: a manifest is
read only up to :data:`MAX_MANIFEST_BYTES` and every count in it is bounded
before anything is allocated (:data:`MAX_WORLD_SIZE`, :data:`MAX_K`); a
manifest that fails any check makes its step *corrupt* in listings
(:attr:`PersistedStep.problem`), never an exception out of them.

Permissions (directory roots): every directory snapstore creates under the
root is 0700 and every file 0600, whatever the umask; job directories are
checked (owned by this user, not a symlink) before a flush writes into
them. A URL root's access is the object store's (bucket policies, ACLs);
see docs/operating.md, Security.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from snapstore.config import JOB_NAME_RE, check_job_name
from snapstore.errors import FormatError, PersistedStepCorruptError, PersistFailedError
from snapstore.format.record import piece_bounds
from snapstore.persist import objstore
from snapstore.persist.manifest import (
    MAX_MANIFEST_BYTES,
    PERSIST_VERSION,
    PersistedRank,
    PersistManifest,
    rank_file,
)
from snapstore.persist.throttle import TokenBucket
from snapstore.private import DIR_MODE, FILE_MODE, private_dir

__all__ = [
    "MANIFEST_NAME",
    "PERSIST_VERSION",
    "PersistManifest",
    "PersistedRank",
    "PersistedStep",
    "begin_step",
    "clean_leftovers",
    "is_url",
    "job_dir",
    "list_jobs",
    "list_steps",
    "newest_first",
    "partial_dir",
    "prepare_dir",
    "prepare_root",
    "publish_step",
    "rank_file",
    "read_manifest",
    "read_rank",
    "retain",
    "step_dir",
    "verify_rank",
    "write_rank",
]

MANIFEST_NAME = objstore.MANIFEST_NAME
PARTIAL = ".partial"
TRASH = ".trash"
CHUNK = 8 << 20
# Written bytes are forced to disk and dropped from the page cache this often:
# the flush must not fill the node's memory with dirty pages of a copy of
# what is already in memory, nor leave a long fsync for the end.
SYNC_EVERY = 64 << 20
_LEFTOVER_RE = re.compile(r"^step-(\d+)\.(partial|trash)$")
_ALIGN = 64


def is_url(root: str) -> bool:
    """Whether ``root`` is an fsspec URL (object storage, ``file://``) rather than a directory."""
    return "://" in root


def job_dir(root: str, job: str) -> str:
    """``root/job``; ConfigError for a job name the store would not accept (``/etc``, ``..``)."""
    return os.path.join(root, check_job_name(job))


def step_dir(root: str, job: str, step: int) -> str:
    return os.path.join(root, job, f"step-{step}")


def partial_dir(root: str, job: str, step: int) -> str:
    return step_dir(root, job, step) + PARTIAL


# -- writing ----------------------------------------------------------------------


def _write_all(fd: int, buf: Any) -> None:
    view = memoryview(buf).cast("B")
    while view.nbytes:
        n = os.write(fd, view)
        view = view[n:]


def fsync_dir(path: str) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileSink:
    """A rank file on a local or mounted filesystem: synced to disk and dropped from
    the page cache as it grows, fsynced at the end."""

    def __init__(self, path: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd = os.open(path, flags, FILE_MODE)
        os.fchmod(self.fd, FILE_MODE)  # a file left by an older flush may have another mode
        self.written = self.synced = 0

    def write(self, view: np.ndarray) -> None:
        _write_all(self.fd, view)
        self.written += len(view)
        if self.written - self.synced >= SYNC_EVERY:
            os.fdatasync(self.fd)
            _drop_cache(self.fd, self.synced, self.written - self.synced)
            self.synced = self.written

    def finish(self) -> None:
        os.fsync(self.fd)
        _drop_cache(self.fd, self.synced, self.written - self.synced)

    def close(self) -> None:
        os.close(self.fd)


def _makedirs(path: str) -> None:
    """``os.makedirs`` giving every directory it creates mode 0700, whatever the umask."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        _makedirs(parent)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return
    os.chmod(path, DIR_MODE)


def prepare_root(root: str) -> None:
    """Create a directory root (0700) if it is missing; an existing one keeps its mode."""
    if not is_url(root):
        _makedirs(root)


def prepare_dir(path: str) -> None:
    """Create the directory ``path``, 0700 (on an object store: nothing to create)."""
    if is_url(path):
        objstore.prepare_dir(path)
    else:
        _makedirs(path)


def write_rank(
    path: str,
    src: np.ndarray,
    k: int,
    bucket: TokenBucket | None = None,
    *,
    hurry: Callable[[], bool] | None = None,
    cancelled: Callable[[], bool] | None = None,
    after_chunk: Callable[[int], None] | None = None,
    chunk: int = CHUNK,
) -> tuple[int, ...]:
    """Write ``src`` (a rank's whole buffer) to ``path``, durably; return its k piece sums.

    A path is fsynced; a URL's object exists once it is completely uploaded.

    Each piece is hashed as it is written, from the very bytes written.
    ``bucket`` paces the writes; while ``hurry()`` is true the pace is
    ignored (training waits for the memory being read). ``cancelled()``
    true stops the write with PersistFailedError. ``after_chunk(written)``
    is called after each chunk (failure injection: it may raise or stall).
    """
    size = len(src)
    if is_url(path):
        out: _FileSink | objstore.Sink = objstore.Sink(path)
    else:
        out = _FileSink(path)
    try:
        sums = []
        written = 0
        for j in range(k):
            off, length = piece_bounds(size, k, j)
            h = xxhash.xxh3_64()
            pos, end = off, off + length
            while pos < end:
                if cancelled is not None and cancelled():
                    raise PersistFailedError(f"writing {path} was cancelled after {written} bytes")
                n = min(chunk, end - pos)
                if bucket is not None and not (hurry is not None and hurry()):
                    bucket.take(n, interrupt=hurry)
                view = src[pos : pos + n]
                h.update(view.data)
                out.write(view)
                pos += n
                written += n
                if after_chunk is not None:
                    after_chunk(written)
            sums.append(h.intdigest())
        out.finish()
        return tuple(sums)
    finally:
        out.close()


def _drop_cache(fd: int, offset: int, length: int) -> None:
    if length > 0 and hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def begin_step(root: str, job: str, step: int) -> str:
    """Ready a flush of ``step`` (none of the job's flushes runs): return where rank files go.

    Leftovers of flushes that died are removed first. In a directory the
    ranks go to ``step-<N>.partial`` (renamed at publication; an older copy
    of the step stays readable until then); at a URL straight to
    ``step-<N>``, an older copy of the step being deleted first.
    """
    if is_url(root):
        return objstore.begin_step(job_dir(root, job), step_dir(root, job, step))
    partial = partial_dir(root, job, step)
    _makedirs(root)
    private_dir(job_dir(root, job), f"job directory of {job!r} in the persist root")
    clean_leftovers(root, job)
    shutil.rmtree(partial, ignore_errors=True)
    os.mkdir(partial, DIR_MODE)
    os.chmod(partial, DIR_MODE)
    return partial


def publish_step(root: str, manifest: PersistManifest) -> str:
    """Write the manifest of a step whose rank files are written and make the step visible.

    Every rank file must already be written durably (in the directory
    :func:`begin_step` returned). Returns the step's directory. An older
    copy of the same step, if any, is replaced.
    """
    if is_url(root):
        final = step_dir(root, manifest.job, manifest.step)
        objstore.publish(
            final, {e.file: e.size for e in manifest.ranks.values()}, manifest.to_bytes()
        )
        return final
    partial = partial_dir(root, manifest.job, manifest.step)
    final = step_dir(root, manifest.job, manifest.step)
    for r, e in manifest.ranks.items():
        path = os.path.join(partial, e.file)
        try:
            got = os.stat(path).st_size
        except OSError as ex:
            raise PersistFailedError(f"cannot publish step {manifest.step}: rank {r}: {ex}") from ex
        if got != e.size:
            raise PersistFailedError(
                f"cannot publish step {manifest.step}: {path} holds {got} bytes, "
                f"the manifest says {e.size}"
            )
    tmp = os.path.join(partial, MANIFEST_NAME + ".new")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, FILE_MODE)
    try:
        _write_all(fd, manifest.to_bytes())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(partial, MANIFEST_NAME))
    fsync_dir(partial)
    parent = job_dir(root, manifest.job)
    if os.path.exists(final):
        _trash(final)
    os.rename(partial, final)
    fsync_dir(parent)
    return final


def _trash(path: str) -> None:
    """Rename a step directory out of sight (atomic), then delete it."""
    trash = path + TRASH
    if os.path.exists(trash):
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    fsync_dir(os.path.dirname(path))
    shutil.rmtree(trash, ignore_errors=True)


# -- listing, retention, cleanup -----------------------------------------------------


@dataclass(frozen=True)
class PersistedStep:
    """A complete persisted step, as listed: its directory, when it was written, its bytes.

    ``problem``: why its manifest cannot be used (unreadable, malformed);
    None for a step whose manifest reads. Its rank files are not checked
    by a listing (:func:`verify_rank` does).
    """

    step: int
    path: str
    time: float
    bytes: int
    world_size: int
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "path": self.path,
            "time": self.time,
            "bytes": self.bytes,
            "world_size": self.world_size,
        }


def list_jobs(root: str) -> list[str]:
    """Jobs with a directory under ``root`` (complete steps or not)."""
    if is_url(root):
        return objstore.list_jobs(root)
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return sorted(n for n in names if JOB_NAME_RE.fullmatch(n) and os.path.isdir(job_dir(root, n)))


def _complete_dirs(root: str, job: str) -> list[tuple[int, str]]:
    if is_url(root):
        return [(s, step_dir(root, job, s)) for s in objstore.complete_steps(job_dir(root, job))]
    base = job_dir(root, job)
    try:
        names = os.listdir(base)
    except OSError:
        return []
    out = []
    for n in names:
        m = objstore.STEP_RE.fullmatch(n)
        if m and os.path.isfile(os.path.join(base, n, MANIFEST_NAME)):
            out.append((int(m.group(1)), os.path.join(base, n)))
    return sorted(out)


def list_steps(root: str, job: str) -> list[PersistedStep]:
    """The job's complete persisted steps, oldest first.

    A step whose manifest cannot be used is listed with its ``problem``
    (and 0 bytes): one bad file never fails the listing.
    """
    out = []
    for step, path in _complete_dirs(root, job):
        try:
            man = read_manifest(path)
        except PersistedStepCorruptError as e:
            out.append(PersistedStep(step, path, 0.0, 0, 0, problem=str(e)))
            continue
        out.append(PersistedStep(step, path, man.created_at, man.data_bytes(), man.world_size))
    return out


def retain(root: str, job: str, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` complete steps; return the steps deleted."""
    steps = _complete_dirs(root, job)
    doomed = steps[: max(0, len(steps) - keep)]
    for _, path in doomed:
        if is_url(root):
            objstore.remove_step(path)
        else:
            _trash(path)
    return [s for s, _ in doomed]


def clean_leftovers(root: str, job: str, keep: str | None = None) -> list[str]:
    """Delete ``.partial`` and ``.trash`` directories of a job (a flush or deletion
    that died), except ``keep`` (the partial directory of a flush in progress).
    At a URL: step directories without a manifest."""
    if is_url(root):
        return objstore.clean_leftovers(job_dir(root, job), keep)
    base = job_dir(root, job)
    try:
        names = os.listdir(base)
    except OSError:
        return []
    removed = []
    for n in names:
        path = os.path.join(base, n)
        if _LEFTOVER_RE.fullmatch(n) and path != keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(n)
    return sorted(removed)


# -- reading --------------------------------------------------------------------------


def _read_bytes(path: str, limit: int | None = None) -> bytes:
    """The file's bytes; FormatError when it holds more than ``limit`` (a manifest's)."""
    limit = MAX_MANIFEST_BYTES if limit is None else limit
    if is_url(path):
        data = objstore.read_bytes(path, limit)
    else:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    if len(data) > limit:
        raise FormatError(f"{path} holds more than {limit} bytes; not a manifest")
    return data


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def read_manifest(path: str) -> PersistManifest:
    """The manifest of the step directory ``path``; PersistedStepCorruptError if unusable."""
    mpath = os.path.join(path, MANIFEST_NAME)
    try:
        return PersistManifest.from_bytes(_read_bytes(mpath))
    except OSError as e:
        raise PersistedStepCorruptError(mpath, f"cannot read the manifest: {_why(e)}") from None
    except FormatError as e:
        raise PersistedStepCorruptError(mpath, str(e)) from None
    except (MemoryError, ValueError, TypeError, OverflowError, RecursionError) as e:
        # Bounded decoding makes these unreachable; a listing must survive them regardless.
        raise PersistedStepCorruptError(mpath, f"cannot decode the manifest: {e!r:.200}") from None


def _open_rank(path: str, man: PersistManifest, rank: int) -> tuple[Any, PersistedRank, str]:
    entry = man.ranks.get(rank)
    if entry is None:
        raise PersistedStepCorruptError(
            path, f"step {man.step} has no rank {rank} (world size {man.world_size})"
        )
    fpath = os.path.join(path, entry.file)
    try:
        if is_url(fpath):
            f, size = objstore.open_read(fpath)
        else:
            f = open(fpath, "rb")  # noqa: SIM115 -- closed by the callers' with
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise PersistedStepCorruptError(fpath, f"cannot open: {_why(e)}") from None
    if size != entry.size:
        f.close()
        raise PersistedStepCorruptError(
            fpath, f"holds {size} bytes, the manifest says {entry.size} (truncated or replaced)"
        )
    return f, entry, fpath


def _check_pieces(buf: np.ndarray, entry: PersistedRank, k: int, fpath: str) -> None:
    for j in range(k):
        off, length = piece_bounds(entry.size, k, j)
        got = xxhash.xxh3_64_intdigest(buf[off : off + length].data)
        if got != entry.sums[j]:
            raise PersistedStepCorruptError(
                fpath,
                f"piece {j} (bytes {off}..{off + length}) fails its checksum: expected "
                f"{entry.sums[j]:#018x}, found {got:#018x}",
            )


def read_rank(path: str, rank: int, manifest: PersistManifest | None = None) -> np.ndarray:
    """Rank ``rank``'s buffer of the step directory ``path``, every piece verified.

    Returns a new 64-byte-aligned uint8 array of the rank's size.
    """
    man = manifest or read_manifest(path)
    f, entry, fpath = _open_rank(path, man, rank)
    with f:
        raw = np.empty(entry.size + _ALIGN, dtype=np.uint8)
        skip = -raw.ctypes.data % _ALIGN
        buf = raw[skip : skip + entry.size]
        view = buf.data
        got = 0
        while got < entry.size:
            n = f.readinto(view[got:])
            if not n:
                raise PersistedStepCorruptError(fpath, f"ends after {got} of {entry.size} bytes")
            got += n
    _check_pieces(buf, entry, man.k, fpath)
    return buf


def verify_rank(path: str, rank: int, manifest: PersistManifest | None = None) -> int:
    """Check rank ``rank``'s file of a step directory without keeping it; return its size."""
    man = manifest or read_manifest(path)
    f, entry, fpath = _open_rank(path, man, rank)
    block = np.empty(CHUNK, dtype=np.uint8)
    with f:
        for j in range(man.k):
            off, length = piece_bounds(entry.size, man.k, j)
            h = xxhash.xxh3_64()
            f.seek(off)
            left = length
            while left:
                n = f.readinto(block.data[: min(CHUNK, left)])
                if not n:
                    raise PersistedStepCorruptError(fpath, f"ends inside piece {j}")
                h.update(block[:n].data)
                left -= n
            if h.intdigest() != entry.sums[j]:
                raise PersistedStepCorruptError(
                    fpath,
                    f"piece {j} (bytes {off}..{off + length}) fails its checksum: expected "
                    f"{entry.sums[j]:#018x}, found {h.intdigest():#018x}",
                )
    return entry.size


def newest_first(root: str, job: str, step: int | None = None) -> list[tuple[int, str]]:
    """(step, directory) of complete steps to try, newest first; only ``step`` if given."""
    steps = _complete_dirs(root, job)
    if step is not None:
        steps = [(s, p) for s, p in steps if s == step]
    return list(reversed(steps))
