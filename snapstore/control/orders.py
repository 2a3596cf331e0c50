"""Byte-work orders for SMPs, derived from step records: what to read, what to write.

The coordinator decides *what* an SMP computes (parity for a new step, a lost
rank's pieces, a lost parity chunk); :mod:`snapstore.node.stripes` does the byte
work. Orders are plain dicts (msgpack-able) so they cross process boundaries
without pickling anything of ours.

A *source* is one member of a stripe, read over the same range of the stripe
as the output: ``{"index": RS index, "peer": PeerInfo dict or None,
"extents": [[segment name, offset, length, range_offset], ...],
"checks": [[segment name, offset, length, checksum], ...]}``, with
``"lost": True`` for a member whose bytes are needed but whose node is gone
(listed so errors can name it; never read). Extents say
where the member's bytes of the range are; bytes of the range no extent
covers are zeros (the member's chunk is shorter). ``checks`` are whole
pieces or parity chunks that must hash right before the source is trusted.
A member with no bytes in the range needs no peer at all: its zeros are known
from the record, even when its node is lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from snapstore.control.placement import chunk_extents, data_stripe, stripe_members
from snapstore.format.record import ParityEntry, StepRecord, piece_bounds
from snapstore.node.segments import data_name, parity_name
from snapstore.node.transport import PeerInfo

__all__ = [
    "parity_build_orders",
    "parity_delta_orders",
    "parity_rebuild_orders",
    "rank_rebuild_orders",
    "same_geometry",
    "stripe_sources",
]

Order = dict[str, Any]


def _parity_index(record: StepRecord) -> dict[tuple[int, int, int], ParityEntry]:
    return {(p.group, p.stripe, p.index): p for p in record.parity}


def stripe_sources(
    record: StepRecord,
    group: int,
    stripe: int,
    lo: int,
    hi: int,
    peers: Mapping[str, PeerInfo],
    usable: Iterable[str],
    exclude: str | None = None,
) -> list[dict[str, Any]]:
    """Every member of a stripe that can supply bytes [lo, hi) of the stripe.

    ``usable`` are nodes whose SMPs may be read; ``exclude`` is the node being
    rebuilt. Data members come first, then parity.
    """
    usable = set(usable)
    members = stripe_members(record.groups[group], stripe, record.k, record.m)
    pindex = _parity_index(record)
    out: list[dict[str, Any]] = []
    for mb in members:
        if mb.node == exclude:
            continue
        extents: list[list[Any]] = []
        checks: list[list[Any]] = []
        if mb.index < record.k:
            for e in chunk_extents(record.ranks, mb.node, mb.index, record.k):
                a, b = max(lo, e.chunk_offset), min(hi, e.chunk_offset + e.length)
                if a >= b:
                    continue
                name = data_name(record.job, e.rank, record.step)
                extents.append([name, e.offset + (a - e.chunk_offset), b - a, a - lo])
                checks.append([name, e.offset, e.length, record.ranks[e.rank].sums[mb.index]])
        else:
            p = pindex.get((group, stripe, mb.index))
            if p is not None and lo < p.length:
                name = parity_name(record.job, record.step, record.version)
                b = min(hi, p.length)
                extents.append([name, p.offset + lo, b - lo, 0])
                checks.append([name, p.offset, p.length, p.sum])
        peer = peers.get(mb.node)
        if extents and (mb.node not in usable or peer is None):
            # Its bytes are needed but its node is gone: listed, so that an
            # error can name it, and never read.
            out.append(
                {
                    "index": mb.index,
                    "node": mb.node,
                    "lost": True,
                    "peer": None,
                    "extents": extents,
                    "checks": checks,
                }
            )
            continue
        out.append(
            {
                "index": mb.index,
                "node": mb.node,
                "peer": peer.to_dict() if (extents and peer is not None) else None,
                "extents": extents,
                "checks": checks,
            }
        )
    return out


def parity_build_orders(
    record: StepRecord, peers: Mapping[str, PeerInfo], backend: str
) -> dict[str, Order]:
    """For each parity holder: compute its parity chunks of a new step from the data members."""
    orders: dict[str, Order] = {}
    for p in record.parity:
        group = record.groups[p.group]
        sources = stripe_sources(record, p.group, p.stripe, 0, p.length, peers, group)
        data_sources = [s for s in sources if s["index"] < record.k]
        order = orders.setdefault(
            p.node,
            {
                "k": record.k,
                "m": record.m,
                "backend": backend,
                "file": parity_name(record.job, record.step, record.version),
                "file_size": record.parity_file_size(p.node),
                "job": record.job,
                # The k data members are the only sources: check each as it is
                # read for coding (stripes.run_order), not in a read of its own.
                "verify": "inline",
                "outputs": [],
            },
        )
        order["outputs"].append(
            {
                "index": p.index,
                "offset": p.offset,
                "length": p.length,
                "sources": data_sources,
                "expect": None,
            }
        )
    return orders


def rank_rebuild_orders(
    record: StepRecord,
    rank: int,
    target: str,
    peers: Mapping[str, PeerInfo],
    usable: Iterable[str],
    backend: str,
    pieces: Iterable[int] | None = None,
) -> Order:
    """Rebuild rank ``rank``'s pieces (all, or ``pieces``) into its data file on ``target``.

    Sources are the other members of each piece's stripe in ``record``; the
    rank's own home is excluded (it is lost, or its piece is corrupt).
    """
    entry = record.ranks[rank]
    home = entry.node
    gi = record.group_of(home)
    if gi is None:
        raise ValueError(f"rank {rank}'s home {home[:12]} is in no group of the record")
    group = record.groups[gi]
    usable = set(usable)
    outputs: list[dict[str, Any]] = []
    wanted = range(record.k) if pieces is None else sorted(set(pieces))
    for j in wanted:
        off, ln = piece_bounds(entry.size, record.k, j)
        if ln == 0:
            continue
        extent = next(e for e in chunk_extents(record.ranks, home, j, record.k) if e.rank == rank)
        s = data_stripe(group, home, j)
        lo, hi = extent.chunk_offset, extent.chunk_offset + ln
        sources = stripe_sources(record, gi, s, lo, hi, peers, usable, exclude=home)
        outputs.append(
            {
                "index": j,
                "offset": off,
                "length": ln,
                "sources": sources,
                "expect": entry.sums[j],
                "what": f"rank {rank} piece {j} (stripe {s} of group {gi}, data index {j})",
            }
        )
    return {
        "k": record.k,
        "m": record.m,
        "backend": backend,
        "file": data_name(record.job, rank, record.step),
        "file_size": entry.size,
        "job": record.job,
        "target": target,
        "outputs": outputs,
    }


def parity_rebuild_orders(
    record: StepRecord,
    node: str,
    peers: Mapping[str, PeerInfo],
    usable: Iterable[str],
    backend: str,
) -> Order | None:
    """Rebuild the parity chunks ``node`` holds in ``record`` (its SMP lost them)."""
    mine = record.parity_on(node)
    if not mine:
        return None
    usable = set(usable)
    outputs = []
    for p in mine:
        sources = stripe_sources(
            record, p.group, p.stripe, 0, p.length, peers, usable, exclude=node
        )
        outputs.append(
            {
                "index": p.index,
                "offset": p.offset,
                "length": p.length,
                "sources": sources,
                "expect": p.sum,
                "what": f"parity {p.index} of stripe {p.stripe} in group {p.group}",
            }
        )
    return {
        "k": record.k,
        "m": record.m,
        "backend": backend,
        "file": parity_name(record.job, record.step, record.version),
        "file_size": record.parity_file_size(node),
        "job": record.job,
        "target": node,
        "outputs": outputs,
    }


def parity_delta_orders(
    record: StepRecord,
    base: StepRecord,
    deltas: Mapping[int, dict[str, Any]],
    peers: Mapping[str, PeerInfo],
    backend: str,
) -> dict[str, Order]:
    """Parity of ``record`` as ``base``'s parity plus the data deltas of each rank.

    Valid only when both records place the same bytes in the same stripes
    (same homes, sizes, groups and parity layout; see :func:`same_geometry`)
    and each rank's delta is against ``base``'s step.
    """
    base_name = parity_name(record.job, base.step, base.version)
    orders: dict[str, Order] = {}
    for p in record.parity:
        group = record.groups[p.group]
        updates: list[dict[str, Any]] = []
        for mb in stripe_members(group, p.stripe, record.k, record.m)[: record.k]:
            peer = peers[mb.node].to_dict()
            for e in chunk_extents(record.ranks, mb.node, mb.index, record.k):
                d = deltas[e.rank]
                for off, ln, at in d["ranges"]:
                    a, b = max(off, e.offset), min(off + ln, e.offset + e.length)
                    if a >= b:
                        continue
                    updates.append(
                        {
                            "data_index": mb.index,
                            "node": mb.node,
                            "peer": peer,
                            "name": d["file"],
                            "src": at + (a - off),
                            "length": b - a,
                            "at": e.chunk_offset + (a - e.offset),
                        }
                    )
        order = orders.setdefault(
            p.node,
            {
                "mode": "delta",
                "k": record.k,
                "m": record.m,
                "backend": backend,
                "job": record.job,
                "file": parity_name(record.job, record.step, record.version),
                "file_size": record.parity_file_size(p.node),
                "base": base_name,
                "outputs": [],
            },
        )
        order["outputs"].append(
            {"index": p.index, "offset": p.offset, "length": p.length, "updates": updates}
        )
    return orders


def same_geometry(a: StepRecord, b: StepRecord) -> bool:
    """Whether two records put every byte in the same stripe at the same place."""
    if (a.k, a.m, a.groups) != (b.k, b.m, b.groups) or a.ranks.keys() != b.ranks.keys():
        return False
    if any(
        (a.ranks[r].node, a.ranks[r].size) != (b.ranks[r].node, b.ranks[r].size) for r in a.ranks
    ):
        return False
    geo = [(p.group, p.stripe, p.index, p.node, p.offset, p.length) for p in a.parity]
    return geo == [(p.group, p.stripe, p.index, p.node, p.offset, p.length) for p in b.parity]
