"""Byte-work orders for nodes, derived from step records: what to read, what to write.

The control plane decides *what* a node computes (parity for a new step, a
lost rank's pieces, a lost parity chunk); :mod:`snapstore.node.stripes` does
the byte work. Orders are :class:`snapstore.format.work.WorkOrder` messages
(see that module for what a source, an extent and a check are).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from snapstore.control.placement import chunk_extents, data_stripe, stripe_members
from snapstore.format.record import ParityEntry, StepRecord, piece_bounds
from snapstore.format.work import (
    Check,
    Delta,
    DeltaUpdate,
    Output,
    PeerInfo,
    Source,
    SourceExtent,
    WorkKind,
    WorkOrder,
)
from snapstore.node.segments import data_name, parity_name

__all__ = [
    "parity_build_orders",
    "parity_delta_orders",
    "parity_rebuild_orders",
    "rank_rebuild_orders",
    "same_geometry",
    "stripe_sources",
]


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
) -> list[Source]:
    """Every member of a stripe that can supply bytes [lo, hi) of the stripe.

    ``usable`` are nodes whose SMPs may be read; ``exclude`` is the node being
    rebuilt. Data members come first, then parity.
    """
    usable = set(usable)
    members = stripe_members(record.groups[group], stripe, record.k, record.m)
    pindex = _parity_index(record)
    out: list[Source] = []
    for mb in members:
        if mb.node == exclude:
            continue
        extents: list[SourceExtent] = []
        checks: list[Check] = []
        if mb.index < record.k:
            for e in chunk_extents(record.ranks, mb.node, mb.index, record.k):
                a, b = max(lo, e.chunk_offset), min(hi, e.chunk_offset + e.length)
                if a >= b:
                    continue
                name = data_name(record.job, e.rank, record.step)
                extents.append(SourceExtent(name, e.offset + (a - e.chunk_offset), b - a, a - lo))
                checks.append(Check(name, e.offset, e.length, record.ranks[e.rank].sums[mb.index]))
        else:
            p = pindex.get((group, stripe, mb.index))
            if p is not None and lo < p.length:
                name = parity_name(record.job, record.step, record.version)
                b = min(hi, p.length)
                extents.append(SourceExtent(name, p.offset + lo, b - lo, 0))
                checks.append(Check(name, p.offset, p.length, p.sum))
        peer = peers.get(mb.node)
        if extents and (mb.node not in usable or peer is None):
            # Its bytes are needed but its node is gone: listed, so that an
            # error can name it, and never read.
            out.append(Source(mb.index, mb.node, None, tuple(extents), tuple(checks), lost=True))
            continue
        out.append(
            Source(
                mb.index,
                mb.node,
                peer if (extents and peer is not None) else None,
                tuple(extents),
                tuple(checks),
            )
        )
    return out


def parity_build_orders(
    record: StepRecord, peers: Mapping[str, PeerInfo], backend: str
) -> dict[str, WorkOrder]:
    """For each parity holder: compute its parity chunks of a new step from the data members.

    The k data members are the only sources: each is checked as it is read
    for coding (:func:`snapstore.node.stripes.run_order`), not in a read of
    its own.
    """
    outputs: dict[str, list[Output]] = {}
    for p in record.parity:
        group = record.groups[p.group]
        sources = stripe_sources(record, p.group, p.stripe, 0, p.length, peers, group)
        data_sources = tuple(s for s in sources if s.index < record.k)
        outputs.setdefault(p.node, []).append(Output(p.index, p.offset, p.length, data_sources))
    name = parity_name(record.job, record.step, record.version)
    return {
        node: WorkOrder(
            WorkKind.PARITY,
            record.job,
            name,
            record.parity_file_size(node),
            record.k,
            record.m,
            backend,
            tuple(outs),
            target=node,
        )
        for node, outs in outputs.items()
    }


def rank_rebuild_orders(
    record: StepRecord,
    rank: int,
    target: str,
    peers: Mapping[str, PeerInfo],
    usable: Iterable[str],
    backend: str,
    pieces: Iterable[int] | None = None,
    pin: bool = False,
) -> WorkOrder:
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
    outputs: list[Output] = []
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
            Output(
                j,
                off,
                ln,
                tuple(sources),
                expect=entry.sums[j],
                what=f"rank {rank} piece {j} (stripe {s} of group {gi}, data index {j})",
            )
        )
    return WorkOrder(
        WorkKind.REBUILD,
        record.job,
        data_name(record.job, rank, record.step),
        entry.size,
        record.k,
        record.m,
        backend,
        tuple(outputs),
        target=target,
        pin=pin,
    )


def parity_rebuild_orders(
    record: StepRecord,
    node: str,
    peers: Mapping[str, PeerInfo],
    usable: Iterable[str],
    backend: str,
) -> WorkOrder | None:
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
            Output(
                p.index,
                p.offset,
                p.length,
                tuple(sources),
                expect=p.sum,
                what=f"parity {p.index} of stripe {p.stripe} in group {p.group}",
            )
        )
    return WorkOrder(
        WorkKind.REBUILD,
        record.job,
        parity_name(record.job, record.step, record.version),
        record.parity_file_size(node),
        record.k,
        record.m,
        backend,
        tuple(outputs),
        target=node,
    )


def parity_delta_orders(
    record: StepRecord,
    base: StepRecord,
    deltas: Mapping[int, Delta],
    peers: Mapping[str, PeerInfo],
    backend: str,
) -> dict[str, WorkOrder]:
    """Parity of ``record`` as ``base``'s parity plus the data deltas of each rank.

    Valid only when both records place the same bytes in the same stripes
    (same homes, sizes, groups and parity layout; see :func:`same_geometry`)
    and each rank's delta is against ``base``'s step.
    """
    base_name = parity_name(record.job, base.step, base.version)
    outputs: dict[str, list[Output]] = {}
    for p in record.parity:
        group = record.groups[p.group]
        updates: list[DeltaUpdate] = []
        for mb in stripe_members(group, p.stripe, record.k, record.m)[: record.k]:
            peer = peers[mb.node]
            for e in chunk_extents(record.ranks, mb.node, mb.index, record.k):
                d = deltas[e.rank]
                for off, ln, at in d.ranges:
                    a, b = max(off, e.offset), min(off + ln, e.offset + e.length)
                    if a >= b:
                        continue
                    updates.append(
                        DeltaUpdate(
                            mb.index,
                            mb.node,
                            peer,
                            d.file,
                            at + (a - off),
                            b - a,
                            e.chunk_offset + (a - e.offset),
                        )
                    )
        outputs.setdefault(p.node, []).append(
            Output(p.index, p.offset, p.length, updates=tuple(updates))
        )
    name = parity_name(record.job, record.step, record.version)
    return {
        node: WorkOrder(
            WorkKind.PARITY_DELTA,
            record.job,
            name,
            record.parity_file_size(node),
            record.k,
            record.m,
            backend,
            tuple(outs),
            target=node,
            base=base_name,
        )
        for node, outs in outputs.items()
    }


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
