"""Orders (tasks.py) run by the byte engine (stripes.py) on real files, without Ray.

Each fake node is a directory holding the segment files its SMP would hold:
its ranks' staged buffers and its parity file. Parity is built with the same
orders the coordinator sends; then nodes are "lost" (left out of ``usable``)
or bytes are flipped in place, and every rebuild is compared byte for byte
with what was written. Same-host peers are read through zero-copy file
mappings; the TCP path runs against one DataServer per fake node on loopback.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from snapstore.coding import ErasureCodec, available_backends, checksum
from snapstore.control.health import rank_restorable, stripe_health
from snapstore.control.orders import parity_build_orders, parity_rebuild_orders, rank_rebuild_orders
from snapstore.control.placement import (
    chunk_extents,
    chunk_length,
    data_stripe,
    form_groups,
    plan_parity,
    stripe_members,
)
from snapstore.errors import UnrecoverableError
from snapstore.format.record import RankEntry, StepRecord, piece_bounds
from snapstore.format.work import Source, WorkKind, WorkOrder, WorkResult
from snapstore.node.segments import Segment, data_name, parity_name
from snapstore.node.stripes import run_order
from snapstore.node.transport import (
    ChunkUnavailableError,
    DataServer,
    PeerInfo,
    Transport,
    host_key,
)

JOB = "job"
STEP = 7
TOKEN = "t"
BACKEND = "isa_l_rs_vand"
# Ragged on purpose: below, at and just past the 64-byte alignment, odd, one byte.
SIZES = [1000, 63, 4097, 64, 1, 777, 65, 129, 3001, 5, 2048, 300]

# (k, m, nodes): one group of 6 (stripes rotate past k + m), two groups (5 + 4),
# one group of 7.
LAYOUTS = [(3, 1, 6), (2, 2, 9), (4, 2, 7)]
LAYOUT_IDS = [f"k{k}m{m}-{n}nodes" for k, m, n in LAYOUTS]


def _homes(nodes: list[str]) -> list[str]:
    """Home of each rank: one per node except the second node (which holds none),
    then a second rank on every third node, so a node's ranks are not adjacent."""
    first = [n for i, n in enumerate(nodes) if i != 1]
    second = [n for i, n in enumerate(nodes) if i != 1 and i % 3 == 0]
    return first + second


def _resolver(directory: Path) -> Callable[[str], np.ndarray]:
    """What an SMP hands its DataServer: a name to a read-only view of the whole file."""

    def resolve(name: str) -> np.ndarray:
        try:
            return Segment.open(str(directory / name)).array
        except OSError as e:
            raise ChunkUnavailableError(f"{name}: {e.strerror}") from None

    return resolve


@dataclass
class FakeStore:
    """One step of one job written to per-node directories, parity built and recorded."""

    record: StepRecord
    dirs: dict[str, Path]
    peers: dict[str, PeerInfo]
    transport: Transport
    data: dict[int, bytes]
    root: Path
    servers: dict[str, DataServer] = field(default_factory=dict)
    parity: dict[str, bytes] = field(default_factory=dict)
    backend: str = BACKEND

    @property
    def nodes(self) -> list[str]:
        return [n for g in self.record.groups for n in g]

    def close(self) -> None:
        self.transport.close()
        # stop() waits out the server's 0.5 s poll; stop them all at once.
        stoppers = [threading.Thread(target=s.stop) for s in self.servers.values()]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()

    def run(self, order: WorkOrder, path: Path) -> tuple[bytes, WorkResult]:
        """Run ``order`` into a fresh segment at ``path``; return its bytes and the result."""
        path.parent.mkdir(parents=True, exist_ok=True)
        seg = Segment.create(str(path), order.file_size)
        try:
            result = run_order(order, self.transport, seg.view)
            return seg.array.tobytes(), result
        finally:
            seg.unlink()

    def rank_order(self, rank: int, alive: set[str], pieces: list[int] | None = None) -> WorkOrder:
        # Never the home itself: its original file is what the result is compared with.
        target = min(n for n in alive if n != self.record.ranks[rank].node)
        order = rank_rebuild_orders(
            self.record, rank, target, self.peers, alive, self.backend, pieces=pieces
        )
        assert order.target == target
        assert order.file == data_name(JOB, rank, STEP)
        return order

    def rebuild_rank(
        self, rank: int, alive: set[str], pieces: list[int] | None = None
    ) -> tuple[bytes, WorkResult]:
        order = self.rank_order(rank, alive, pieces)
        # Into a new file on the target node, as the SMP that received the order does.
        return self.run(order, self.dirs[order.target] / order.file)

    def rebuild_parity(self, node: str, alive: set[str]) -> tuple[bytes, WorkResult]:
        order = parity_rebuild_orders(self.record, node, self.peers, alive, self.backend)
        assert order is not None
        return self.run(order, self.root / "rebuilt" / node / order.file)

    def chunk(self, node: str, j: int) -> bytes:
        """Node's chunk j from the original buffers, as placement defines it."""
        return b"".join(
            self.data[e.rank][e.offset : e.offset + e.length]
            for e in chunk_extents(self.record.ranks, node, j, self.record.k)
        )

    def piece(self, rank: int, j: int) -> bytes:
        off, ln = piece_bounds(self.record.ranks[rank].size, self.record.k, j)
        return self.data[rank][off : off + ln]


