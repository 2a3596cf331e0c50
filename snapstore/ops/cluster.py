"""The embedded cluster: a Ray head and N worker raylets on this machine, all on loopback.

Processes are started through Ray's own node launcher (what ``ray start`` and
``ray.cluster_utils.Cluster`` use) without fate sharing, so they outlive the
``snapstore up`` command, like ``ray start``. Every process id is recorded in
the store's state file: ``down`` and the fault injector stop exactly those
processes (and their children: the raylet's workers), never anything else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import Any

import psutil

from snapstore.control.handle import EmbeddedNode
from snapstore.errors import ClusterError

__all__ = ["kill_tree", "start_head", "start_worker", "wait_node_alive"]

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
STORE_NODE_RESOURCE = "snapstore_node"
"""A custom resource on every embedded worker raylet: ask for a little of it
(e.g. ``{"snapstore_node": 0.01}``) to place trainers on store nodes."""


def _params(temp_dir: str, cpus: int, object_store: int, **extra: Any) -> Any:
    from ray._private.parameter import RayParams

    params = RayParams(
        node_ip_address=LOOPBACK,
        num_cpus=cpus,
        num_gpus=0,
        object_store_memory=object_store,
        min_worker_port=0,
        max_worker_port=0,
        include_dashboard=False,
        temp_dir=temp_dir,
        **extra,
    )
    return params


def _pids(node: Any) -> list[int]:
    out = []
    for infos in node.all_processes.values():
        for info in infos:
            if info.process is not None:
                out.append(int(info.process.pid))
    return out


def _stop_half_started(temp_dir: str) -> None:
    """A node that failed to start may have started some of its processes (the GCS, the
    dashboard, log and autoscaler monitors): stop each process of this user whose
    command line names ``temp_dir`` (a fresh private directory), by its pid."""
    me = os.getuid()
    pids = []
    for p in psutil.process_iter(["pid", "uids", "cmdline"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if p.info["uids"].real == me and any(temp_dir in a for a in p.info["cmdline"] or ()):
                pids.append(int(p.info["pid"]))
    if pids:
        logger.warning("stopping %d processes of a node that failed to start", len(pids))
        kill_tree(pids)


def start_head(
    temp_dir: str, object_store: int, cpus: int = 1, control: bool = True
) -> tuple[str, EmbeddedNode]:
    """Start a head node on loopback; return its GCS address and the node.

    ``control``: mark it as snapstore's control node (the coordinator's,
    with no SMP), as the embedded cluster does.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray._private.node import Node

    from snapstore.control.coordinator import CONTROL_RESOURCE

    try:
        node = Node(
            _params(
                temp_dir, cpus, object_store, resources={CONTROL_RESOURCE: 1.0} if control else {}
            ),
            head=True,
            shutdown_at_exit=False,
            spawn_reaper=False,
        )
    except Exception as e:
        _stop_half_started(temp_dir)
        raise ClusterError(f"cannot start the Ray head on {LOOPBACK}: {e}") from e
    return str(node.gcs_address), EmbeddedNode(str(node.node_id), _pids(node), head=True)


def start_worker(gcs_address: str, temp_dir: str, object_store: int, cpus: int) -> EmbeddedNode:
    """Start one more raylet on loopback and join it to the head at ``gcs_address``."""
    from ray._private.node import Node

    params = _params(
        temp_dir,
        cpus,
        object_store,
        gcs_address=gcs_address,
        include_log_monitor=False,
        node_manager_port=0,
        resources={STORE_NODE_RESOURCE: 1000.0},
    )
    # Each raylet of one machine needs its own agent port; let Ray choose.
    params.dashboard_agent_listen_port = None
    try:
        node = Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
    except Exception as e:
        # Ray gives a raylet 30 s to register; a heavily loaded machine can miss it.
        raise ClusterError(
            f"cannot start a Ray worker node on {LOOPBACK}: {e} (is the machine overloaded?)"
        ) from e
    return EmbeddedNode(str(node.node_id), _pids(node))


def kill_tree(pids: list[int], sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
    """Send ``sig`` to each pid and all its descendants; wait for them to exit.

    Returns how many processes were signalled. Children are collected before
    the parent dies (afterwards they would be re-parented and lost from view).
    """
    procs: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p = psutil.Process(pid)
            procs.extend(p.children(recursive=True))
            procs.append(p)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p.send_signal(sig)
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p.kill()
    return len(procs)


def wait_node_alive(node_id: str, timeout: float = 60.0) -> None:
    """Wait until Ray's GCS lists ``node_id`` as alive (the driver must be connected)."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
            return
        time.sleep(0.1)
    raise ClusterError(f"node {node_id[:12]} did not join within {timeout} s")
