"""The embedded cluster: a Ray head and N worker raylets on this machine, all on loopback.

Processes are started through Ray's own node launcher (what ``ray start`` and
``ray.cluster_utils.Cluster`` use) without fate sharing, so they outlive the
``snapstore up`` command, like ``ray start``. Every process is recorded in
the store's state file as a :class:`~snapstore.control.handle.ProcessRef`
(pid, start time, executable): ``down`` and the fault injector stop exactly
those processes (and their children: the raylet's workers), and only while
the pid still names the process recorded, never anything else.

Every node starts with Ray's token authentication (``ray_token_file``, see
:func:`snapstore.control.handle.use_ray_token`), and Ray's temporary
directory, which Ray makes world-writable, is narrowed back to 0700.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import time
from collections.abc import Sequence
from typing import Any

import psutil

from snapstore.control.handle import EmbeddedNode, ProcessRef, use_ray_token
from snapstore.errors import ClusterError
from snapstore.private import DIR_MODE

__all__ = ["kill_tree", "start_head", "start_worker", "wait_node_alive"]

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
STORE_NODE_RESOURCE = "snapstore_node"
"""A custom resource on every embedded worker raylet: ask for a little of it
(e.g. ``{"snapstore_node": 0.01}``) to place trainers on store nodes."""


IDLE_SYSTEM_CONFIG: dict[str, Any] = {
    "raylet_check_gc_period_milliseconds": 1000,
    "kill_idle_workers_interval_ms": 1000,
    "memory_monitor_refresh_ms": 1000,
    "raylet_report_resources_period_milliseconds": 500,
    "task_events_report_interval_ms": 0,
    "event_stats": False,
    "metrics_report_interval_ms": 60000,
}
"""Ray's periodic work, slowed where snapstore does not need it fast: an idle raylet
wakes every 100-250 ms for each of these by default (GC checks for object-store
pressure snapstore does not create, idle-worker reaping, the memory monitor,
resource reports). And turned off where snapstore does not use it: task events (every
actor call of every beat recorded by the worker and sent to the GCS each second, for
Ray's state API and dashboard), event-loop statistics; Ray's own metrics go to its
agent every 60 s instead of 10. bench.idle, 4 nodes, against the same tree without the
last three: the store's idle CPU (coordinator, SMPs, raylets, GCS, REST) 99 against 127
ms/s. Death detection (health checks) is left alone. Set on the head node; Ray hands it
to every raylet and worker that joins."""


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


def _procs(node: Any) -> list[ProcessRef]:
    out = []
    for infos in node.all_processes.values():
        for info in infos:
            if info.process is not None:
                ref = ProcessRef.identify(int(info.process.pid))
                if ref is not None:
                    out.append(ref)
    return out


def _prepare(temp_dir: str, ray_token_file: str | None) -> None:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    with contextlib.suppress(FileExistsError):
        os.mkdir(temp_dir, DIR_MODE)
    st = os.lstat(temp_dir)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise ClusterError(
            f"Ray temporary directory {temp_dir} is a symlink, a file or another user's"
        )
    _narrow(temp_dir)
    use_ray_token(ray_token_file)


def _narrow(temp_dir: str) -> None:
    # Ray chmods its temporary directory 0777 ("so others can use it") whenever a
    # node or driver starts; it sits in the private runtime directory, still.
    os.chmod(temp_dir, DIR_MODE)


def _stop_half_started(temp_dir: str) -> None:
    """A node that failed to start may have started some of its processes (the GCS, the
    dashboard, log and autoscaler monitors): stop each process of this user whose
    command line names ``temp_dir`` (a fresh private directory), by its pid."""
    me = os.getuid()
    refs = []
    for p in psutil.process_iter(["pid", "uids", "cmdline"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if p.info["uids"].real == me and any(temp_dir in a for a in p.info["cmdline"] or ()):
                ref = ProcessRef.identify(int(p.info["pid"]))
                if ref is not None:
                    refs.append(ref)
    if refs:
        logger.warning("stopping %d processes of a node that failed to start", len(refs))
        kill_tree(refs)


def start_head(
    temp_dir: str,
    object_store: int,
    cpus: int = 1,
    control: bool = True,
    *,
    ray_token_file: str | None,
) -> tuple[str, EmbeddedNode]:
    """Start a head node on loopback; return its GCS address and the node.

    ``control``: mark it as snapstore's control node (the coordinator's,
    with no SMP), as the embedded cluster does. ``ray_token_file``: the
    cluster's Ray token (None: a cluster without authentication, which
    only a test of that refusal should start).
    """
    _prepare(temp_dir, ray_token_file)
    from ray._private.node import Node

    from snapstore.control.coordinator import CONTROL_RESOURCE

    try:
        node = Node(
            _params(
                temp_dir,
                cpus,
                object_store,
                resources={CONTROL_RESOURCE: 1.0} if control else {},
                _system_config=dict(IDLE_SYSTEM_CONFIG),
            ),
            head=True,
            shutdown_at_exit=False,
            spawn_reaper=False,
        )
    except Exception as e:
        _stop_half_started(temp_dir)
        raise ClusterError(f"cannot start the Ray head on {LOOPBACK}: {e}") from e
    finally:
        _narrow(temp_dir)
    return str(node.gcs_address), EmbeddedNode(str(node.node_id), _procs(node), head=True)


def start_worker(
    gcs_address: str,
    temp_dir: str,
    object_store: int,
    cpus: int,
    *,
    ray_token_file: str | None,
) -> EmbeddedNode:
    """Start one more raylet on loopback and join it to the head at ``gcs_address``."""
    _prepare(temp_dir, ray_token_file)
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
    finally:
        _narrow(temp_dir)
    return EmbeddedNode(str(node.node_id), _procs(node))


def kill_tree(refs: Sequence[ProcessRef], sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
    """Send ``sig`` to each recorded process and all its descendants; wait for them to exit.

    A process is signalled only while its pid still names the process
    recorded (same start time, executable and boot, :meth:`ProcessRef.current`):
    a pid reused by an unrelated process after ours exited is left alone
    (and logged). Returns how many processes were signalled. Children are
    collected before the parent dies (afterwards they would be re-parented
    and lost from view).
    """
    procs: list[psutil.Process] = []
    for ref in refs:
        if not ref.current():
            if psutil.pid_exists(ref.pid):
                logger.warning(
                    "not signalling pid %d: it is no longer the process recorded (%s)",
                    ref.pid,
                    ref.exe or "unknown executable",
                )
            continue
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p = psutil.Process(ref.pid)
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
