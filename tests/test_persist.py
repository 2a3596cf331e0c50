"""The persisted tier's files without a cluster: manifest, writes, atomic publication,
retention, verified reads, the token bucket, and export of a persisted step.

A persisted step is visible only once its manifest is written and its
directory renamed; everything before that (a crash, a failed write) leaves
a ``.partial`` directory that no reader lists and the next flush removes.
At an fsspec URL (object storage; ``file://`` here, which goes through the
same code as ``s3://``) there is no rename: a step is visible once its
manifest, written last, exists. Tests taking ``root`` run on both.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from hypothesis import given, settings
from hypothesis import strategies as st

from snapstore import persist
from snapstore.coding import checksum
from snapstore.errors import (
    ConfigError,
    FormatError,
    PersistedStepCorruptError,
    PersistFailedError,
    SnapshotNotFoundError,
)
from snapstore.format.record import piece_bounds
from snapstore.persist.throttle import TokenBucket

JOB = "pj"


def _buf(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def _sums(buf: np.ndarray, k: int) -> tuple[int, ...]:
    out = []
    for j in range(k):
        off, length = piece_bounds(len(buf), k, j)
        out.append(checksum(buf[off : off + length]))
    return tuple(out)


@pytest.fixture(params=["dir", "url"])
def root(request: Any, tmp_path: Any) -> str:
    """A persist root: a directory, or the same place as an fsspec ``file://`` URL."""
    return str(tmp_path) if request.param == "dir" else "file://" + str(tmp_path)


def _local(path: str) -> str:
    """The local path of a persisted file, to damage it behind the tier's back."""
    return path.removeprefix("file://")


def _persist_step(
    root: str, step: int, bufs: list[np.ndarray], k: int = 3
) -> persist.PersistManifest:
    """A whole flush of ``bufs`` (one per rank), as the SMPs and the coordinator do it."""
    partial = persist.begin_step(root, JOB, step)
    persist.prepare_dir(partial)  # what each SMP does before writing
    ranks = {}
    for r, b in enumerate(bufs):
        sums = persist.write_rank(os.path.join(partial, persist.rank_file(r)), b, k)
        ranks[r] = persist.PersistedRank(r, persist.rank_file(r), len(b), sums)
    man = persist.PersistManifest(JOB, step, len(bufs), k, ranks, created_at=1.0)
    persist.publish_step(root, man)
    return man


# -- manifest ---------------------------------------------------------------------------


def test_manifest_round_trips() -> None:
    ranks = {r: persist.PersistedRank(r, f"rank-{r}.bin", 100 * r, (r, r + 1)) for r in range(3)}
    man = persist.PersistManifest(JOB, 7, 3, 2, ranks, 1.5, 1.25, "feed", 2, extra={"note": "x"})
    back = persist.PersistManifest.from_bytes(man.to_bytes())
    assert back == man
    assert back.data_bytes() == 300


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"v": 2}, "version 2"),
        ({"kind": "other"}, "not a snapstore"),
        ({"checksum": "md5"}, "checksum"),
        ({"step": -1}, "malformed"),
        ({"step": 1.5}, "malformed"),
        ({"job": "../x"}, "job"),
        ({"ranks": [[0, "rank-0.bin", 10, [1, 2]]]}, "ranks"),  # world size 2, one rank
        ({"ranks": [[0, "rank-0.bin", 10, [1]], [1, "rank-1.bin", 10, [1, 2]]]}, "sums"),
        ({"ranks": [[0, "../etc", 10, [1, 2]], [1, "rank-1.bin", 10, [1, 2]]]}, "file"),
    ],
)
def test_malformed_manifests_are_format_errors(change: dict[str, Any], match: str) -> None:
    import msgpack

    ranks = {r: persist.PersistedRank(r, f"rank-{r}.bin", 10, (1, 2)) for r in range(2)}
    doc = msgpack.unpackb(persist.PersistManifest(JOB, 3, 2, 2, ranks).to_bytes())
    doc.update(change)
    with pytest.raises(FormatError, match=match):
        persist.PersistManifest.from_bytes(msgpack.packb(doc))
    with pytest.raises(FormatError):
        persist.PersistManifest.from_bytes(b"\xc1not msgpack")


