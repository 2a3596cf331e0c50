"""Shared-memory segments: files under /dev/shm, mapped with mmap.

An SMP owns the segments of its node: it creates, grows, renames and
deletes them. Trainers and peer SMPs on the same host only map them.
Plain ``mmap`` of a file is used on purpose: ``multiprocessing.shared_memory``
registers every attached segment with a resource tracker that unlinks it when
the attaching process exits, so a trainer that exits or crashes would destroy
its node's snapshot.

Creating a segment allocates its pages (``posix_fallocate``) and maps it with
``MAP_POPULATE``: the first write into fresh memory costs about 30 times a
warm copy, and that cost must be paid once, when the slot is made, not in
the training loop.

File names say what a segment holds, so readers on the same host find a
chunk without asking its SMP, and a restarted SMP re-adopts what it had:

- ``d.<job>.r<rank>.s<step>.seg``: rank ``rank``'s staged buffer of ``step``
- ``p.<job>.s<step>.v<version>.seg``: this node's parity chunks of a step
- ``x.<job>.r<rank>.<n>.seg`` / ``x.<job>.p.<n>.seg``: spare, reusable slots
- ``w.<job>.r<rank>.seg``: the slot a rank's trainer is leased to write next
- ``z.<job>.r<rank>.<0|1>.seg``: XOR deltas of a rank's last save against its
  previous step, for updating parity without moving unchanged bytes
- ``rec.<job>.msgpack``: the last committed record of the job
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MappingCache",
    "Segment",
    "SegmentName",
    "data_name",
    "delta_name",
    "iter_dir",
    "parity_name",
    "parse_name",
    "prepared_name",
    "record_name",
    "shm_root",
    "spare_name",
    "work_name",
]

_DATA_RE = re.compile(r"^d\.(?P<job>[A-Za-z0-9._-]+)\.r(?P<rank>\d+)\.s(?P<step>\d+)\.seg$")
_PARITY_RE = re.compile(r"^p\.(?P<job>[A-Za-z0-9._-]+)\.s(?P<step>\d+)\.v(?P<version>\d+)\.seg$")
_SPARE_RE = re.compile(r"^x\.(?P<job>[A-Za-z0-9._-]+)\.(?P<kind>r\d+|p)\.(?P<n>\d+)\.seg$")
_WORK_RE = re.compile(r"^w\.(?P<job>[A-Za-z0-9._-]+)\.r(?P<rank>\d+)\.seg$")
_DELTA_RE = re.compile(r"^z\.(?P<job>[A-Za-z0-9._-]+)\.r(?P<rank>\d+)\.(?P<bit>[01])\.seg$")


def shm_root() -> str:
    """Where segments live: ``$SNAPSTORE_SHM_DIR``, else /dev/shm, else the temp dir."""
    root = os.environ.get("SNAPSTORE_SHM_DIR")
    if root:
        return root
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    import tempfile

    return tempfile.gettempdir()


def data_name(job: str, rank: int, step: int) -> str:
    return f"d.{job}.r{rank}.s{step}.seg"


def parity_name(job: str, step: int, version: int) -> str:
    return f"p.{job}.s{step}.v{version}.seg"


def spare_name(job: str, rank: int | None, n: int) -> str:
    kind = "p" if rank is None else f"r{rank}"
    return f"x.{job}.{kind}.{n}.seg"


def work_name(job: str, rank: int) -> str:
    return f"w.{job}.r{rank}.seg"


def delta_name(job: str, rank: int, bit: int) -> str:
    """Two per rank, by step parity: a step's deltas stay intact while the next is staged."""
    return f"z.{job}.r{rank}.{bit & 1}.seg"


def record_name(job: str) -> str:
    return f"rec.{job}.msgpack"


def prepared_name(job: str, step: int, version: int) -> str:
    """A prepared (not yet committed) slice of a step record kept by a node."""
    return f"prep.{job}.s{step}.v{version}.msgpack"


@dataclass(frozen=True)
class SegmentName:
    """What a segment file name says: kind "data", "parity", "spare", "work" or "delta"."""

    kind: str
    job: str
    rank: int | None = None
    step: int | None = None
    version: int | None = None


@functools.lru_cache(maxsize=8192)
def parse_name(name: str) -> SegmentName | None:
    """What a segment file name says, or None for a name that is not a segment's.

    Cached: the slot table asks for the same few names on every operation."""
    if m := _DATA_RE.fullmatch(name):
        return SegmentName("data", m["job"], rank=int(m["rank"]), step=int(m["step"]))
    if m := _PARITY_RE.fullmatch(name):
        return SegmentName("parity", m["job"], step=int(m["step"]), version=int(m["version"]))
    if m := _WORK_RE.fullmatch(name):
        return SegmentName("work", m["job"], rank=int(m["rank"]))
    if m := _DELTA_RE.fullmatch(name):
        return SegmentName("delta", m["job"], rank=int(m["rank"]))
    if m := _SPARE_RE.fullmatch(name):
        kind = m["kind"]
        return SegmentName("spare", m["job"], rank=None if kind == "p" else int(kind[1:]))
    return None


