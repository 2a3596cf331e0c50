"""The byte work of an order from :mod:`snapstore.control.orders`: read sources, code, verify.

One function, :func:`run_order`, serves parity for a new step, rebuilds of
lost or corrupt rank pieces, and rebuilds of lost parity chunks: each is
"compute RS index i over a range of a stripe from k other members".

Sources are verified before they are used (their checksums, computed where
the bytes are), the first k that pass are used, and the output is verified
against its recorded checksum when there is one. A restore therefore never
hands out bytes that fail their checksum: a failing source counts as lost.

A PARITY order (parity of a new step, whose sources are exactly the
stripe's k data members: there is no choice to make) checks each source
while it is read for coding instead of in a read of its own, and fails,
naming every bad source, if one does not match: the same guarantee for one
read of the data instead of two.

An output that is a plain copy of one source (the only member of its stripe
with bytes there, coefficient 1: a job whose ranks all live on one node of
the group, under ``isa_l_rs_vand``'s all-ones first parity row) is copied,
and the copy hashed once: that hash is the output's checksum and the
source's inline check, where the general path hashes the source and then
the output it coded from it.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from snapstore.coding import Checksummer, ErasureCodec, checksum
from snapstore.errors import UnrecoverableError
from snapstore.format.work import Source, SourceExtent, WorkKind, WorkOrder, WorkResult
from snapstore.node.transport import ChunkUnavailableError, Transport

__all__ = ["apply_deltas", "codec_for", "run_order"]

logger = logging.getLogger(__name__)

_SAME_HOST_BLOCK = 16 << 20
_TCP_BLOCK = 4 << 20

_codecs: dict[tuple[int, int, str], ErasureCodec] = {}
_codecs_lock = threading.Lock()


def codec_for(k: int, m: int, backend: str) -> ErasureCodec:
    """One codec per (k, m, backend) per process: its tables are worth keeping."""
    key = (k, m, backend)
    with _codecs_lock:
        codec = _codecs.get(key)
        if codec is None:
            codec = _codecs[key] = ErasureCodec(k, m, backend=backend)
        return codec


class _Src:
    """A source as one coding pass uses it: checks to do first, and checks done inline."""

    __slots__ = ("checks", "inline", "src")

    def __init__(self, src: Source, inline: bool) -> None:
        self.src = src
        spans = {(e.name, e.offset, e.length) for e in src.extents} if inline else set()
        self.checks = [c for c in src.checks if (c.name, c.offset, c.length) not in spans]
        self.inline = {
            (c.name, c.offset, c.length): c.sum
            for c in src.checks
            if (c.name, c.offset, c.length) in spans
        }


def run_order(
    order: WorkOrder,
    transport: Transport,
    dest_view: Callable[[int, int], np.ndarray],
    local_node: str | None = None,
) -> WorkResult:
    """Execute a PARITY or REBUILD order; ``dest_view(offset, length)`` gives the output range.

    ``local_node`` is the executing node: bytes read from any other node
    count as peer (network) bytes. A PARITY order (its sources are exactly
    the stripe's k data members: there is no choice to make) checks each
    source while it is read for coding instead of in a read of its own, and
    fails, naming every bad source, if one does not match.

    Raises UnrecoverableError when fewer than k sources of an output are
    usable, naming every lost or corrupt one.
    """
    k, m = order.k, order.m
    codec = codec_for(k, m, order.backend)
    inline = order.kind is WorkKind.PARITY
    sums: list[int] = []
    bad_sources: list[str] = []
    read_total = peer_total = written = 0
    verified: dict[tuple[Any, ...], str] = {}
    for out in order.outputs:
        dest = dest_view(out.offset, out.length)
        what = out.what or f"index {out.index}"
        sources = [_Src(s, inline) for s in out.sources]
        good, bad = _pick_sources(sources, k, transport, verified)
        bad_sources.extend(f"{what}: {b}" for b in bad)
        if len(good) < k:
            lost = [f"{what}: {b}" for b in bad] or [f"{what}: only {len(good)} of {k} members"]
            raise UnrecoverableError(
                f"cannot rebuild {what}: {len(good)} usable chunks of the stripe, need {k}", lost
            )
        single = _single_copy(codec, good, out.index, len(dest))
        if single is not None:
            read, peer, failed, s = _copy_range(single, dest, transport, local_node, k)
        else:
            read, peer, failed = _code_range(codec, good, out.index, dest, transport, local_node)
        if failed:
            raise UnrecoverableError(
                f"cannot build {what}: {len(failed)} of its sources fail their checksum",
                [f"{what}: {f}" for f in failed],
            )
        read_total += read
        peer_total += peer
        written += len(dest)
        if single is None:
            s = checksum(dest)
        if out.expect is not None and s != out.expect:
            raise UnrecoverableError(
                f"rebuilt {what} fails its checksum: a source changed while it was read "
                "or the record is wrong",
                [f"{what}: rebuilt checksum {s:#x} != recorded {out.expect:#x}"],
            )
        sums.append(s)
    return WorkResult(tuple(sums), tuple(bad_sources), read_total, written, peer_total)


def _pick_sources(
    sources: list[_Src],
    k: int,
    transport: Transport,
    verified: dict[tuple[Any, ...], str],
) -> tuple[list[_Src], list[str]]:
    """The first k sources whose checks pass, and a description of each one that failed."""
    good: list[_Src] = []
    bad: list[str] = []
    for s in sources:
        if len(good) == k:
            break
        src = s.src
        node = src.node[:12]
        kind = "data" if src.index < k else "parity"
        problem = f"{kind} chunk {src.index} on node {node} is lost" if src.lost else ""
        for c in [] if problem else s.checks:
            key = (node, c.name, c.offset, c.length, c.sum)
            if key not in verified:
                try:
                    if src.peer is None:
                        raise ChunkUnavailableError("no peer to read from")
                    got = transport.checksum(src.peer, c.name, c.offset, c.length)
                    verified[key] = "" if got == c.sum else "fails its checksum"
                except ChunkUnavailableError as e:
                    logger.info("source unavailable: %s", e)
                    verified[key] = f"is unavailable ({e})"
            if verified[key]:
                where = f"{c.name} [{c.offset}, {c.offset + c.length})"
                problem = f"{kind} chunk {src.index} on node {node} {verified[key]} ({where})"
                break
        if problem:
            bad.append(problem)
        else:
            good.append(s)
    return good, bad


def _single_copy(
    codec: ErasureCodec, sources: list[_Src], out_index: int, length: int
) -> _Src | None:
    """The one source the output is a plain copy of, if it is one; else None.

    That is when a single source has bytes for the output, as one extent
    covering all of it, and its coefficient in the output is 1: the parity of
    a stripe whose other data members hold nothing of the step (a job whose
    ranks are all homed on one node of the group), with a code whose parity
    row is all ones (the first parity row of ``isa_l_rs_vand``). The output
    is then those bytes, and its checksum is the source's.
    """
    if length == 0:
        return None
    live = [s for s in sources if s.src.extents]
    if len(live) != 1 or len(live[0].src.extents) != 1:
        return None
    s = live[0]
    e = s.src.extents[0]
    if e.at != 0 or e.length != length or s.src.peer is None:
        return None
    present = [x.src.index for x in sources]
    if codec.coefficient(present, out_index, s.src.index) != 1:
        return None
    return s


def _copy_range(
    s: _Src, dest: np.ndarray, transport: Transport, local_node: str | None, k: int
) -> tuple[int, int, list[str], int]:
    """Fill ``dest`` with the bytes of the one extent of ``s`` (see :func:`_single_copy`).

    One read of the source and one hash of what was written: the hash is the
    output's checksum and, when the order checks the source inline, the
    source's check too (the copy holds the very bytes read), so the bytes are
    hashed once instead of twice (once as the source, once as the output).
    Returns (bytes read, of which from other nodes, problems, checksum).
    """
    src = s.src
    e = src.extents[0]
    peer = src.peer
    assert peer is not None
    length = len(dest)
    block = _SAME_HOST_BLOCK if transport.same_host(peer) else _TCP_BLOCK
    h = Checksummer()
    for a in range(0, length, block):
        b = min(a + block, length)
        part = dest[a:b]
        v = transport.view(peer, e.name, e.offset + a, b - a)
        if v is None:
            transport.read_into(peer, e.name, e.offset + a, part)
        else:
            np.copyto(part, v)
        h.update(part)
    got = h.value()
    problems = []
    want = s.inline.get((e.name, e.offset, e.length))
    if want is not None and got != want:
        problems.append(_bad_source(src, e, k, "fails its checksum"))
    peer_read = length if src.node != local_node else 0
    return length, peer_read, problems, got


def _code_range(
    codec: ErasureCodec,
    sources: list[_Src],
    out_index: int,
    dest: np.ndarray,
    transport: Transport,
    local_node: str | None,
) -> tuple[int, int, list[str]]:
    """Fill ``dest`` (the whole output range) with RS index ``out_index``.

    Returns (bytes read, of which from other nodes, problems): the problems
    name each source extent whose inline check failed (its bytes were
    checksummed as they were read).
    """
    length = len(dest)
    if length == 0:
        return 0, 0, []
    sums: dict[tuple[int, int], Checksummer] = {}
    remote = any(s.src.peer is not None and not transport.same_host(s.src.peer) for s in sources)
    block = _TCP_BLOCK if remote else _SAME_HOST_BLOCK
    cuts = {0, length}
    for s in sources:
        for e in s.src.extents:
            cuts.add(min(max(e.at, 0), length))
            cuts.add(min(max(e.at + e.length, 0), length))
    points = sorted(cuts)
    starts = [[e.at for e in s.src.extents] for s in sources]
    scratch: dict[int, np.ndarray] = {}
    empty = np.zeros(0, dtype=np.uint8)
    read = peer_read = 0
    for a0, b0 in itertools.pairwise(points):
        for a in range(a0, b0, block):
            b = min(a + block, b0)
            chunks: dict[int, np.ndarray] = {}
            for i, s in enumerate(sources):
                src = s.src
                idx = bisect.bisect_right(starts[i], a) - 1
                view = empty
                if idx >= 0:
                    e = src.extents[idx]
                    if a < e.at + e.length:
                        peer = src.peer
                        assert peer is not None
                        src_off = e.offset + (a - e.at)
                        v = transport.view(peer, e.name, src_off, b - a)
                        if v is None:
                            buf = scratch.get(i)
                            if buf is None:
                                buf = scratch[i] = np.empty(block, dtype=np.uint8)
                            v = buf[: b - a]
                            transport.read_into(peer, e.name, src_off, v)
                        if (e.name, e.offset, e.length) in s.inline:
                            sums.setdefault((i, idx), Checksummer()).update(v)
                        view = v
                        read += b - a
                        if src.node != local_node:
                            peer_read += b - a
                chunks[src.index] = view
            codec.reconstruct_into(chunks, {out_index: dest[a:b]})
    problems = []
    for i, s in enumerate(sources):
        for idx, e in enumerate(s.src.extents):
            want = s.inline.get((e.name, e.offset, e.length))
            if want is None:
                continue
            h = sums.get((i, idx))
            if h is None or h.value() != want:
                why = "was not read whole" if h is None else "fails its checksum"
                problems.append(_bad_source(s.src, e, codec.k, why))
    return read, peer_read, problems


def _bad_source(src: Source, e: SourceExtent, k: int, why: str) -> str:
    """A source extent whose inline check failed, named as every problem of an order is."""
    kind = "data" if src.index < k else "parity"
    where = f"{e.name} [{e.offset}, {e.offset + e.length})"
    return f"{kind} chunk {src.index} on node {src.node[:12]} {why} ({where})"


def apply_deltas(
    order: WorkOrder,
    transport: Transport,
    dest_view: Callable[[int, int], np.ndarray],
    local_node: str | None = None,
) -> WorkResult:
    """Fold data deltas into parity chunks that hold the previous step's parity.

    Each output's ``updates`` say that data chunk ``data_index`` changed by
    the XOR delta in ``length`` bytes of segment ``name`` at ``src``, landing
    at ``at`` in the parity chunk. Parity row i gains ``g(i, j) * delta``
    (for an all-ones row, the delta itself). Returns the new checksums.
    """
    k, m = order.k, order.m
    codec = codec_for(k, m, order.backend)
    sums: list[int] = []
    read_total = peer_total = written = 0
    empty = np.zeros(0, dtype=np.uint8)
    scratch = np.empty(0, dtype=np.uint8)
    coeff = np.empty(0, dtype=np.uint8)
    for out in order.outputs:
        index = out.index
        dest = dest_view(out.offset, out.length)
        for up in out.updates:
            n, at, j = up.length, up.at, up.data_index
            if at < 0 or n < 0 or at + n > len(dest):
                raise UnrecoverableError(
                    f"delta update [{at}, {at + n}) outside parity chunk of {len(dest)} bytes", []
                )
            for off in range(0, n, _SAME_HOST_BLOCK):
                ln = min(_SAME_HOST_BLOCK, n - off)
                view = transport.view(up.peer, up.name, up.src + off, ln)
                if view is None:
                    if len(scratch) < ln:
                        scratch = np.empty(ln, dtype=np.uint8)
                    view = scratch[:ln]
                    transport.read_into(up.peer, up.name, up.src + off, view)
                read_total += ln
                if up.node != local_node:
                    peer_total += ln
                target = dest[at + off : at + off + ln]
                if codec.parity_is_xor:
                    np.bitwise_xor(target, view, out=target)
                    continue
                if len(coeff) < ln:
                    coeff = np.empty(ln, dtype=np.uint8)
                chunks = {i: (view if i == j else empty) for i in range(k)}
                codec.reconstruct_into(chunks, {index: coeff[:ln]})
                np.bitwise_xor(target, coeff[:ln], out=target)
            written += n
        sums.append(checksum(dest))
    return WorkResult(tuple(sums), (), read_total, written, peer_total)