# -- writing and reading ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 5000),
    k=st.integers(1, 6),
    chunk=st.sampled_from([1, 7, 64, 4096]),
    url=st.booleans(),
)
def test_written_sums_are_the_record_piece_sums(size: int, k: int, chunk: int, url: bool) -> None:
    import tempfile

    buf = _buf(size, seed=size)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f")
        target = "file://" + path if url else path
        assert persist.write_rank(target, buf, k, chunk=chunk) == _sums(buf, k)
        with open(path, "rb") as f:
            assert f.read() == buf.tobytes()


def test_read_and_verify_a_published_step(root: str) -> None:
    bufs = [_buf(10_000 + 77 * r, seed=r) for r in range(3)]
    man = _persist_step(root, 5, bufs)
    path = persist.step_dir(root, JOB, 5)
    assert persist.read_manifest(path) == man
    for r, b in enumerate(bufs):
        got = persist.read_rank(path, r)
        assert got.tobytes() == b.tobytes()
        assert got.ctypes.data % 64 == 0
        assert persist.verify_rank(path, r) == len(b)


def test_a_flipped_byte_names_the_file_and_piece(root: str) -> None:
    _persist_step(root, 5, [_buf(9000, seed=1)], k=3)
    path = persist.step_dir(root, JOB, 5)
    f = os.path.join(path, "rank-0.bin")
    off, _ = piece_bounds(9000, 3, 1)
    with open(_local(f), "r+b") as fh:
        fh.seek(off + 10)
        b = fh.read(1)
        fh.seek(off + 10)
        fh.write(bytes([b[0] ^ 1]))
    for read in (persist.read_rank, persist.verify_rank):
        with pytest.raises(PersistedStepCorruptError, match="piece 1") as info:
            read(path, 0)
        assert info.value.path == f


def test_a_truncated_or_missing_file_is_refused(root: str) -> None:
    _persist_step(root, 5, [_buf(5000), _buf(5000, 1)])
    path = persist.step_dir(root, JOB, 5)
    local = _local(path)
    os.truncate(os.path.join(local, "rank-0.bin"), 4000)
    with pytest.raises(PersistedStepCorruptError, match="4000 bytes, the manifest says 5000"):
        persist.read_rank(path, 0)
    os.unlink(os.path.join(local, "rank-1.bin"))
    with pytest.raises(PersistedStepCorruptError, match="cannot open"):
        persist.verify_rank(path, 1)
    with pytest.raises(PersistedStepCorruptError, match="no rank 9"):
        persist.read_rank(path, 9)
    os.unlink(os.path.join(local, persist.MANIFEST_NAME))
    with pytest.raises(PersistedStepCorruptError, match="manifest"):
        persist.read_manifest(path)


# -- atomic publication, leftovers, retention ----------------------------------------------


def test_a_step_is_invisible_until_its_manifest_and_rename(tmp_path: Any) -> None:
    root = str(tmp_path)
    _persist_step(root, 1, [_buf(100)])
    partial = persist.partial_dir(root, JOB, 2)
    os.makedirs(partial)
    persist.write_rank(os.path.join(partial, "rank-0.bin"), _buf(100, 2), 3)
    # A flush that died here: rank files written, no manifest, no rename.
    assert [s.step for s in persist.list_steps(root, JOB)] == [1]
    assert [s for s, _ in persist.newest_first(root, JOB)] == [1]
    # A directory named like a complete step but without its manifest is not one either.
    os.makedirs(persist.step_dir(root, JOB, 3))
    assert [s.step for s in persist.list_steps(root, JOB)] == [1]
    assert persist.clean_leftovers(root, JOB) == ["step-2.partial"]
    assert not os.path.exists(partial)