def build(
    root: Path, k: int, m: int, n_nodes: int, tcp: bool = False, backend: str = BACKEND
) -> FakeStore:
    nodes = [f"n{i}" for i in range(n_nodes)]
    dirs = {n: root / n for n in nodes}
    for d in dirs.values():
        d.mkdir(parents=True)
    servers: dict[str, DataServer] = {}
    peers: dict[str, PeerInfo] = {}
    for n in nodes:
        port = 0
        if tcp:
            servers[n] = DataServer("127.0.0.1", TOKEN, _resolver(dirs[n]))
            port = servers[n].port
        peers[n] = PeerInfo(n, host_key(), str(dirs[n]), "127.0.0.1", port)
    transport = Transport(host_key(), token=TOKEN, force_tcp=tcp)

    rng = np.random.default_rng(1234)
    ranks: dict[int, RankEntry] = {}
    data: dict[int, bytes] = {}
    for r, home in enumerate(_homes(nodes)):
        size = SIZES[r % len(SIZES)]
        buf = rng.integers(0, 256, size, dtype=np.uint8)
        (dirs[home] / data_name(JOB, r, STEP)).write_bytes(buf.tobytes())
        bounds = [piece_bounds(size, k, j) for j in range(k)]
        ranks[r] = RankEntry(home, size, tuple(checksum(buf[o : o + ln]) for o, ln in bounds))
        data[r] = buf.tobytes()
    groups = tuple(form_groups(nodes, k, m))
    record = StepRecord(
        JOB, STEP, 0, k, m, len(ranks), ranks, groups, tuple(plan_parity(ranks, groups, k, m))
    )
    store = FakeStore(record, dirs, peers, transport, data, root, servers, backend=backend)

    # Build the parity exactly as an SMP does on a parity order, then record its sums.
    sums: dict[str, Iterator[int]] = {}
    for node, order in parity_build_orders(record, peers, backend).items():
        assert order.file == parity_name(JOB, STEP, 0)
        assert order.file_size == record.parity_file_size(node)
        seg = Segment.create(str(dirs[node] / order.file), order.file_size)
        result = run_order(order, transport, seg.view)
        seg.close()
        assert result.bad_sources == ()
        assert len(result.sums) == len(record.parity_on(node))
        sums[node] = iter(result.sums)
    parity = tuple(p._replace(sum=next(sums[p.node])) for p in record.parity)
    store.record = record.replace(parity=parity)
    for node in {p.node for p in parity}:
        store.parity[node] = (dirs[node] / parity_name(JOB, STEP, 0)).read_bytes()
    return store


@pytest.fixture(params=LAYOUTS, ids=LAYOUT_IDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FakeStore]:
    s = build(tmp_path, *request.param)
    yield s
    s.close()


@contextlib.contextmanager
def flipped(store: FakeStore, node: str, name: str, offset: int) -> Iterator[None]:
    """One byte of a node's segment file inverted in place (as a bit rot would), then restored."""
    path = store.dirs[node] / name
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))
    try:
        yield
    finally:
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(old)


def _losses(store: FakeStore, sizes: range) -> Iterator[tuple[str, ...]]:
    """Every set of ``sizes`` nodes lost from one group."""
    for group in store.record.groups:
        for size in sizes:
            yield from itertools.combinations(group, size)