class Segment:
    """One mapped shared-memory file. Not thread-safe; its owner serializes use."""

    def __init__(self, path: str, mm: mmap.mmap, size: int, writable: bool) -> None:
        self.path = path
        self.size = size
        self.writable = writable
        self._mm: mmap.mmap | None = mm
        self.array: np.ndarray = (
            np.frombuffer(mm, dtype=np.uint8) if size else np.zeros(0, np.uint8)
        )
        if not writable:
            self.array.flags.writeable = False
        st = os.stat(path)
        self.ident = (st.st_dev, st.st_ino)

    @classmethod
    def create(cls, path: str, size: int) -> Segment:
        """Create (or replace) ``path`` with ``size`` bytes, pages allocated and mapped."""
        tmp = f"{path}.new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if size:
                os.ftruncate(fd, size)
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as e:
                    # ENOSPC: /dev/shm is full. Report it as memory, not as a crash.
                    raise MemoryError(
                        f"cannot allocate {size} bytes of shared memory at {path}: {e}"
                    ) from None
            mm = _map(fd, size, writable=True)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, path)
        return cls(path, mm, size, writable=True)

    @classmethod
    def open(cls, path: str, writable: bool = False) -> Segment:
        """Map an existing segment (e.g. a peer's, or one written before a restart)."""
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            mm = _map(fd, size, writable=writable)
        finally:
            os.close(fd)
        return cls(path, mm, size, writable=writable)

    def view(self, offset: int, length: int) -> np.ndarray:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"range [{offset}, {offset + length}) outside segment {self.path} "
                f"of {self.size} bytes"
            )
        return self.array[offset : offset + length]

    def rename(self, path: str) -> None:
        """Give the segment a new name; the mapping stays valid."""
        if path != self.path:
            os.replace(self.path, path)
            self.path = path

    def still_current(self) -> bool:
        """Whether ``path`` still names the file this segment maps."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.ident and st.st_size == self.size

    def close(self) -> None:
        """Unmap. Views handed out earlier keep the memory mapped until they die."""
        mm, self._mm = self._mm, None
        self.array = np.zeros(0, np.uint8)
        if mm is not None:
            with contextlib.suppress(BufferError):
                mm.close()

    def unlink(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


FileKey = tuple[int, int]
"""A file's identity, (device, inode): it survives renames."""


class MappingCache:
    """Mappings of segment files, keyed by file identity; the least recently used go first.

    A slot keeps its inode when it is renamed from step to step (work ->
    data -> spare -> work), so one mapping serves every step the slot is
    reused for: a fresh mapping of a large segment costs page-table work
    for every page (``MAP_POPULATE``), each time. At most ``keep`` mappings
    stay; a file its owner has deleted is unmapped at the next miss, so a
    dropped slot's memory is not kept alive by a reader. ``on_close`` is
    called with each segment before it is unmapped. Not thread-safe.
    """

    def __init__(self, keep: int, on_close: Callable[[FileKey, Segment], None] | None = None):
        self._keep = keep
        self._on_close = on_close
        self._maps: OrderedDict[FileKey, tuple[Segment, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._maps)

    def get(self, path: str, writable: bool = False) -> tuple[Segment, FileKey]:
        """The mapping of the file ``path`` names now (OSError if it names none)."""
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        hit = self._maps.get(key)
        if hit is not None:
            seg, _ = hit
            if seg.size == st.st_size and (seg.writable or not writable):
                seg.path = path
                self._maps.move_to_end(key)
                return seg, key
            self.drop(key)
        self._prune()
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            st = os.fstat(fd)
            seg = Segment(path, _map(fd, st.st_size, writable), st.st_size, writable=writable)
        except BaseException:
            os.close(fd)
            raise
        seg.ident = (st.st_dev, st.st_ino)  # of what was opened, even if since renamed
        # The fd stays open (one per mapping) to tell when the file is deleted.
        self._maps[seg.ident] = (seg, fd)
        while len(self._maps) > self._keep:
            self.drop(next(iter(self._maps)))
        return seg, seg.ident

    def drop(self, key: FileKey) -> None:
        seg, fd = self._maps.pop(key)
        try:
            if self._on_close is not None:
                self._on_close(key, seg)
        finally:
            seg.close()
            os.close(fd)

    def drop_under(self, directory: str) -> None:
        """Unmap every file mapped from ``directory`` (its node was lost)."""
        for key in [k for k, (s, _) in self._maps.items() if s.path.startswith(directory + os.sep)]:
            self.drop(key)

    def close(self) -> None:
        for key in list(self._maps):
            self.drop(key)

    def _prune(self) -> None:
        for key in [k for k, (_, fd) in self._maps.items() if os.fstat(fd).st_nlink == 0]:
            self.drop(key)


def _map(fd: int, size: int, writable: bool) -> mmap.mmap:
    if size == 0:
        # mmap refuses empty files; an empty anonymous map stands in.
        return mmap.mmap(-1, 1)
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, size, flags=flags, prot=prot)


def iter_dir(path: str) -> Iterator[tuple[str, SegmentName]]:
    """(file name, parsed name) of every segment file in a node directory."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return
    for name in sorted(names):
        parsed = parse_name(name)
        if parsed is not None:
            yield name, parsed