def test_publish_refuses_missing_or_short_files_and_publishes_nothing(tmp_path: Any) -> None:
    root = str(tmp_path)
    partial = persist.partial_dir(root, JOB, 4)
    os.makedirs(partial)
    sums = persist.write_rank(os.path.join(partial, "rank-0.bin"), _buf(100), 2)
    ranks = {
        0: persist.PersistedRank(0, "rank-0.bin", 100, sums),
        1: persist.PersistedRank(1, "rank-1.bin", 100, sums),
    }
    with pytest.raises(PersistFailedError, match="rank 1"):
        persist.publish_step(root, persist.PersistManifest(JOB, 4, 2, 2, ranks))
    ranks = {0: persist.PersistedRank(0, "rank-0.bin", 101, sums)}
    with pytest.raises(PersistFailedError, match="holds 100 bytes"):
        persist.publish_step(root, persist.PersistManifest(JOB, 4, 1, 2, ranks))
    assert persist.list_steps(root, JOB) == []
    assert not os.path.exists(os.path.join(partial, persist.MANIFEST_NAME))


def test_publish_renames_and_leaves_no_partial(tmp_path: Any) -> None:
    root = str(tmp_path)
    _persist_step(root, 9, [_buf(300)])
    assert sorted(os.listdir(persist.job_dir(root, JOB))) == ["step-9"]
    assert sorted(os.listdir(persist.step_dir(root, JOB, 9))) == [
        persist.MANIFEST_NAME,
        "rank-0.bin",
    ]
    (only,) = persist.list_steps(root, JOB)
    assert (only.step, only.bytes, only.world_size) == (9, 300, 1)


def test_a_write_that_fails_midway_leaves_the_previous_step_intact(tmp_path: Any) -> None:
    root = str(tmp_path)
    _persist_step(root, 1, [_buf(5000)])
    partial = persist.partial_dir(root, JOB, 2)
    os.makedirs(partial)

    def fail(written: int) -> None:
        if written >= 2048:
            raise OSError(5, "injected")

    with pytest.raises(OSError, match="injected"):
        persist.write_rank(
            os.path.join(partial, "rank-0.bin"), _buf(5000, 3), 3, chunk=1024, after_chunk=fail
        )
    assert 2048 <= os.path.getsize(os.path.join(partial, "rank-0.bin")) < 5000
    with pytest.raises(PersistFailedError, match="cancelled"):
        persist.write_rank(
            os.path.join(partial, "rank-0.bin"), _buf(5000, 3), 3, cancelled=lambda: True
        )
    assert [s.step for s in persist.list_steps(root, JOB)] == [1]
    assert persist.read_rank(persist.step_dir(root, JOB, 1), 0).tobytes() == _buf(5000).tobytes()


def test_retention_keeps_the_newest_complete_steps(root: str) -> None:
    for step in (10, 20, 30, 40):
        _persist_step(root, step, [_buf(64, step)])
    assert persist.retain(root, JOB, 2) == [10, 20]
    assert [s.step for s in persist.list_steps(root, JOB)] == [30, 40]
    assert sorted(os.listdir(_local(persist.job_dir(root, JOB)))) == ["step-30", "step-40"]
    assert persist.retain(root, JOB, 2) == []


def test_retention_in_a_directory_cleans_a_deletion_that_died(tmp_path: Any) -> None:
    root = str(tmp_path)
    _persist_step(root, 30, [_buf(64, 30)])
    # A deletion that died after its rename is not a step, and is cleaned up.
    os.makedirs(persist.step_dir(root, JOB, 5) + ".trash")
    assert [s.step for s in persist.list_steps(root, JOB)] == [30]
    assert persist.clean_leftovers(root, JOB) == ["step-5.trash"]


