"""The byte work of an order from :mod:`snapstore.control.orders`: read sources, code, verify.

One function, :func:`run_order`, serves parity for a new step, rebuilds of
lost or corrupt rank pieces, and rebuilds of lost parity chunks: each is
"compute RS index i over a range of a stripe from k other members".

Sources are verified before they are used (their checksums, computed where
the bytes are), the first k that pass are used, and the output is verified
against its recorded checksum when there is one. A restore therefore never
hands out bytes that fail their checksum: a failing source counts as lost.

An order marked ``"verify": "inline"`` (parity of a new step, whose sources
are exactly the stripe's k data members: there is no choice to make) checks
each source while it is read for coding instead of in a read of its own,
and fails, naming every bad source, if one does not match: the same
guarantee for one read of the data instead of two.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from snapstore.coding import Checksummer, ErasureCodec, checksum
from snapstore.errors import UnrecoverableError
from snapstore.node.transport import ChunkUnavailableError, PeerInfo, Transport

__all__ = ["OrderResult", "apply_deltas", "codec_for", "run_order"]

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


@dataclass
class OrderResult:
    """Checksums of the outputs in order, and sources found bad (lost or corrupt)."""

    sums: list[int] = field(default_factory=list)
    bad_sources: list[str] = field(default_factory=list)
    bytes_read: int = 0
    bytes_written: int = 0
    peer_bytes: int = 0
    """Bytes read from other nodes: what crosses the network between hosts."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "sums": self.sums,
            "bad_sources": self.bad_sources,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "peer_bytes": self.peer_bytes,
        }


def run_order(
    order: dict[str, Any],
    transport: Transport,
    dest_view: Callable[[int, int], np.ndarray],
    local_node: str | None = None,
) -> OrderResult:
    """Execute an order; ``dest_view(offset, length)`` gives the writable output range.

    ``local_node`` is the executing node: bytes read from any other node
    count as peer (network) bytes.

    Raises UnrecoverableError when fewer than k sources of an output are
    usable, naming every lost or corrupt one.
    """
    k, m = int(order["k"]), int(order["m"])
    codec = codec_for(k, m, str(order["backend"]))
    inline = order.get("verify") == "inline"
    result = OrderResult()
    verified: dict[tuple[Any, ...], str] = {}
    for out in order["outputs"]:
        dest = dest_view(int(out["offset"]), int(out["length"]))
        what = str(out.get("what", f"index {out['index']}"))
        sources = [_defer_checks(s) for s in out["sources"]] if inline else out["sources"]
        good, bad = _pick_sources(sources, k, transport, verified)
        result.bad_sources.extend(f"{what}: {b}" for b in bad)
        if len(good) < k:
            lost = [f"{what}: {b}" for b in bad] or [f"{what}: only {len(good)} of {k} members"]
            raise UnrecoverableError(
                f"cannot rebuild {what}: {len(good)} usable chunks of the stripe, need {k}", lost
            )
        read, peer, failed = _code_range(
            codec, good, int(out["index"]), dest, transport, local_node
        )
        if failed:
            raise UnrecoverableError(
                f"cannot build {what}: {len(failed)} of its sources fail their checksum",
                [f"{what}: {f}" for f in failed],
            )
        result.bytes_read += read
        result.peer_bytes += peer
        result.bytes_written += len(dest)
        s = checksum(dest)
        expect = out.get("expect")
        if expect is not None and s != int(expect):
            raise UnrecoverableError(
                f"rebuilt {what} fails its checksum: a source changed while it was read "
                "or the record is wrong",
                [f"{what}: rebuilt checksum {s:#x} != recorded {int(expect):#x}"],
            )
        result.sums.append(s)
    return result


def _defer_checks(src: dict[str, Any]) -> dict[str, Any]:
    """``src`` with each check that covers exactly one of its extents moved to ``inline``.

    Those are done while the extent is read for coding; the others stay in
    ``checks``, done before the source is used.
    """
    spans = {(str(n), int(o), int(ln)) for n, o, ln, _ in src.get("extents", [])}
    now: list[Any] = []
    later: list[Any] = []
    for c in src.get("checks", []):
        (later if (str(c[0]), int(c[1]), int(c[2])) in spans else now).append(c)
    return {**src, "checks": now, "inline": later}


def _pick_sources(
    sources: list[dict[str, Any]],
    k: int,
    transport: Transport,
    verified: dict[tuple[Any, ...], str],
) -> tuple[list[dict[str, Any]], list[str]]:
    """The first k sources whose checks pass, and a description of each one that failed."""
    good: list[dict[str, Any]] = []
    bad: list[str] = []
    for src in sources:
        if len(good) == k:
            break
        node = str(src.get("node", "?"))[:12]
        peer = PeerInfo.from_dict(src["peer"]) if src.get("peer") else None
        index = int(src["index"])
        kind = "data" if index < k else "parity"
        problem = f"{kind} chunk {index} on node {node} is lost" if src.get("lost") else ""
        for name, off, ln, want in [] if problem else src.get("checks", []):
            key = (node, name, off, ln, want)
            if key not in verified:
                try:
                    if peer is None:
                        raise ChunkUnavailableError("no peer to read from")
                    got = transport.checksum(peer, name, off, ln)
                    verified[key] = "" if got == want else "fails its checksum"
                except ChunkUnavailableError as e:
                    logger.info("source unavailable: %s", e)
                    verified[key] = f"is unavailable ({e})"
            if verified[key]:
                where = f"{name} [{off}, {off + ln})"
                problem = f"{kind} chunk {index} on node {node} {verified[key]} ({where})"
                break
        if problem:
            bad.append(problem)
        else:
            good.append(src)
    return good, bad


