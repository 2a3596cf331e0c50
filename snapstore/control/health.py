"""Redundancy of a committed step: which stripes lost how much, and what can be restored.

Pure functions over one (group-local or whole) step record and a set of
nodes that can be read; tested without a cluster.
"""

from __future__ import annotations

import collections
from typing import Any

from snapstore.control.placement import chunk_extents, chunk_length, data_stripe, stripe_members
from snapstore.format.record import StepRecord

__all__ = ["rank_restorable", "stripe_health"]


def stripe_health(record: StepRecord, alive: set[str]) -> list[dict[str, Any]]:
    """Per stripe with data: how many of its chunks are lost and how many more it can lose."""
    out = []
    k, m = record.k, record.m
    by_stripe: dict[tuple[int, int], list[Any]] = collections.defaultdict(list)
    for p in record.parity:
        by_stripe[(p.group, p.stripe)].append(p)
    for (gi, s), parity in sorted(by_stripe.items()):
        group = record.groups[gi]
        members = stripe_members(group, s, k, m)
        holders = [
            (mb.index, mb.node)
            for mb in members[:k]
            if chunk_length(record.ranks, mb.node, mb.index, k) > 0
        ]
        holders += [(p.index, p.node) for p in parity]
        lost = [(i, n) for i, n in holders if n not in alive]
        status = "healthy" if not lost else ("degraded" if len(lost) <= m else "lost")
        out.append(
            {
                "group": gi,
                "stripe": s,
                "status": status,
                "lost": [{"index": i, "node": n} for i, n in lost],
                "can_lose": max(0, m - len(lost)),
                "length": max(p.length for p in parity),
            }
        )
    return out


def rank_restorable(record: StepRecord, rank: int, alive: set[str]) -> bool:
    """Whether ``rank``'s buffer can be read or rebuilt with the nodes in ``alive``.

    Exact, per byte range: for each of the rank's pieces, the other members
    of its stripe are counted as available when their node is alive or when
    they hold no bytes in the piece's range (their zeros are known).
    """
    entry = record.ranks[rank]
    if entry.node in alive:
        return True
    gi = record.group_of(entry.node)
    if gi is None:
        return False
    group = record.groups[gi]
    k, m = record.k, record.m
    parity = {(p.stripe, p.index): p for p in record.parity if p.group == gi}
    for j in range(k):
        mine = [e for e in chunk_extents(record.ranks, entry.node, j, k) if e.rank == rank]
        if not mine:
            continue
        lo, hi = mine[0].chunk_offset, mine[0].chunk_offset + mine[0].length
        s = data_stripe(group, entry.node, j)
        available = 0
        for mb in stripe_members(group, s, k, m):
            if mb.node == entry.node:
                continue
            if mb.index < k:
                has = any(
                    e.chunk_offset < hi and lo < e.chunk_offset + e.length
                    for e in chunk_extents(record.ranks, mb.node, mb.index, k)
                )
            else:
                p = parity.get((s, mb.index))
                has = p is not None and lo < p.length
            if mb.node in alive or not has:
                available += 1
        if available < k:
            return False
    return True