def test_republishing_a_step_replaces_it(root: str) -> None:
    _persist_step(root, 3, [_buf(64, 1)])
    _persist_step(root, 3, [_buf(64, 2)])
    assert persist.read_rank(persist.step_dir(root, JOB, 3), 0).tobytes() == _buf(64, 2).tobytes()
    assert sorted(os.listdir(_local(persist.job_dir(root, JOB)))) == ["step-3"]


def test_list_jobs_ignores_foreign_names(root: str, tmp_path: Any) -> None:
    _persist_step(root, 1, [_buf(8)])
    os.makedirs(os.path.join(tmp_path, ".hidden"))
    (tmp_path / "file").write_text("x")
    assert persist.list_jobs(root) == [JOB]
    assert persist.list_jobs(os.path.join(root, "absent")) == []
    assert persist.list_steps(os.path.join(root, "absent"), JOB) == []


# -- at a URL: publication without renames ----------------------------------------------


def _url(tmp_path: Any) -> str:
    return "file://" + str(tmp_path)


def test_at_a_url_a_step_without_its_manifest_is_invisible_and_cleaned(tmp_path: Any) -> None:
    root = _url(tmp_path)
    _persist_step(root, 1, [_buf(100)])
    # A flush that died: its rank object is there, its manifest is not.
    where = persist.begin_step(root, JOB, 2)
    assert where == persist.step_dir(root, JOB, 2)
    persist.write_rank(os.path.join(where, "rank-0.bin"), _buf(100, 2), 3)
    assert [s.step for s in persist.list_steps(root, JOB)] == [1]
    assert [s for s, _ in persist.newest_first(root, JOB)] == [1]
    assert persist.clean_leftovers(root, JOB, keep=where) == []
    assert persist.clean_leftovers(root, JOB) == ["step-2"]
    assert sorted(os.listdir(tmp_path / JOB)) == ["step-1"]
    # The next flush cleans them up by itself.
    persist.begin_step(root, JOB, 2)
    persist.write_rank(os.path.join(where, "rank-0.bin"), _buf(100, 2), 3)
    persist.begin_step(root, JOB, 3)
    assert sorted(os.listdir(tmp_path / JOB)) == ["step-1", "step-3"]


def test_at_a_url_publish_checks_the_rank_objects_first(tmp_path: Any) -> None:
    root = _url(tmp_path)
    where = persist.begin_step(root, JOB, 4)
    sums = persist.write_rank(os.path.join(where, "rank-0.bin"), _buf(100), 2)
    ranks = {
        0: persist.PersistedRank(0, "rank-0.bin", 100, sums),
        1: persist.PersistedRank(1, "rank-1.bin", 100, sums),
    }
    with pytest.raises(PersistFailedError, match=r"rank-1\.bin is missing"):
        persist.publish_step(root, persist.PersistManifest(JOB, 4, 2, 2, ranks))
    ranks = {0: persist.PersistedRank(0, "rank-0.bin", 101, sums)}
    with pytest.raises(PersistFailedError, match="holds 100 bytes"):
        persist.publish_step(root, persist.PersistManifest(JOB, 4, 1, 2, ranks))
    assert persist.list_steps(root, JOB) == []
    assert sorted(os.listdir(tmp_path / JOB / "step-4")) == ["rank-0.bin"]


def test_at_a_url_a_step_being_replaced_is_not_a_step_until_republished(tmp_path: Any) -> None:
    root = _url(tmp_path)
    _persist_step(root, 3, [_buf(64, 1)])
    where = persist.begin_step(root, JOB, 3)
    # Its old manifest went first: no reader can pair it with new bytes.
    assert persist.list_steps(root, JOB) == []
    assert os.listdir(_local(where)) == []


