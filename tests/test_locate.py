"""Which store node a client stands for (snapstore.clients.locate), without a cluster."""

from __future__ import annotations

import pytest

from snapstore.clients.locate import choose_node, local_store_nodes, resolve_node
from snapstore.errors import SnapstoreError

A, B, C, D = ("a1" + "0" * 54, "b2" + "0" * 54, "b3" + "0" * 54, "d4" + "0" * 54)
NODES = [
    {"node_id": A, "alive": True},
    {"node_id": B, "alive": True},
    {"node_id": C, "alive": False},
    {"node_id": D, "alive": True},
]
HEAD = "ff" + "0" * 54  # the embedded cluster's head: no SMP


def _choose(
    rank: int = 0,
    explicit: str | None = None,
    env: str | None = None,
    own: str = HEAD,
    local: tuple[str, ...] = (A, B, D),
    smps: tuple[str, ...] = (A, B, D),
) -> str:
    return choose_node(
        rank, explicit, env, own, smps.__contains__, lambda: NODES, local.__contains__
    )


def test_explicit_node_wins_over_the_environment_and_the_own_node() -> None:
    assert _choose(explicit=D, env=A, own=B) == D
    assert _choose(explicit="d4", env=A, own=B) == D  # a unique prefix


def test_environment_wins_over_the_own_node() -> None:
    assert _choose(env="a1", own=B) == A
    assert _choose(env=B, own=A) == B


def test_own_node_with_an_smp_is_used() -> None:
    assert _choose(own=B) == B


def test_a_process_on_a_node_without_smp_takes_a_store_node_of_its_host_by_rank() -> None:
    # Alive, local store nodes sorted by id: A, B, D (C is dead).
    assert [_choose(rank=r) for r in range(5)] == [A, B, D, A, B]
    # Only the nodes whose shared memory is on this host count.
    assert [_choose(rank=r, local=(D, B)) for r in range(3)] == [B, D, B]


def test_no_store_node_on_this_host_is_an_error_that_says_what_to_do() -> None:
    with pytest.raises(SnapstoreError, match=r"no store node on this host.*SNAPSTORE_NODE"):
        _choose(local=())


def test_prefixes_must_name_one_node() -> None:
    both_alive = [NODES[1], {"node_id": C, "alive": True}]
    with pytest.raises(SnapstoreError, match=r"matches 2 store nodes"):
        resolve_node("b", both_alive, "$SNAPSTORE_NODE")
    with pytest.raises(SnapstoreError, match=r"\$SNAPSTORE_NODE = 'zz' names no store node"):
        resolve_node("zz", NODES, "$SNAPSTORE_NODE")
    with pytest.raises(SnapstoreError, match="is empty"):
        resolve_node("  ", NODES, "node_id")
    # A prefix matching one alive and one dead node means the alive one.
    assert resolve_node("b", NODES, "node_id") == B
    assert resolve_node("b", [NODES[0], NODES[2]], "node_id") == C  # the only match
    assert resolve_node(C, NODES, "node_id") == C  # a full id, alive or not


def test_local_store_nodes_are_alive_local_and_sorted() -> None:
    assert local_store_nodes(NODES, lambda n: n != A) == [B, D]
