"""Shared-memory segments: names, the file lifecycle, and what other processes may do.

The property the design rests on: a process that only maps a segment (a
trainer, a peer SMP) can exit or be killed at any moment and the segment
stays, byte for byte. ``multiprocessing.shared_memory`` breaks exactly this
(its resource tracker unlinks on exit), so it is checked here with real
processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapstore.coding import checksum
from snapstore.config import JOB_NAME_RE
from snapstore.node.segments import (
    Segment,
    SegmentName,
    data_name,
    iter_dir,
    parity_name,
    parse_name,
    record_name,
    shm_root,
    spare_name,
)

_jobs = st.from_regex(JOB_NAME_RE, fullmatch=True).filter(lambda j: "\n" not in j)
_nums = st.integers(0, 10**12)


# -- names ----------------------------------------------------------------------


def test_names_say_what_a_segment_holds() -> None:
    assert data_name("j", 3, 10) == "d.j.r3.s10.seg"
    assert parity_name("j", 10, 2) == "p.j.s10.v2.seg"
    assert spare_name("j", 3, 5) == "x.j.r3.5.seg"
    assert spare_name("j", None, 5) == "x.j.p.5.seg"
    assert record_name("j") == "rec.j.msgpack"


@settings(max_examples=300, deadline=None)
@given(job=_jobs, rank=_nums, step=_nums, version=_nums)
def test_names_round_trip_through_parse_name(job: str, rank: int, step: int, version: int) -> None:
    d = parse_name(data_name(job, rank, step))
    assert d == SegmentName("data", job, rank=rank, step=step)
    assert d is not None and data_name(d.job, rank, step) == data_name(job, rank, step)
    p = parse_name(parity_name(job, step, version))
    assert p == SegmentName("parity", job, step=step, version=version)
    assert parse_name(spare_name(job, rank, version)) == SegmentName("spare", job, rank=rank)
    assert parse_name(spare_name(job, None, version)) == SegmentName("spare", job)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "d.j.r0.s0",
        "d.j.r0.s0.seg.new",  # Segment.create's temporary: never adopted
        "d.j.rx.s0.seg",
        "d.j.r-1.s0.seg",
        "d..r0.s0.seg",
        "d.a/b.r0.s0.seg",
        "p.j.s0.seg",
        "x.j.q.1.seg",
        "rec.j.msgpack",
        "something.seg",
    ],
)
def test_other_names_do_not_parse(name: str) -> None:
    assert parse_name(name) is None


@pytest.mark.parametrize("name", ["d.j.r0.s0.seg\n", "p.j.s0.v0.seg\n", "x.j.p.1.seg\n"])
def test_name_with_trailing_newline_does_not_parse(name: str) -> None:
    assert parse_name(name) is None


def test_iter_dir_lists_segment_files_only(tmp_path: Path) -> None:
    names = [data_name("j", 1, 2), parity_name("j", 2, 0), spare_name("k", None, 1)]
    for n in [*names, record_name("j"), data_name("j", 1, 2) + ".new", "notes.txt"]:
        (tmp_path / n).write_bytes(b"x")
    listed = list(iter_dir(str(tmp_path)))
    assert [n for n, _ in listed] == sorted(names)
    assert all(parse_name(n) == p for n, p in listed)
    assert list(iter_dir(str(tmp_path / "missing"))) == []


def test_shm_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SNAPSTORE_SHM_DIR", str(tmp_path))
    assert shm_root() == str(tmp_path)
    monkeypatch.delenv("SNAPSTORE_SHM_DIR")
    assert os.path.isdir(shm_root())


# -- lifecycle ------------------------------------------------------------------


def _fill(seg: Segment, seed: int) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, seg.size, dtype=np.uint8)
    seg.array[:] = data
    return data.tobytes()


@pytest.mark.parametrize("size", [0, 1, 4096, 100_003])
def test_create_makes_a_zeroed_writable_file_of_the_size(tmp_path: Path, size: int) -> None:
    path = tmp_path / "d.j.r0.s1.seg"
    seg = Segment.create(str(path), size)
    assert seg.size == size == os.path.getsize(path)
    assert seg.writable and seg.array.flags.writeable
    assert not seg.array.any()
    assert not (tmp_path / "d.j.r0.s1.seg.new").exists()
    if size:
        data = _fill(seg, 1)
        assert path.read_bytes() == data  # the file is the memory: no flush needed
    assert seg.still_current()
    seg.close()


def test_open_maps_the_same_bytes_read_only_or_writable(tmp_path: Path) -> None:
    path = str(tmp_path / "d.j.r0.s1.seg")
    owner = Segment.create(path, 1000)
    data = _fill(owner, 2)
    reader = Segment.open(path)
    assert reader.size == 1000 and not reader.writable
    assert reader.array.tobytes() == data
    with pytest.raises(ValueError):
        reader.array[0] = 1
    writer = Segment.open(path, writable=True)
    writer.array[5] ^= 0xFF
    assert reader.array[5] == owner.array[5] == data[5] ^ 0xFF  # one memory, three maps
    for s in (owner, reader, writer):
        s.close()


def test_view_bounds(tmp_path: Path) -> None:
    seg = Segment.create(str(tmp_path / "d.j.r0.s1.seg"), 100)
    assert len(seg.view(0, 100)) == 100 and len(seg.view(100, 0)) == 0
    for off, ln in [(-1, 1), (0, 101), (99, 2), (0, -1)]:
        with pytest.raises(ValueError, match="outside segment"):
            seg.view(off, ln)
    seg.close()


def test_views_outlive_close(tmp_path: Path) -> None:
    seg = Segment.create(str(tmp_path / "d.j.r0.s1.seg"), 256)
    data = _fill(seg, 3)
    v = seg.view(10, 20)
    seg.close()
    assert v.tobytes() == data[10:30]
    assert len(seg.array) == 0
    seg.close()  # twice is fine


def test_rename_keeps_the_mapping(tmp_path: Path) -> None:
    old, new = tmp_path / data_name("j", 0, 1), tmp_path / spare_name("j", 0, 1)
    seg = Segment.create(str(old), 512)
    data = _fill(seg, 4)
    seg.rename(str(new))
    assert seg.path == str(new) and not old.exists()
    assert seg.still_current()
    seg.array[0] ^= 1
    assert new.read_bytes()[0] == data[0] ^ 1
    seg.rename(str(new))  # to itself: nothing happens
    assert new.exists()
    seg.close()


def test_unlink_removes_the_file(tmp_path: Path) -> None:
    path = tmp_path / data_name("j", 0, 1)
    seg = Segment.create(str(path), 64)
    seg.unlink()
    assert not path.exists() and len(seg.array) == 0
    seg.unlink()  # already gone: fine
    assert not seg.still_current()


def test_create_replaces_atomically_and_leaves_old_mappings_alone(tmp_path: Path) -> None:
    path = str(tmp_path / data_name("j", 0, 1))
    first = Segment.create(path, 300)
    old = _fill(first, 5)
    reader = Segment.open(path)
    second = Segment.create(path, 200)
    # A new file (new inode) took the name in one step; the old one is untouched.
    assert os.stat(path).st_ino != reader.ident[1]
    assert not reader.still_current() and not first.still_current()
    assert second.still_current()
    assert reader.array.tobytes() == old == first.array.tobytes()
    assert os.path.getsize(path) == 200 and not second.array.any()
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]
    for s in (first, reader, second):
        s.close()


def test_failed_create_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / data_name("j", 0, 1)
    seg = Segment.create(str(path), 128)
    old = _fill(seg, 6)
    seg.close()
    # No filesystem here holds a pebibyte: ftruncate or posix_fallocate fails.
    with pytest.raises((MemoryError, OSError)):
        Segment.create(str(path), 1 << 50)
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == [path.name]


# -- other processes ------------------------------------------------------------

_CHILD = """
import sys, time
from snapstore.coding import checksum
from snapstore.node.segments import Segment
seg = Segment.open(sys.argv[1], writable=sys.argv[2] == "rw")
print(checksum(seg.array), flush=True)
if sys.argv[3] == "wait":
    time.sleep(60)
"""


def _child(path: Path, mode: str, then: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), mode, then],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )


@pytest.fixture
def segment_file(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / data_name("j", 0, 1)
    seg = Segment.create(str(path), 1 << 20)
    data = _fill(seg, 7)
    seg.close()
    return path, data


@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_a_process_that_maps_and_exits_leaves_the_segment(
    segment_file: tuple[Path, bytes], mode: str
) -> None:
    path, data = segment_file
    proc = _child(path, mode, "exit")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert int(out) == checksum(np.frombuffer(data, np.uint8)), "the child saw other bytes"
    assert path.read_bytes() == data


@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_a_process_killed_while_mapping_leaves_the_segment(
    segment_file: tuple[Path, bytes], mode: str
) -> None:
    path, data = segment_file
    proc = _child(path, mode, "wait")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # mapped and read: now kill it mid-use
        assert int(line) == checksum(np.frombuffer(data, np.uint8))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == data
    # And the owner can still map it as before.
    seg = Segment.open(str(path))
    assert seg.array.tobytes() == data
    seg.close()