def test_at_a_url_a_deletion_that_died_leaves_no_step(tmp_path: Any) -> None:
    root = _url(tmp_path)
    for step in (1, 2):
        _persist_step(root, step, [_buf(64, step)])
    # Retention removes the manifest first; a crash right after leaves this.
    os.unlink(tmp_path / JOB / "step-1" / persist.MANIFEST_NAME)
    assert [s.step for s in persist.list_steps(root, JOB)] == [2]
    assert persist.retain(root, JOB, 1) == []
    assert persist.clean_leftovers(root, JOB) == ["step-1"]


class _FailingWrites(MemoryFileSystem):
    """An fsspec driver that fails its uploads with its own exception type."""

    protocol = "snapstore-test-failing"

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode:
            raise RuntimeError("upload refused by the service")
        return super()._open(path, mode, **kwargs)


def test_a_driver_error_is_a_persist_failure_naming_the_object() -> None:
    fsspec.register_implementation(_FailingWrites.protocol, _FailingWrites, clobber=True)
    url = f"{_FailingWrites.protocol}://bucket/{JOB}/step-1/rank-0.bin"
    with pytest.raises(PersistFailedError, match=r"rank-0\.bin.*upload refused") as info:
        persist.write_rank(url, _buf(10), 1)
    assert isinstance(info.value.__cause__, RuntimeError)


class _FailingLists(MemoryFileSystem):
    """An fsspec driver whose listings fail with its own exception type."""

    protocol = "snapstore-test-unlistable"

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        raise RuntimeError("service unavailable")


def test_a_driver_error_while_listing_is_an_oserror_naming_the_url() -> None:
    fsspec.register_implementation(_FailingLists.protocol, _FailingLists, clobber=True)
    root = f"{_FailingLists.protocol}://bucket"
    for fn in (persist.newest_first, persist.list_steps, persist.clean_leftovers):
        with pytest.raises(OSError, match=f"listing {root}/{JOB}: RuntimeError"):
            fn(root, JOB)
    with pytest.raises(OSError, match="service unavailable"):
        persist.list_jobs(root)


def test_reaching_a_url_names_what_is_wrong(tmp_path: Any) -> None:
    from snapstore.persist import objstore

    with pytest.raises(ConfigError, match="no-such-protocol"):
        objstore.reach("no-such-protocol://bucket/x")
    objstore.reach(_url(tmp_path / "made"))
    assert (tmp_path / "made").is_dir()


# -- the token bucket -------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += s


def test_bucket_paces_to_its_rate_after_the_burst() -> None:
    clock = FakeClock()
    b = TokenBucket(1000, burst=100, clock=clock.now, sleep=clock.sleep)
    assert b.take(100) == 0.0  # the burst is free
    assert b.take(500) == pytest.approx(0.5)
    assert clock.t == pytest.approx(0.5)
    clock.t += 10  # idle time refills at most one burst
    assert b.take(100) == 0.0
    assert b.take(100) == pytest.approx(0.1)


def test_bucket_long_run_rate_holds_for_any_chunk() -> None:
    clock = FakeClock()
    b = TokenBucket(1 << 20, burst=64 << 10, clock=clock.now, sleep=clock.sleep)
    total = 0
    for n in (1 << 20, 3, 8 << 20, 12345, 2 << 20):
        b.take(n)
        total += n
    assert clock.t == pytest.approx((total - (64 << 10)) / (1 << 20), rel=1e-6)
    assert max(clock.slept) <= 0.25 + 1e-9  # naps stay short, so interrupts are seen


def test_unlimited_bucket_never_sleeps_and_interrupt_ends_a_wait() -> None:
    clock = FakeClock()
    assert TokenBucket(0, clock=clock.now, sleep=clock.sleep).take(1 << 40) == 0.0
    b = TokenBucket(100, burst=1, clock=clock.now, sleep=clock.sleep)
    calls = []

    def hurry() -> bool:
        calls.append(clock.t)
        return len(calls) > 2

    assert b.take(1000, interrupt=hurry) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(-1)