def _piece_sums(store: FakeStore, rank: int) -> list[int]:
    e = store.record.ranks[rank]
    k = store.record.k
    return [e.sums[j] for j in range(k) if piece_bounds(e.size, k, j)[1]]


def _assert_only_lost_named(result: WorkResult, lost: tuple[str, ...]) -> None:
    """Sources reported bad may be lost members, never a healthy member on an alive node."""
    for text in result.bad_sources:
        assert any(f"on node {n} " in text for n in lost), text


# -- parity ---------------------------------------------------------------------


def test_layout_has_the_awkward_cases(store: FakeStore) -> None:
    rec = store.record
    assert rec.ranks_on("n1") == [], "one node holds no rank"
    assert len(rec.ranks_on("n0")) == 2, "one node holds two ranks"
    assert any(e.size % 64 for e in rec.ranks.values())
    assert any(e.size < 64 for e in rec.ranks.values())


def test_parity_equals_an_independent_encode_of_the_stripe(store: FakeStore) -> None:
    rec = store.record
    codec = ErasureCodec(rec.k, rec.m, backend=store.backend)
    assert rec.parity, "nothing was protected"
    for p in rec.parity:
        members = stripe_members(rec.groups[p.group], p.stripe, rec.k, rec.m)
        chunks = [store.chunk(mb.node, mb.index) for mb in members[: rec.k]]
        assert p.length == max(len(c) for c in chunks)
        padded = [np.frombuffer(c.ljust(p.length, b"\0"), np.uint8) for c in chunks]
        want = codec.encode(padded)[p.index - rec.k].tobytes()
        got = store.parity[p.node][p.offset : p.offset + p.length]
        assert got == want, f"parity {p.index} of stripe {p.stripe} in group {p.group}"
        assert checksum(np.frombuffer(got, np.uint8)) == p.sum