def _code_range(
    codec: ErasureCodec,
    sources: list[dict[str, Any]],
    out_index: int,
    dest: np.ndarray,
    transport: Transport,
    local_node: str | None,
) -> tuple[int, int, list[str]]:
    """Fill ``dest`` (the whole output range) with RS index ``out_index``.

    Returns (bytes read, of which from other nodes, problems): the problems
    name each source extent whose ``inline`` check failed (its bytes were
    checksummed as they were read).
    """
    length = len(dest)
    if length == 0:
        return 0, 0, []
    sums: dict[tuple[int, int], Checksummer] = {}
    inline = [
        {(str(n), int(o), int(ln)): int(want) for n, o, ln, want in s.get("inline", [])}
        for s in sources
    ]
    peers = {
        i: (PeerInfo.from_dict(s["peer"]) if s.get("peer") else None) for i, s in enumerate(sources)
    }
    remote = any(p is not None and not transport.same_host(p) for p in peers.values())
    block = _TCP_BLOCK if remote else _SAME_HOST_BLOCK
    cuts = {0, length}
    for s in sources:
        for _name, _off, ln, roff in s["extents"]:
            cuts.add(min(max(int(roff), 0), length))
            cuts.add(min(max(int(roff) + int(ln), 0), length))
    points = sorted(cuts)
    starts = [[int(e[3]) for e in s["extents"]] for s in sources]
    scratch: dict[int, np.ndarray] = {}
    empty = np.zeros(0, dtype=np.uint8)
    read = peer_read = 0
    for a0, b0 in itertools.pairwise(points):
        for a in range(a0, b0, block):
            b = min(a + block, b0)
            chunks: dict[int, np.ndarray] = {}
            for i, s in enumerate(sources):
                idx = bisect.bisect_right(starts[i], a) - 1
                view = empty
                if idx >= 0:
                    name, off, ln, roff = s["extents"][idx]
                    if a < roff + ln:
                        peer = peers[i]
                        assert peer is not None
                        src_off = int(off) + (a - int(roff))
                        v = transport.view(peer, name, src_off, b - a)
                        if v is None:
                            buf = scratch.get(i)
                            if buf is None:
                                buf = scratch[i] = np.empty(block, dtype=np.uint8)
                            v = buf[: b - a]
                            transport.read_into(peer, name, src_off, v)
                        if (str(name), int(off), int(ln)) in inline[i]:
                            sums.setdefault((i, idx), Checksummer()).update(v)
                        view = v
                        read += b - a
                        if s.get("node") != local_node:
                            peer_read += b - a
                chunks[int(s["index"])] = view
            codec.reconstruct_into(chunks, {out_index: dest[a:b]})
    problems = []
    for i, src in enumerate(sources):
        kind = "data" if int(src["index"]) < codec.k else "parity"
        node = str(src.get("node", "?"))[:12]
        for idx, (name, off, ln, _) in enumerate(src["extents"]):
            want = inline[i].get((str(name), int(off), int(ln)))
            if want is None:
                continue
            h = sums.get((i, idx))
            if h is None or h.value() != want:
                why = "was not read whole" if h is None else "fails its checksum"
                problems.append(
                    f"{kind} chunk {src['index']} on node {node} {why} "
                    f"({name} [{off}, {int(off) + int(ln)}))"
                )
    return read, peer_read, problems


def apply_deltas(
    order: dict[str, Any],
    transport: Transport,
    dest_view: Callable[[int, int], np.ndarray],
    local_node: str | None = None,
) -> OrderResult:
    """Fold data deltas into parity chunks that hold the previous step's parity.

    Each output lists ``updates``: ``{"data_index": j, "node", "peer", "name",
    "src": offset in the delta segment, "length": n, "at": offset in the
    parity chunk}``, meaning data chunk j changed by XOR delta over those n
    bytes. Parity row i gains ``g(i, j) * delta`` (for an all-ones row, the
    delta itself). Returns the new checksums.
    """
    k, m = int(order["k"]), int(order["m"])
    codec = codec_for(k, m, str(order["backend"]))
    result = OrderResult()
    empty = np.zeros(0, dtype=np.uint8)
    scratch = np.empty(0, dtype=np.uint8)
    coeff = np.empty(0, dtype=np.uint8)
    for out in order["outputs"]:
        index = int(out["index"])
        dest = dest_view(int(out["offset"]), int(out["length"]))
        for up in out["updates"]:
            n, at, j = int(up["length"]), int(up["at"]), int(up["data_index"])
            if at < 0 or n < 0 or at + n > len(dest):
                raise UnrecoverableError(
                    f"delta update [{at}, {at + n}) outside parity chunk of {len(dest)} bytes", []
                )
            peer = PeerInfo.from_dict(up["peer"])
            for off in range(0, n, _SAME_HOST_BLOCK):
                ln = min(_SAME_HOST_BLOCK, n - off)
                view = transport.view(peer, up["name"], int(up["src"]) + off, ln)
                if view is None:
                    if len(scratch) < ln:
                        scratch = np.empty(ln, dtype=np.uint8)
                    view = scratch[:ln]
                    transport.read_into(peer, up["name"], int(up["src"]) + off, view)
                result.bytes_read += ln
                if up.get("node") != local_node:
                    result.peer_bytes += ln
                target = dest[at + off : at + off + ln]
                if codec.parity_is_xor:
                    np.bitwise_xor(target, view, out=target)
                    continue
                if len(coeff) < ln:
                    coeff = np.empty(ln, dtype=np.uint8)
                chunks = {i: (view if i == j else empty) for i in range(k)}
                codec.reconstruct_into(chunks, {index: coeff[:ln]})
                np.bitwise_xor(target, coeff[:ln], out=target)
            result.bytes_written += n
        result.sums.append(checksum(dest))
    return result