def test_bucket_is_shared_fairly_between_threads() -> None:
    import time

    b = TokenBucket(2 << 20, burst=64 << 10)
    t0 = time.monotonic()
    threads = [
        threading.Thread(target=lambda: [b.take(64 << 10) for _ in range(8)]) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    expected = (4 * 8 * (64 << 10) - (64 << 10)) / (2 << 20)  # 0.97 s
    assert expected * 0.9 <= took <= expected + 1.0


# -- export of a persisted step, no store -------------------------------------------------------


def _rank_state(r: int) -> dict[str, Any]:
    torch.manual_seed(r)
    w = torch.randn(257)
    return {
        "model": {"w": w, "tied": w[:5], "h": torch.randn(9).to(torch.bfloat16)},
        "optim": {"step": 3, "betas": (0.9, 0.999)},
        "np": np.arange(4, dtype=np.int32) + r,
        "npscalar": np.float32(r + 0.5),
        "meta": {"name": f"r{r}", "blob": b"\x00\x01"},
    }


def _packed(state: Any, step: int) -> np.ndarray:
    from snapstore.format.frame import frame_size, write_trailer
    from snapstore.format.pack import pack

    p = pack(state)
    buf = np.zeros(frame_size(p.layout.nbytes, len(p.manifest)), dtype=np.uint8)
    buf[: p.layout.nbytes] = np.asarray(p.data)
    write_trailer(buf, p.layout.nbytes, p.manifest, step)
    return buf


def test_export_of_a_persisted_step_skips_a_corrupt_newer_one(tmp_path: Any) -> None:
    from snapstore.ops.export import persisted_states, persisted_step

    root = str(tmp_path / "persist")
    for step in (4, 8):
        _persist_step(root, step, [_packed(_rank_state(r), step) for r in range(2)])
    f = os.path.join(persist.step_dir(root, JOB, 8), "rank-1.bin")
    with open(f, "r+b") as fh:
        fh.write(b"\xff")
    man, path, skipped = persisted_step(root, JOB)
    assert man.step == 4 and [s["step"] for s in skipped] == [8]
    assert "rank-1.bin" in skipped[0]["reason"]
    with pytest.raises(PersistedStepCorruptError):
        persisted_step(root, JOB, 8)
    with pytest.raises(SnapshotNotFoundError, match="complete steps: \\[4, 8\\]"):
        persisted_step(root, JOB, 5)
    with pytest.raises(SnapshotNotFoundError, match="no complete persisted step"):
        persisted_step(root, "other")
    states = dict(persisted_states(path, man))
    assert sorted(states) == [0, 1]
    assert torch.equal(states[1]["model"]["w"], _rank_state(1)["model"]["w"])


def test_torch_safe_turns_numpy_into_tensors_and_keeps_the_rest() -> None:
    import collections

    from snapstore.ops.export import torch_safe

    sd: Any = collections.OrderedDict(w=torch.ones(2))
    sd._metadata = {"": {"version": 1}}
    state = {"sd": sd, "np": np.arange(3, dtype=">i4"), "t": (np.float16(1.5), 2), "x": [1]}
    safe, converted = torch_safe(state)
    assert sorted(converted) == ["/np", "/t/0"]
    assert safe["sd"] is sd and safe["x"] is state["x"]
    assert safe["np"].dtype == torch.int32 and safe["np"].tolist() == [0, 1, 2]
    assert isinstance(safe["t"], tuple) and safe["t"][0].dtype == torch.float16
    assert safe["t"][0].shape == () and float(safe["t"][0]) == 1.5
    nested: Any = collections.OrderedDict(a=np.zeros(1))
    nested._metadata = {"m": 1}
    out, _ = torch_safe({"n": nested})
    assert isinstance(out["n"], collections.OrderedDict)
    # Set at runtime, as torch does; no type declares it.
    assert out["n"]._metadata == {"m": 1}  # type: ignore[attr-defined]