class _CountingTransport:
    """A transport that counts the separate checksum reads it is asked for."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.checksums = 0

    def checksum(self, *args: Any) -> int:
        self.checksums += 1
        return self.inner.checksum(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_parity_build_checks_its_sources_in_the_read_that_codes_them(store: FakeStore) -> None:
    """Parity of a new step reads each data source once: checked while coded, same parity."""
    rec = store.record
    counting = _CountingTransport(store.transport)
    for node, order in parity_build_orders(rec, store.peers, store.backend).items():
        assert order.kind is WorkKind.PARITY
        path = store.root / "again" / node / order.file
        path.parent.mkdir(parents=True, exist_ok=True)
        seg = Segment.create(str(path), order.file_size)
        try:
            result = run_order(order, counting, seg.view)  # type: ignore[arg-type]
            assert seg.array.tobytes() == store.parity[node]
        finally:
            seg.unlink()
        assert list(result.sums) == [p.sum for p in rec.parity_on(node)]
    assert counting.checksums == 0


def test_parity_build_from_a_corrupt_data_source_fails_naming_it(store: FakeStore) -> None:
    """A data piece that changed after it was checksummed: no parity is built over it."""
    rec = store.record
    rank, e = next((r, e) for r, e in rec.ranks.items() if e.size)
    name = data_name(JOB, rank, STEP)
    failed = 0
    with flipped(store, e.node, name, e.size - 1):
        for node, order in parity_build_orders(rec, store.peers, store.backend).items():
            reads = [
                s
                for out in order.outputs
                for s in out.sources
                if any(x.name == name for x in s.extents)
            ]
            try:
                store.run(order, store.root / "bad" / node / order.file)
            except UnrecoverableError as err:
                assert reads, f"{node} failed without reading {name}"
                assert "fail their checksum" in str(err)
                assert any(
                    f"on node {e.node} fails its checksum ({name} [" in t for t in err.lost
                ), err.lost
                failed += 1
            else:
                assert not any(
                    x.name == name and x.offset + x.length >= e.size
                    for s in reads
                    for x in s.extents
                ), f"{node} built parity over the corrupt byte of {name}"
    assert failed >= 1


# -- rebuilds after losses ------------------------------------------------------


def test_any_m_lost_nodes_rebuild_every_lost_rank_bitwise(store: FakeStore) -> None:
    rec = store.record
    rebuilt = 0
    for lost in _losses(store, range(1, rec.m + 1)):
        alive = set(store.nodes) - set(lost)
        assert all(h["status"] != "lost" for h in stripe_health(rec, alive)), lost
        for rank in [r for n in lost for r in rec.ranks_on(n)]:
            assert rank_restorable(rec, rank, alive)
            got, result = store.rebuild_rank(rank, alive)
            assert got == store.data[rank], f"rank {rank} with {lost} lost"
            _assert_only_lost_named(result, lost)
            assert list(result.sums) == _piece_sums(store, rank)
            assert result.bytes_written == rec.ranks[rank].size
            rebuilt += 1
    assert rebuilt > 0


def test_lost_parity_file_is_rebuilt_bitwise(store: FakeStore) -> None:
    rec = store.record
    for node in sorted(store.parity):
        group = rec.groups[rec.group_of(node) or 0]
        others = [n for n in group if n != node]
        for extra in itertools.chain.from_iterable(
            itertools.combinations(others, c) for c in range(rec.m)
        ):
            alive = set(store.nodes) - {node, *extra}
            got, result = store.rebuild_parity(node, alive)
            assert got == store.parity[node], f"parity of {node} with {extra} also lost"
            assert list(result.sums) == [p.sum for p in rec.parity_on(node)]
            _assert_only_lost_named(result, (node, *extra))


def test_node_without_parity_has_no_parity_order(tmp_path: Path) -> None:
    # k = m = 1 in groups (n0, n1), (n2, n3): n1 holds no rank, so the one
    # stripe with data in n1's slot has none and n0 holds no parity at all.
    s = build(tmp_path, 1, 1, 4)
    try:
        rec = s.record
        assert {p.node for p in rec.parity} == {"n1", "n2", "n3"}
        assert parity_rebuild_orders(rec, "n0", s.peers, set(s.nodes), BACKEND) is None
        for node in ("n1", "n2", "n3"):
            got, _ = s.rebuild_parity(node, set(s.nodes) - {node})
            assert got == s.parity[node]
    finally:
        s.close()


def _backend_params() -> list[Any]:
    out = []
    for b in available_backends():
        marks = []
        if ErasureCodec(2, 1, backend=b).word_size > 1:
            marks.append(
                pytest.mark.skip(
                    reason=f"{b} codes 16-bit words; StoreConfig refuses it for the store, "
                    "whose chunks are cut at any byte"
                )
            )
        out.append(pytest.param(b, id=b, marks=marks))
    return out


@pytest.mark.parametrize("backend", _backend_params())
def test_every_available_backend_protects_ragged_ranks(tmp_path: Path, backend: str) -> None:
    s = build(tmp_path, 3, 1, 6, backend=backend)
    try:
        alive = set(s.nodes) - {"n0"}
        for rank in s.record.ranks_on("n0"):
            got, _ = s.rebuild_rank(rank, alive)
            assert got == s.data[rank]
        if "n0" in s.parity:
            got, _ = s.rebuild_parity("n0", alive)
            assert got == s.parity["n0"]
    finally:
        s.close()


# -- corruption -----------------------------------------------------------------


def test_corrupt_piece_is_repaired_from_the_other_members(store: FakeStore) -> None:
    rec = store.record
    everyone = set(store.nodes)
    for rank, e in rec.ranks.items():
        for j in range(rec.k):
            off, ln = piece_bounds(e.size, rec.k, j)
            if not ln:
                continue
            with flipped(store, e.node, data_name(JOB, rank, STEP), off + ln // 2):
                # The repair path: the home is alive, but its piece is the bad one.
                got, result = store.rebuild_rank(rank, everyone, pieces=[j])
            assert got[off : off + ln] == store.piece(rank, j)
            assert list(result.sums) == [e.sums[j]]
            assert result.bad_sources == ()


def _checked_sources(order: WorkOrder) -> list[Source]:
    """Sources of the order's one output whose bytes are verified before use, in order."""
    (out,) = order.outputs
    return [s for s in out.sources if s.checks]


