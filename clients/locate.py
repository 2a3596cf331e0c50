"""Which store node a process stands for: the node whose SMP its client stages into.

A client stages into shared memory that an SMP owns, so it needs an SMP on
its own host. Which one, in this order (an argument over the environment,
the environment over what is found):

1. ``Client(..., node_id=...)``: a store node's id, or a prefix of one that
   names a single store node (``snapstore status`` shows 12 characters).
2. ``$SNAPSTORE_NODE``: the same, for a process that cannot pass arguments
   through its launcher (one torchrun agent per store node, simulating
   hosts on one machine, exports it to its workers).
3. The Ray node this process runs on, when it has an SMP (a Ray Train
   worker, an actor placed on a store node).
4. Otherwise a store node on the same host: the alive store nodes whose
   segment directory is in this machine's shared memory, sorted by node id,
   and of them the one at position ``rank % count``. This is a plain script
   on a machine whose Ray node has no SMP: the embedded cluster's head node
   (where ``python train.py`` lands after ``snapstore up``), or a driver
   attached to a Ray node the store does not use. The choice is the same in
   every process of the host, so ranks spread over the host's SMPs.

Nothing here is the control plane's: the coordinator is asked only for the
list of store nodes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from snapstore.control.handle import Store
from snapstore.errors import SnapstoreError
from snapstore.node.store import node_dir, smp_name

__all__ = [
    "NODE_ENV",
    "choose_node",
    "find_smp",
    "local_store_nodes",
    "ray_node_alive",
    "resolve_node",
    "segment_dir_exists",
    "smp_handle",
]

NODE_ENV = "SNAPSTORE_NODE"
"""Environment variable naming the store node a process stands for (an id or a unique prefix)."""


def resolve_node(text: str, nodes: Sequence[dict[str, Any]], origin: str) -> str:
    """The store node ``text`` names: a full id, or a prefix that matches one node only.

    ``nodes`` are the coordinator's node list (``node_id``, ``alive``);
    ``origin`` says where ``text`` came from, for the error message.
    """
    text = text.strip()
    if not text:
        raise SnapstoreError(f"{origin} is empty: give a store node's id (see `snapstore status`)")
    ids = [str(n["node_id"]) for n in nodes]
    if text in ids:
        return text
    matches = [i for i in ids if i.startswith(text)]
    alive = [i for i in matches if any(n["node_id"] == i and n["alive"] for n in nodes)]
    if len(matches) == 1:
        return matches[0]
    if len(alive) == 1:
        return alive[0]
    if not matches:
        known = ", ".join(i[:12] for i in ids) or "none"
        raise SnapstoreError(
            f"{origin} = {text!r} names no store node (the store's nodes: {known}; "
            "see `snapstore status`)"
        )
    raise SnapstoreError(
        f"{origin} = {text!r} matches {len(matches)} store nodes "
        f"({', '.join(i[:12] for i in matches)}): give more of the id"
    )


def local_store_nodes(
    nodes: Sequence[dict[str, Any]], is_local: Callable[[str], bool]
) -> list[str]:
    """Alive store nodes whose shared memory this host can map, sorted by node id."""
    return sorted(str(n["node_id"]) for n in nodes if n["alive"] and is_local(str(n["node_id"])))


def choose_node(
    rank: int,
    explicit: str | None,
    env: str | None,
    own: str,
    has_smp: Callable[[str], bool],
    nodes: Callable[[], Sequence[dict[str, Any]]],
    is_local: Callable[[str], bool],
) -> str:
    """The store node a client of ``rank`` stages into (see the module docstring).

    ``own`` is this process's Ray node; ``has_smp(node)`` says whether a node
    has an SMP; ``nodes`` fetches the coordinator's node list (called only
    when needed); ``is_local(node)`` says whether the node's segment
    directory is in this host's shared memory.
    """
    for text, origin in ((explicit, "node_id"), (env, f"${NODE_ENV}")):
        if text:
            return text if has_smp(text) else resolve_node(text, nodes(), origin)
    if has_smp(own):
        return own
    listed = nodes()
    here = local_store_nodes(listed, is_local)
    if not here:
        raise SnapstoreError(
            f"no store node on this host: this process's Ray node {own[:12]} has no SMP and "
            f"none of the store's {len(listed)} nodes keeps its shared memory on this machine. "
            f"Run it on a store node, or set ${NODE_ENV} (or node_id=) to a store node's id"
        )
    return here[rank % len(here)]


def smp_handle(node: str, namespace: str) -> Any:
    """The Ray actor handle of ``node``'s SMP, or None when it has none."""
    import ray

    try:
        return ray.get_actor(smp_name(node), namespace=namespace)
    except ValueError:
        return None


def segment_dir_exists(shm_dir: str, store_id: str, node: str) -> bool:
    """Whether ``node``'s SMP keeps its segments in this machine's shared memory."""
    return os.path.isdir(node_dir(shm_dir, store_id, node))


def find_smp(store: Store, rank: int, node_id: str | None) -> tuple[str, Any]:
    """The store node a client of ``rank`` stands for, and its SMP's handle."""
    import ray

    handles: dict[str, Any] = {}

    def has_smp(node: str) -> bool:
        handles[node] = handles.get(node) or smp_handle(node, store.namespace)
        return handles[node] is not None

    shm, store_id = str(store.state["shm_dir"]), store.store_id
    node = choose_node(
        rank,
        node_id,
        os.environ.get(NODE_ENV),
        ray.get_runtime_context().get_node_id(),
        has_smp,
        store.nodes,
        lambda n: segment_dir_exists(shm, store_id, n),
    )
    if not has_smp(node):
        raise SnapstoreError(
            f"store node {node[:12]} has no SMP (is it alive? `snapstore status` lists the "
            f"store's nodes; node_id= or ${NODE_ENV} chooses one)"
        )
    return node, handles[node]


def ray_node_alive(node: str) -> bool:
    """Whether Ray still lists ``node`` (a Ray node id) as alive. An SMP pinned to a node
    Ray reports dead will not come back; on a live node Ray restarts it (even after the
    store declared the node lost, which takes only ``reprotect_delay``)."""
    import ray

    return any(n.get("NodeID") == node and n.get("Alive") for n in ray.nodes())
