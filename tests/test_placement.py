"""Placement without a cluster: stripe groups, rotating stripes, chunks and the parity plan.

The redundancy promise (any m nodes of a group may be lost at once) is a
property of this arithmetic alone, so it is checked here exhaustively or with
hypothesis over every group size the grouping rule can produce.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from snapstore.control.placement import (
    chunk_extents,
    chunk_length,
    data_stripe,
    form_groups,
    parity_roles,
    plan_parity,
    regroup,
    stripe_members,
)
from snapstore.errors import ConfigError
from snapstore.format.record import ALIGN, RankEntry, piece_bounds


def _names(n: int, prefix: str = "n") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


@st.composite
def _km_and_group_size(draw: st.DrawFn) -> tuple[int, int, int]:
    k = draw(st.integers(1, 5))
    m = draw(st.integers(1, 3))
    n = draw(st.integers(k + m, 2 * (k + m) - 1))
    return k, m, n


# -- form_groups ----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(k=st.integers(1, 6), m=st.integers(1, 3), extra=st.integers(0, 60))
def test_form_groups_partitions_nodes_into_balanced_groups(k: int, m: int, extra: int) -> None:
    width = k + m
    nodes = _names(width + extra)
    groups = form_groups(nodes, k, m)
    # Every node in exactly one group, and the given order is kept.
    assert [n for g in groups for n in g] == nodes
    sizes = [len(g) for g in groups]
    assert all(width <= s <= 2 * width - 1 for s in sizes), sizes
    assert max(sizes) - min(sizes) <= 1
    # As many groups as fit: more groups tolerate more losses in all.
    assert len(groups) == len(nodes) // width


@pytest.mark.parametrize(("k", "m", "n"), [(3, 1, 3), (2, 2, 0), (4, 2, 5)])
def test_form_groups_below_k_plus_m_says_what_to_do(k: int, m: int, n: int) -> None:
    with pytest.raises(ConfigError) as info:
        form_groups(_names(n), k, m)
    msg = str(info.value)
    assert f"at least {k + m}" in msg and f"found {n}" in msg
    assert "snapstore up --nodes" in msg and "lower k or m" in msg


# -- regroup --------------------------------------------------------------------


def test_regroup_keeps_intact_groups_exactly() -> None:
    groups = form_groups(_names(9), 3, 1)  # sizes 5 and 4
    assert regroup(groups, _names(9), 3, 1) == groups
    # Losing a node of the 5-group leaves both groups at >= k + m: nothing moves.
    alive = [n for n in _names(9) if n != "n2"]
    assert regroup(groups, alive, 3, 1) == [("n0", "n1", "n3", "n4"), groups[1]]


def test_regroup_refills_a_short_group_from_fresh_nodes_only() -> None:
    a, b = tuple(_names(4, "a")), tuple(_names(4, "b"))
    alive = [*a, *b, "f0"]
    alive.remove("a1")
    assert regroup([a, b], alive, 3, 1) == [("a0", "a2", "a3", "f0"), b]


def test_regroup_merges_a_group_left_short() -> None:
    a, b = tuple(_names(4, "a")), tuple(_names(4, "b"))
    alive = [n for n in (*a, *b) if n != "a1"]
    out = regroup([a, b], alive, 3, 1)
    assert out == [(*b, "a0", "a2", "a3")]


def test_regroup_splits_a_group_that_reaches_two_widths() -> None:
    a = tuple(_names(4, "a"))
    fresh = _names(4, "f")
    assert regroup([a], [*a, *fresh], 3, 1) == [a, tuple(fresh)]


def test_regroup_places_fresh_nodes_in_the_smallest_groups() -> None:
    a, b = tuple(_names(5, "a")), tuple(_names(4, "b"))
    out = regroup([a, b], [*a, *b, "f0"], 3, 1)
    assert out == [a, (*b, "f0")]


def test_regroup_below_k_plus_m_alive_says_what_to_do() -> None:
    groups = form_groups(_names(5), 3, 1)
    with pytest.raises(ConfigError) as info:
        regroup(groups, ["n0", "n1", "n2"], 3, 1)
    msg = str(info.value)
    assert "only 3 store nodes alive" in msg and "add nodes" in msg


@settings(max_examples=300, deadline=None)
@given(
    k=st.integers(1, 4),
    m=st.integers(1, 3),
    start=st.integers(0, 30),
    data=st.data(),
)
def test_regroup_partitions_the_alive_nodes_into_valid_groups(
    k: int, m: int, start: int, data: st.DataObject
) -> None:
    width = k + m
    nodes = _names(width + start)
    groups = form_groups(nodes, k, m)
    lost = data.draw(st.sets(st.sampled_from(nodes), max_size=len(nodes)), label="lost")
    fresh = _names(data.draw(st.integers(0, 2 * width), label="fresh"), "f")
    alive = [n for n in nodes if n not in lost] + fresh
    if len(alive) < width:
        with pytest.raises(ConfigError):
            regroup(groups, alive, k, m)
        return
    out = regroup(groups, alive, k, m)
    placed = [n for g in out for n in g]
    assert sorted(placed) == sorted(alive)  # each alive node exactly once, no lost node
    assert all(width <= len(g) <= 2 * width - 1 for g in out), [len(g) for g in out]
    still_full = all(len([n for n in g if n not in lost]) >= width for g in groups)
    if not fresh and still_full:
        # Nothing to refill, merge or split: every group is itself minus the lost.
        assert out == [tuple(n for n in g if n not in lost) for g in groups]


# -- stripes ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(_km_and_group_size())
def test_every_node_holds_k_data_and_m_parity_chunks(knm: tuple[int, int, int]) -> None:
    k, m, n = knm
    group = _names(n)
    data_roles: Counter[str] = Counter()
    parity_count: Counter[str] = Counter()
    for s in range(n):
        members = stripe_members(group, s, k, m)
        assert [mb.index for mb in members] == list(range(k + m))
        assert len({mb.node for mb in members}) == k + m, "a stripe reuses a node"
        for mb in members[:k]:
            data_roles[mb.node] += 1
            # The stripe in which this node's chunk mb.index is data is this one.
            assert data_stripe(group, mb.node, mb.index) == s
        for mb in members[k:]:
            parity_count[mb.node] += 1
            assert (s, mb.index) in parity_roles(group, mb.node, k, m)
    assert data_roles == dict.fromkeys(group, k)
    assert parity_count == dict.fromkeys(group, m)
    for node in group:
        roles = parity_roles(group, node, k, m)
        assert len(roles) == m
        for s, index in roles:
            assert stripe_members(group, s, k, m)[index].node == node


@settings(max_examples=60, deadline=None)
@given(_km_and_group_size())
def test_any_m_lost_nodes_leave_every_stripe_k_members(knm: tuple[int, int, int]) -> None:
    k, m, n = knm
    assume(sum(1 for _ in itertools.combinations(range(n), m)) <= 3000)
    group = _names(n)
    stripes = [{mb.node for mb in stripe_members(group, s, k, m)} for s in range(n)]
    for size in range(1, m + 1):
        for lost in itertools.combinations(group, size):
            for members in stripes:
                assert len(members - set(lost)) >= k, (lost, members)


def test_m_plus_one_adjacent_losses_break_a_stripe() -> None:
    # The bound is tight: m + 1 neighbours share the stripe that ends on them.
    k, m = 3, 2
    group = _names(7)
    lost = set(group[:3])
    assert any(len({mb.node for mb in stripe_members(group, s, k, m)} - lost) < k for s in range(7))


# -- chunks ---------------------------------------------------------------------


def test_chunk_is_piece_j_of_each_rank_on_the_node_in_rank_order() -> None:
    k = 3
    ranks = {
        5: RankEntry("a", 1000, (0,) * k),
        1: RankEntry("a", 130, (0,) * k),
        2: RankEntry("b", 4096, (0,) * k),
        7: RankEntry("a", 1, (0,) * k),
    }
    for j in range(k):
        extents = chunk_extents(ranks, "a", j, k)
        want = [(r, *piece_bounds(ranks[r].size, k, j)) for r in (1, 5, 7)]
        want = [w for w in want if w[2] > 0]
        assert [(e.rank, e.offset, e.length) for e in extents] == want
        at = 0
        for e in extents:
            assert e.chunk_offset == at
            at += e.length
        assert chunk_length(ranks, "a", j, k) == at
    # 130 bytes cut in 64-aligned pieces: 64, 64, 2; 1000 bytes: 384, 384, 232;
    # one byte: only piece 0.
    assert [(e.rank, e.length) for e in chunk_extents(ranks, "a", 2, k)] == [(1, 2), (5, 232)]
    assert [e.rank for e in chunk_extents(ranks, "a", 0, k)] == [1, 5, 7]
    assert chunk_extents(ranks, "nobody", 0, k) == []
    assert chunk_length(ranks, "nobody", 1, k) == 0


# -- plan_parity ----------------------------------------------------------------


@st.composite
def _layout(draw: st.DrawFn) -> tuple[int, int, list[tuple[str, ...]], dict[int, RankEntry]]:
    k = draw(st.integers(1, 4))
    m = draw(st.integers(1, 3))
    nodes = _names(draw(st.integers(k + m, 3 * (k + m))))
    groups = form_groups(nodes, k, m)
    world = draw(st.integers(0, 10))
    ranks = {
        r: RankEntry(
            draw(st.sampled_from(nodes)),
            draw(st.one_of(st.integers(0, 300), st.integers(0, 5000))),
            (0,) * k,
        )
        for r in range(world)
    }
    return k, m, groups, ranks


@settings(max_examples=300, deadline=None)
@given(_layout())
def test_plan_parity_covers_every_stripe_with_data_without_overlap(
    layout: tuple[int, int, list[tuple[str, ...]], dict[int, RankEntry]],
) -> None:
    k, m, groups, ranks = layout
    plan = plan_parity(ranks, groups, k, m)
    by_stripe: dict[tuple[int, int], list[int]] = {}
    for p in plan:
        members = stripe_members(groups[p.group], p.stripe, k, m)
        assert k <= p.index < k + m
        assert members[p.index].node == p.node, "parity held by the wrong member"
        want = max(chunk_length(ranks, mb.node, mb.index, k) for mb in members[:k])
        assert p.length == want > 0
        assert p.offset % ALIGN == 0
        assert p.sum == 0
        by_stripe.setdefault((p.group, p.stripe), []).append(p.index)
    for gi, group in enumerate(groups):
        for s in range(len(group)):
            members = stripe_members(group, s, k, m)
            has_data = any(chunk_length(ranks, mb.node, mb.index, k) for mb in members[:k])
            assert by_stripe.get((gi, s), []) == (list(range(k, k + m)) if has_data else [])
    # (group, stripe, index) order, and no two chunks of one holder overlap.
    assert [(p.group, p.stripe, p.index) for p in plan] == sorted(
        (p.group, p.stripe, p.index) for p in plan
    )
    for holder in {p.node for p in plan}:
        spans = sorted((p.offset, p.offset + p.length) for p in plan if p.node == holder)
        assert all(b <= a2 for (_, b), (a2, _) in itertools.pairwise(spans)), spans


def test_plan_parity_skips_groups_and_stripes_without_data() -> None:
    k, m = 2, 1
    groups = form_groups(_names(6), k, m)  # two groups of three
    ranks = {0: RankEntry("n0", 10, (0, 0))}  # 10 bytes: one 10-byte piece 0
    plan = plan_parity(ranks, groups, k, m)
    assert len(plan) == 1
    (p,) = plan
    # n0 is position 0 of group 0; its chunk 0 is data in stripe 0, parity on n2.
    assert (p.group, p.stripe, p.index, p.node, p.offset, p.length) == (0, 0, 2, "n2", 0, 10)
    assert plan_parity({}, groups, k, m) == []