def _flip_sources(store: FakeStore, sources: list[Source]) -> contextlib.ExitStack[bool | None]:
    stack = contextlib.ExitStack()
    for s in sources:
        name, off, ln = s.checks[0].name, s.checks[0].offset, s.checks[0].length
        stack.enter_context(flipped(store, s.node, name, off + ln // 2))
    return stack


def test_corrupt_sources_are_rejected_and_up_to_m_bad_are_survived(store: FakeStore) -> None:
    """Lose a rank's home, corrupt c more members of the stripe: fine while 1 + c <= m."""
    rec = store.record
    cases = 0
    for rank, e in rec.ranks.items():
        alive = set(store.nodes) - {e.node}
        for j in range(rec.k):
            off, ln = piece_bounds(e.size, rec.k, j)
            if not ln:
                continue
            order = store.rank_order(rank, alive, pieces=[j])
            candidates = _checked_sources(order)
            for c in range(rec.m):
                bad = candidates[:c]
                with _flip_sources(store, bad):
                    got, result = store.run(order, store.root / "rebuilt" / "x" / order.file)
                assert got[off : off + ln] == store.piece(rank, j)
                assert len(result.bad_sources) == c
                for s, text in zip(bad, result.bad_sources, strict=True):
                    assert f"on node {s.node} " in text and s.checks[0].name in text
                cases += 1
    assert cases > 0


def test_more_than_m_corrupt_is_unrecoverable_and_names_each(store: FakeStore) -> None:
    """The home's piece plus m more bad sources: UnrecoverableError listing the m."""
    rec = store.record
    everyone = set(store.nodes)
    for rank, e in rec.ranks.items():
        off, _ = piece_bounds(e.size, rec.k, 0)
        order = store.rank_order(rank, everyone, pieces=[0])
        bad = _checked_sources(order)[: rec.m]
        assert len(bad) == rec.m  # every stripe with data has m parity chunks
        with (
            flipped(store, e.node, data_name(JOB, rank, STEP), off),
            _flip_sources(store, bad),
            pytest.raises(UnrecoverableError) as info,
        ):
            store.run(order, store.root / "rebuilt" / "x" / order.file)
        err = info.value
        assert len(err.lost) == rec.m, err.lost
        for s, text in zip(bad, err.lost, strict=True):
            assert f"rank {rank} piece 0" in text
            assert f"on node {s.node} " in text and s.checks[0].name in text
        assert "need" in str(err)


def test_unavailable_source_counts_as_lost(store: FakeStore) -> None:
    """A node believed alive whose file is gone: its source is skipped, not fatal."""
    rec = store.record
    rank = rec.ranks_on("n0")[0]
    e = rec.ranks[rank]
    alive = set(store.nodes) - {e.node}
    order = store.rank_order(rank, alive, pieces=[0])
    victim = _checked_sources(order)[0]
    name = victim.checks[0].name
    path = store.dirs[victim.node] / name
    moved = path.with_name("moved")
    path.rename(moved)
    try:
        if rec.m == 1:
            with pytest.raises(UnrecoverableError) as info:
                store.run(order, store.root / "rebuilt" / "x" / order.file)
            assert any(f"on node {victim.node} " in t for t in info.value.lost)
        else:
            got, result = store.run(order, store.root / "rebuilt" / "x" / order.file)
            assert got[: len(store.piece(rank, 0))] == store.piece(rank, 0)
            assert [f"on node {victim.node} " in t for t in result.bad_sources] == [True]
    finally:
        moved.rename(path)


# -- too many losses ------------------------------------------------------------


def test_rank_restorable_never_promises_what_cannot_be_rebuilt(store: FakeStore) -> None:
    """Up to m + 1 lost nodes of a group: a rank said restorable rebuilds bitwise."""
    rec = store.record
    for lost in _losses(store, range(1, rec.m + 2)):
        alive = set(store.nodes) - set(lost)
        for rank in [r for n in lost for r in rec.ranks_on(n)]:
            try:
                got, _ = store.rebuild_rank(rank, alive)
            except UnrecoverableError:
                assert not rank_restorable(rec, rank, alive), f"rank {rank} with {lost} lost"
            else:
                assert got == store.data[rank], f"rank {rank} with {lost} lost"


def test_rank_restorable_is_exact_for_a_rank_behind_a_short_chunk(tmp_path: Path) -> None:
    s = build(tmp_path, 3, 1, 6)
    try:
        rec = s.record
        # n0 holds ranks 0 (1000 B) and 5 (777 B); n4 holds rank 3 (64 B). In stripe 4
        # (n4 n5 n0 | n1) rank 5's piece 2 sits at [232, 369) of n0's chunk, past
        # n4's 64 bytes, so losing n0 and n4 leaves it rebuildable.
        assert rec.ranks_on("n0") == [0, 5] and rec.ranks_on("n4") == [3]
        alive = set(s.nodes) - {"n0", "n4"}
        got, _ = s.rebuild_rank(5, alive)
        assert got == s.data[5]
        with pytest.raises(UnrecoverableError):
            s.rebuild_rank(0, alive)  # rank 0's piece 2 does overlap n4's chunk
        assert not rank_restorable(rec, 0, alive)
        assert rank_restorable(rec, 5, alive)
    finally:
        s.close()


def _fatal_loss(store: FakeStore) -> tuple[int, set[str], list[str]]:
    """A rank and m + 1 lost nodes (its home and the parity of its piece 0's stripe)."""
    rec = store.record
    rank = rec.ranks_on("n0")[0]
    home = rec.ranks[rank].node
    gi = rec.group_of(home)
    assert gi is not None
    group = rec.groups[gi]
    s = data_stripe(group, home, 0)
    parity_nodes = [mb.node for mb in stripe_members(group, s, rec.k, rec.m)[rec.k :]]
    return rank, set(store.nodes) - {home, *parity_nodes}, parity_nodes


def test_more_than_m_lost_nodes_is_unrecoverable(store: FakeStore) -> None:
    rank, alive, _ = _fatal_loss(store)
    assert not rank_restorable(store.record, rank, alive)
    with pytest.raises(UnrecoverableError) as info:
        store.rebuild_rank(rank, alive)
    assert info.value.lost, "the error must say what is missing"
    assert f"rank {rank} piece 0" in str(info.value)


def test_unrecoverable_error_names_the_lost_nodes(store: FakeStore) -> None:
    """UnrecoverableError.lost lists every lost chunk, not just how many are missing."""
    rank, alive, parity_nodes = _fatal_loss(store)
    with pytest.raises(UnrecoverableError) as info:
        store.rebuild_rank(rank, alive)
    text = " ".join(info.value.lost)
    for node in parity_nodes:
        assert f"node {node} is lost" in text, f"{node} not named in {info.value.lost}"


# -- redundancy state -----------------------------------------------------------


def _expected_health(rec: StepRecord, alive: set[str]) -> dict[tuple[int, int], list[int]]:
    """For each stripe with data: the RS indices of its chunks on lost nodes."""
    out: dict[tuple[int, int], list[int]] = {}
    for gi, group in enumerate(rec.groups):
        for s in range(len(group)):
            members = stripe_members(group, s, rec.k, rec.m)
            lengths = [chunk_length(rec.ranks, mb.node, mb.index, rec.k) for mb in members[: rec.k]]
            if not any(lengths):
                continue
            held = [mb for mb, ln in zip(members, lengths, strict=False) if ln] + members[rec.k :]
            out[(gi, s)] = [mb.index for mb in held if mb.node not in alive]
    return out


def test_stripe_health_counts_lost_chunks_per_stripe(store: FakeStore) -> None:
    rec = store.record
    everyone = set(store.nodes)
    for lost in [(), *_losses(store, range(1, rec.m + 2))]:
        alive = everyone - set(lost)
        health = stripe_health(rec, alive)
        want = _expected_health(rec, alive)
        assert [(h["group"], h["stripe"]) for h in health] == sorted(want)
        for h in health:
            lost_idx = want[(h["group"], h["stripe"])]
            assert [x["index"] for x in h["lost"]] == lost_idx
            assert all(x["node"] not in alive for x in h["lost"])
            n = len(lost_idx)
            assert h["status"] == ("healthy" if n == 0 else "degraded" if n <= rec.m else "lost")
            assert h["can_lose"] == max(0, rec.m - n)
            assert h["length"] == max(
                p.length for p in rec.parity if (p.group, p.stripe) == (h["group"], h["stripe"])
            )


def test_rank_restorable_when_home_alive_or_group_unknown(store: FakeStore) -> None:
    rec = store.record
    everyone = set(store.nodes)
    assert all(rank_restorable(rec, r, everyone) for r in rec.ranks)
    # Home alive: restorable even if everything else is gone.
    for r, e in rec.ranks.items():
        assert rank_restorable(rec, r, {e.node})
    # A home in no group of the record cannot be rebuilt from anything.
    stray = rec.replace(ranks={**rec.ranks, 0: rec.ranks[0]._replace(node="zz")})
    assert not rank_restorable(stray, 0, everyone)


# -- the same over TCP ----------------------------------------------------------


@pytest.fixture(scope="module", params=[(2, 2, 9), (3, 1, 6)], ids=["k2m2-9nodes", "k3m1-6nodes"])
def tcp_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FakeStore]:
    """Shared by the TCP tests (servers are slow to stop); each test leaves it as found."""
    k, m, n_nodes = request.param
    s = build(tmp_path_factory.mktemp("tcp"), k, m, n_nodes, tcp=True)
    yield s
    s.close()


def test_tcp_parity_build_matches_the_same_host_one(tcp_store: FakeStore, tmp_path: Path) -> None:
    k, m = tcp_store.record.k, tcp_store.record.m
    local = build(tmp_path, k, m, len(tcp_store.nodes))
    try:
        assert tcp_store.record == local.record
        assert tcp_store.parity == local.parity
    finally:
        local.close()


def test_tcp_rebuilds_ranks_and_parity_bitwise(tcp_store: FakeStore) -> None:
    rec = tcp_store.record
    for lost in _losses(tcp_store, range(1, rec.m + 1)):
        alive = set(tcp_store.nodes) - set(lost)
        for rank in [r for n in lost for r in rec.ranks_on(n)]:
            got, result = tcp_store.rebuild_rank(rank, alive)
            assert got == tcp_store.data[rank], f"rank {rank} with {lost} lost"
            assert result.bytes_read > 0
        for node in [n for n in lost if n in tcp_store.parity]:
            got, _ = tcp_store.rebuild_parity(node, alive)
            assert got == tcp_store.parity[node]


def test_tcp_rejects_a_corrupt_source_by_its_remote_checksum(tcp_store: FakeStore) -> None:
    rec = tcp_store.record
    rank = rec.ranks_on("n0")[0]
    everyone = set(tcp_store.nodes)
    order = tcp_store.rank_order(rank, everyone, pieces=[0])
    bad = _checked_sources(order)[: rec.m]
    off, ln = piece_bounds(rec.ranks[rank].size, rec.k, 0)
    path = tcp_store.root / "rebuilt" / "x" / order.file
    # The home's piece is the one being repaired; with m - 1 bad sources it still works.
    with _flip_sources(tcp_store, bad[: rec.m - 1]):
        got, result = tcp_store.run(order, path)
    assert got[off : off + ln] == tcp_store.piece(rank, 0)
    assert len(result.bad_sources) == rec.m - 1
    with _flip_sources(tcp_store, bad), pytest.raises(UnrecoverableError) as info:
        tcp_store.run(order, path)
    assert len(info.value.lost) == rec.m


def test_tcp_unreachable_server_counts_as_a_lost_source(tmp_path: Path) -> None:
    """A node the coordinator still thinks alive, whose data server is gone."""
    s = build(tmp_path, 2, 2, 4, tcp=True)
    try:
        rec = s.record
        rank = rec.ranks_on("n0")[0]
        order = s.rank_order(rank, set(s.nodes), pieces=[0])
        victim = _checked_sources(order)[0].node
        # Drop pooled connections first: a stopped server still answers on them
        # (pinned in test_transport.py).
        s.transport.close()
        s.servers.pop(victim).stop()
        got, result = s.run(order, tmp_path / "rebuilt" / order.file)
        off, ln = piece_bounds(rec.ranks[rank].size, rec.k, 0)
        assert got[off : off + ln] == s.piece(rank, 0)
        assert len(result.bad_sources) == 1 and f"on node {victim} " in result.bad_sources[0]
    finally:
        s.close()


def test_a_stripe_with_one_source_is_copied_and_hashed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where one member holds all of a stripe's bytes and the code's row is all ones (vand's
    first parity row), parity is that member's copy: the layout of test_parity_equals_an_\
independent_encode_of_the_stripe takes that path here, so its bytes are checked there."""
    import snapstore.node.stripes as stripes

    copies: list[int] = []
    real = stripes._copy_range

    def counted(*args: Any, **kwargs: Any) -> Any:
        copies.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stripes, "_copy_range", counted)
    s = build(tmp_path, 3, 1, 6)
    try:
        assert copies, "no stripe of this layout was a plain copy"
        codec = ErasureCodec(3, 1, backend=BACKEND)
        assert codec.coefficient([0, 1, 2], 3, 0) == 1
    finally:
        s.close()
