"""Placement: which nodes form stripe groups, and which bytes form each stripe.

Stripe groups
    Store nodes are split into groups of at least ``k + m`` nodes (at most
    ``2(k + m) - 1``). A group of ``n`` nodes has ``n`` stripes. Stripe ``s``
    takes the nodes at group positions ``s, s+1, ..., s+k+m-1`` (mod n):
    the first k are its data members, the last m hold its parity. Parity
    roles so rotate across the group as in RAID-5/6: every node is a data
    member of exactly k stripes and holds exactly m parity chunks, and the
    memory overhead is ``(k + m) / k`` whatever n is. Any m nodes of a group
    may be lost at once: each stripe then loses at most m of its k + m.

Chunks
    A node's data for one step of one job is the buffers of the job's ranks
    homed on it, in rank order. Each buffer is cut into k pieces
    (:func:`snapstore.format.record.piece_bounds`); the node's chunk ``j`` is the
    concatenation of piece ``j`` of each of its ranks. Chunk ``j`` is the
    node's data in the stripe where it sits at position ``j``. Chunks of one
    stripe may differ in length: shorter ones count as zero-padded, and the
    parity is as long as the longest.

Everything here is pure: tested without a cluster.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from snapstore.errors import ConfigError
from snapstore.format.record import ALIGN, ParityEntry, RankEntry, StepRecord, piece_bounds

__all__ = [
    "Extent",
    "StripeMember",
    "chunk_extents",
    "chunk_length",
    "data_stripe",
    "form_groups",
    "parity_roles",
    "plan_parity",
    "regroup",
    "stripe_members",
]


@dataclass(frozen=True)
class Extent:
    """``length`` bytes at ``offset`` of rank ``rank``'s buffer, placed at ``chunk_offset``."""

    rank: int
    offset: int
    length: int
    chunk_offset: int


@dataclass(frozen=True)
class StripeMember:
    """Position ``index`` (RS index: < k data, >= k parity) of a stripe, held by ``node``."""

    index: int
    node: str


# -- groups ---------------------------------------------------------------------


def form_groups(nodes: Sequence[str], k: int, m: int) -> list[tuple[str, ...]]:
    """Split ``nodes`` (in the given order) into as many groups of >= k + m as possible.

    More groups tolerate more losses in all (m per group); sizes differ by at
    most one. Raises ConfigError when there are fewer than k + m nodes.
    """
    width = k + m
    n = len(nodes)
    if n < width:
        raise ConfigError(
            f"k + m = {k} + {m} = {width} needs at least {width} store nodes, found {n}; "
            f"start more nodes (snapstore up --nodes {width}) or lower k or m"
        )
    count = n // width
    base, extra = divmod(n, count)
    out: list[tuple[str, ...]] = []
    at = 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        out.append(tuple(nodes[at : at + size]))
        at += size
    return out


def regroup(
    groups: Sequence[Sequence[str]], alive: Iterable[str], k: int, m: int
) -> list[tuple[str, ...]]:
    """Groups for the alive nodes, changing as few groups as possible.

    Groups whose members are all alive stay as they are. Lost members are
    dropped; new nodes (alive but in no group) first refill groups that fell
    below k + m, then join the smallest groups. A group still short of
    k + m merges with the smallest other group. A group reaching 2(k + m)
    members splits in two. Raises ConfigError if fewer than k + m nodes live.
    """
    width = k + m
    alive_list = list(dict.fromkeys(alive))
    alive_set = set(alive_list)
    if len(alive_list) < width:
        raise ConfigError(
            f"only {len(alive_list)} store nodes alive; k + m = {width} are needed to "
            "protect a step: add nodes (snapstore.ops.faults.add_node or join Ray nodes)"
        )
    kept = [[n for n in g if n in alive_set] for g in groups]
    kept = [g for g in kept if g]
    if not kept:
        return form_groups(alive_list, k, m)
    placed = {n for g in kept for n in g}
    fresh = [n for n in alive_list if n not in placed]
    # Refill short groups from fresh nodes, smallest first.
    for g in sorted(kept, key=len):
        while len(g) < width and fresh:
            g.append(fresh.pop(0))
    # Merge groups that are still short into the smallest other group.
    while True:
        short = [g for g in kept if len(g) < width]
        if not short or len(kept) == 1:
            break
        g = short[0]
        kept.remove(g)
        target = min(kept, key=len)
        target.extend(g)
    # Fresh nodes left: join the smallest groups.
    for n in fresh:
        min(kept, key=len).append(n)
    # Split groups that grew to two full widths.
    out: list[tuple[str, ...]] = []
    for g in kept:
        while len(g) >= 2 * width:
            out.append(tuple(g[:width]))
            g = g[width:]
        out.append(tuple(g))
    if any(len(g) < width for g in out):
        # Only possible with a single group of fewer than width nodes, which
        # the alive count check above excludes; keep the invariant explicit.
        raise ConfigError(f"cannot form groups of {width} from {len(alive_list)} nodes")
    return out


# -- stripes --------------------------------------------------------------------


def stripe_members(group: Sequence[str], stripe: int, k: int, m: int) -> list[StripeMember]:
    """The k + m members of ``stripe`` in ``group``, in RS index order."""
    n = len(group)
    return [StripeMember(p, group[(stripe + p) % n]) for p in range(k + m)]


def data_stripe(group: Sequence[str], node: str, chunk: int) -> int:
    """The stripe in which ``node``'s chunk ``chunk`` is the data at position ``chunk``."""
    q = group.index(node)
    return (q - chunk) % len(group)


def parity_roles(group: Sequence[str], node: str, k: int, m: int) -> list[tuple[int, int]]:
    """(stripe, RS index) of each of the m parity chunks ``node`` holds in ``group``."""
    q = group.index(node)
    n = len(group)
    return [((q - p) % n, p) for p in range(k, k + m)]


def chunk_extents(ranks: Mapping[int, RankEntry], node: str, chunk: int, k: int) -> list[Extent]:
    """Pieces of chunk ``chunk`` of ``node``: piece ``chunk`` of each rank on it, in rank order."""
    out: list[Extent] = []
    at = 0
    for r in sorted(r for r, e in ranks.items() if e.node == node):
        off, ln = piece_bounds(ranks[r].size, k, chunk)
        if ln > 0:
            out.append(Extent(r, off, ln, at))
            at += ln
    return out


def chunk_length(ranks: Mapping[int, RankEntry], node: str, chunk: int, k: int) -> int:
    return sum(e.length for e in chunk_extents(ranks, node, chunk, k))


def plan_parity(
    ranks: Mapping[int, RankEntry],
    groups: Sequence[Sequence[str]],
    k: int,
    m: int,
) -> list[ParityEntry]:
    """Parity chunks for a step: one per (stripe, parity index) with non-empty data.

    Offsets are positions in the holder's parity file, 64-byte aligned, in
    (group, stripe, index) order. Checksums are left 0 until computed.
    """
    homes = {e.node for e in ranks.values()}
    out: list[ParityEntry] = []
    next_offset: dict[str, int] = {}
    for gi, group in enumerate(groups):
        if not homes & set(group):
            continue
        for s in range(len(group)):
            members = stripe_members(group, s, k, m)
            length = max(chunk_length(ranks, mb.node, mb.index, k) for mb in members[:k])
            if length == 0:
                continue
            for mb in members[k:]:
                off = next_offset.get(mb.node, 0)
                out.append(ParityEntry(gi, s, mb.index, mb.node, off, length, 0))
                next_offset[mb.node] = off + -(-length // ALIGN) * ALIGN
    return out


def check_homes_grouped(record: StepRecord) -> None:
    """Every rank's home must be a member of some group of the record."""
    grouped = {n for g in record.groups for n in g}
    for r, e in record.ranks.items():
        if e.node not in grouped:
            raise ConfigError(f"rank {r} is homed on node {e.node[:12]}, which is in no group")
