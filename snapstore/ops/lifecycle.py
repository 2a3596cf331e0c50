"""Starting and stopping a store: ``up``, ``down``, adding embedded nodes.

What ``up`` starts is recorded in the store's state file (see
:mod:`snapstore.control.handle`, which also finds a running store for
clients, the CLI and ``down``).

Security (docs/operating.md, Security): ``up`` works in a private runtime
directory, starts an embedded cluster with Ray's token authentication (a
fresh token per store, in a 0600 file beside the state file), and refuses
to attach to a Ray cluster without token authentication unless told
``allow_unauthenticated_ray``. ``down`` signals only processes that are
still the ones recorded (:class:`~snapstore.control.handle.ProcessRef`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psutil

from snapstore.config import StoreConfig
from snapstore.control.handle import (
    STATE_VERSION,
    EmbeddedNode,
    ProcessRef,
    Store,
    connect,
    default_persist_dir,
    ensure_ray,
    forget_ray_token,
    nodes,
    private_runtime_dir,
    ray_token,
    ray_token_mode,
    runtime_dir,
    state_path,
)
from snapstore.errors import ClusterError, ConfigError
from snapstore.node.segments import shm_root
from snapstore.ops.cluster import kill_tree, start_head, start_worker, wait_node_alive
from snapstore.persist import is_url, prepare_root
from snapstore.private import create_private, read_private
from snapstore.rpc import call

__all__ = [
    "Store",
    "connect",
    "default_persist_dir",
    "down",
    "nodes",
    "runtime_dir",
    "state_path",
    "up",
]

logger = logging.getLogger(__name__)

READY_TIMEOUT = 180.0
AUTH_PROBE_TIMEOUT = 60.0
DEFAULT_REST_PORT = 8470
SERVER_START_TIMEOUT = 60.0


def up(
    nodes: int | None = None,
    k: int | None = None,
    m: int | None = None,
    memory_per_node: int | str | None = None,
    address: str | None = None,
    rundir: str | None = None,
    rest: bool = True,
    rest_host: str = "127.0.0.1",
    rest_port: int = DEFAULT_REST_PORT,
    rest_token: str | None = None,
    rest_allow_hosts: Sequence[str] = (),
    allow_unauthenticated_ray: bool = False,
    **settings: Any,
) -> Store:
    """Start a store and return a handle on it; the cluster keeps running after return.

    Without ``address``: start an embedded Ray cluster of a head and
    ``nodes`` worker raylets on this machine, all on 127.0.0.1, with one SMP
    per worker. With ``address`` ("auto" or HOST:PORT): attach to a running
    Ray cluster and put one SMP on every alive node; ``down`` will then
    remove snapstore's actors and leave that cluster running.

    With ``rest`` (the default) the REST monitoring server starts too, as
    its own process (``python -m snapstore.server``), bound to ``rest_host``
    (127.0.0.1 unless told otherwise; anything else requires a bearer token,
    ``rest_token`` or one generated and recorded in the state file).
    ``rest_port=0`` picks a free port. It answers only requests whose Host
    header is its address (or ``rest_allow_hosts``; see
    :func:`snapstore.server.auth.allowed_hosts`).

    An embedded cluster always runs with Ray's token authentication. An
    attached one must have it too (the environment of this process holds
    its token, as for ``ray.init``: ``RAY_AUTH_MODE=token`` and the token in
    ``~/.ray/auth_token``, ``$RAY_AUTH_TOKEN_PATH`` or ``$RAY_AUTH_TOKEN``);
    ``up`` copies that token beside the state file for the store's clients.
    Without it, ``up`` refuses, unless ``allow_unauthenticated_ray``: then
    it warns, and anyone who can reach the cluster's ports can drive the
    store and read its snapshots.
    """
    cfg = StoreConfig.resolve(nodes=nodes, k=k, m=m, memory_per_node=memory_per_node, **settings)
    rd = private_runtime_dir(rundir)
    persist_dir = cfg.persist_dir or default_persist_dir(rundir)
    if is_url(persist_dir):
        from snapstore.persist import objstore

        objstore.reach(persist_dir)
    else:
        persist_dir = os.path.abspath(persist_dir)
        try:
            prepare_root(persist_dir)
        except OSError as e:
            raise ConfigError(
                f"persist_dir {persist_dir}: cannot create it ({e.strerror}); choose another "
                "with --persist-dir"
            ) from None
    cfg = dataclasses.replace(cfg, persist_dir=persist_dir)
    path = state_path(rundir)
    if os.path.exists(path):
        raise ClusterError(
            f"a store is already recorded in {path}; stop it with `snapstore down` "
            "(or remove that file if its cluster is gone)"
        )
    if address is None and cfg.nodes < cfg.k + cfg.m:
        raise ConfigError(
            f"k + m = {cfg.k} + {cfg.m} = {cfg.k + cfg.m} needs at least that many nodes, "
            f"but --nodes is {cfg.nodes}"
        )
    store_id = secrets.token_hex(4)
    state: dict[str, Any] = {
        "version": STATE_VERSION,
        "store_id": store_id,
        "token": secrets.token_hex(16),
        "config": cfg.to_dict(),
        "embedded": address is None,
        "shm_dir": shm_root(),
        "created_at": time.time(),
        "nodes": [],
    }
    store = Store(path, state)
    token_file = os.path.join(rd, f"ray-{store_id}.token")
    try:
        if address is None:
            temp_dir = os.path.join(rd, f"ray-{store_id}")
            state["temp_dir"] = temp_dir
            create_private(token_file, secrets.token_hex(32).encode())
            state["ray_token_file"] = token_file
            gcs, head = start_head(temp_dir, cfg.object_store_memory, ray_token_file=token_file)
            state["address"] = gcs
            state["nodes"].append(head.to_dict())
            store.save_state()  # from here on, `down` can clean up
            for _ in range(cfg.nodes):
                node = start_worker(
                    gcs,
                    temp_dir,
                    cfg.object_store_memory,
                    cfg.cpus_per_node,
                    ray_token_file=token_file,
                )
                state["nodes"].append(node.to_dict())
                store.save_state()
            store.connect_ray()
            # Connecting made Ray's directory 0777 again (as every later driver will);
            # the 0700 runtime directory around it is what keeps others out.
            os.chmod(temp_dir, 0o700)
            expected = cfg.nodes
        else:
            ensure_ray(address, cfg.namespace)
            import ray

            state["address"] = ray.get_runtime_context().gcs_address
            if _attached_auth(address, allow_unauthenticated_ray):
                create_private(token_file, ray_token().encode())
                state["ray_token_file"] = token_file
            else:
                state["ray_auth"] = "none"
            from snapstore.control.coordinator import CONTROL_RESOURCE

            expected = sum(
                1
                for n in ray.nodes()
                if n["Alive"] and not n.get("Resources", {}).get(CONTROL_RESOURCE)
            )
            if expected < cfg.k + cfg.m:
                raise ConfigError(
                    f"the Ray cluster at {address} has {expected} nodes; k + m = "
                    f"{cfg.k + cfg.m} are needed"
                )
            store.save_state()
        _deploy_coordinator(store)
        ready = store.call("ready", expected, READY_TIMEOUT, timeout=READY_TIMEOUT + 10)
        if ready.get("timeout"):
            raise ClusterError(
                f"only {ready['nodes']} of {expected} SMPs reported within {READY_TIMEOUT} s"
            )
        state["ready_at"] = time.time()
        store.save_state()
        if rest:
            state["server"] = _start_server(
                store, rest_host, rest_port, rest_token, rest_allow_hosts
            )
            store.save_state()
    except BaseException:
        with contextlib.suppress(Exception):
            _teardown(store)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(token_file)
        raise
    return store


def _attached_auth(address: str, allow_unauthenticated: bool) -> bool:
    """Whether the attached cluster (this process is connected) has token authentication.

    This process connected with the token mode of its environment. Without
    a token, it connected, so the cluster lets anyone in. With one, the
    GCS accepted it, and every node is asked too (a task per node reports
    the mode its raylet runs in). Raises ClusterError on a cluster without
    authentication unless ``allow_unauthenticated``; then warns.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    open_nodes: list[str] = []
    if not ray_token_mode():
        open_nodes = ["the GCS (this process connected without a token)"]
    else:
        alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        probe = ray.remote(num_cpus=0, max_retries=0)(_node_auth_mode)
        refs = [
            probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)
            ).remote()
            for n in alive
        ]
        modes = call(refs, AUTH_PROBE_TIMEOUT, "the nodes' authentication mode")
        open_nodes = [f"node {n[:12]}" for n, tok in zip(alive, modes, strict=True) if not tok]
    if not open_nodes:
        return True
    what = (
        f"the Ray cluster at {address} runs without token authentication "
        f"({', '.join(open_nodes)}): anyone who can reach its ports can run code as its "
        "owner, drive the store and read every snapshot"
    )
    if not allow_unauthenticated:
        raise ClusterError(
            f"{what}. Start it with RAY_AUTH_MODE=token (docs/operating.md, Security), or "
            "attach anyway with --allow-unauthenticated-ray"
        )
    logger.warning("%s; attaching anyway, as asked (--allow-unauthenticated-ray)", what)
    return False


def _node_auth_mode() -> bool:
    """Run on a node: whether its raylet (whose environment workers inherit) uses tokens."""
    return ray_token_mode()


def _start_server(
    store: Store, host: str, port: int, token: str | None, allow_hosts: Sequence[str] = ()
) -> dict[str, Any]:
    """Start the REST server as its own process and wait until it answers.

    snapstore does not import the HTTP layer: it runs ``python -m snapstore.server``,
    which writes a small JSON "ready" file (its URL, and the token it uses)
    once it serves.
    """
    rd = os.path.dirname(store.path)
    ready = os.path.join(rd, f"server-{store.store_id}.ready")
    log_path = os.path.join(rd, f"server-{store.store_id}.log")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(ready)
    env = dict(os.environ)
    if token:
        env["SNAPSTORE_REST_TOKEN"] = token  # not on the command line, where ps shows it
    cmd = [
        sys.executable,
        "-m",
        "snapstore.server",
        "--runtime-dir",
        rd,
        "--host",
        host,
        "--port",
        str(port),
        "--ready-file",
        ready,
    ]
    for name in allow_hosts:
        cmd += ["--allow-host", name]
    log_fd = os.open(
        log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    with os.fdopen(log_fd, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
        )
    ref = ProcessRef.identify(proc.pid)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(
                f"the REST server exited with code {proc.returncode} before serving; "
                f"its log is {log_path}:\n{_tail(log_path)}"
            )
        try:
            info = json.loads(read_private(ready, 1 << 16))
        except (FileNotFoundError, ValueError):
            time.sleep(0.1)
            continue
        info["pid"] = proc.pid
        info["proc"] = ref.to_dict() if ref is not None else None
        info["log"] = log_path
        return dict(info)
    kill_tree([ref] if ref is not None else [], sig=15)
    raise ClusterError(
        f"the REST server did not start within {SERVER_START_TIMEOUT} s; see {log_path}"
    )


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _deploy_coordinator(store: Store) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from snapstore.control.coordinator import COORDINATOR_NAME, Coordinator

    # On the head node, which holds the cluster's control plane anyway: a
    # worker node may be lost (or, embedded, killed on purpose).
    head = next(
        (
            n["NodeID"]
            for n in ray.nodes()
            if n["Alive"] and "node:__internal_head__" in n["Resources"]
        ),
        ray.get_runtime_context().get_node_id(),
    )
    ray.remote(Coordinator).options(
        name=COORDINATOR_NAME,
        namespace=store.namespace,
        lifetime="detached",
        max_restarts=-1,
        max_concurrency=1000,
        num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False),
    ).remote(store.store_id, store.state["config"], store.state["token"], store.state["shm_dir"])


def down(rundir: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """Stop what ``up`` started and remove the shared memory it created.

    Returns ``actors`` and ``processes`` stopped, and ``not_ours``: pids the
    state file lists that now name other processes (left alone).
    """
    store = connect(rundir)
    return _teardown(store, timeout)


def _stop(refs: list[ProcessRef], report: dict[str, Any], sig: int = 9) -> None:
    report["not_ours"] += [r.pid for r in refs if not r.current() and psutil.pid_exists(r.pid)]
    report["processes"] += kill_tree(refs, sig=sig)


def _teardown(store: Store, timeout: float = 60.0) -> dict[str, Any]:
    report: dict[str, Any] = {"actors": 0, "processes": 0, "not_ours": []}
    server = store.state.get("server")
    if server and server.get("proc"):
        _stop([ProcessRef.from_dict(server["proc"])], report, sig=15)
    import ray

    # An embedded cluster goes down whole (its processes, then its shared
    # memory): no need to reach its actors, which may be what failed.
    # Attached: remove snapstore's actors and leave the cluster running.
    if store.state.get("address") and (not store.embedded or ray.is_initialized()):
        with contextlib.suppress(Exception):
            report["actors"] = _remove_actors(store, timeout)

    if ray.is_initialized():
        ray.shutdown()
    if store.embedded:
        # Workers first, the head (GCS) last, so raylets do not wait on a dead GCS.
        _stop([p for n in store.embedded_nodes() if not n.head for p in n.procs], report)
        _stop([p for n in store.embedded_nodes() if n.head for p in n.procs], report)
        temp_dir = store.state.get("temp_dir")
        if temp_dir and os.path.isdir(temp_dir) and not os.environ.get("SNAPSTORE_KEEP_LOGS"):
            shutil.rmtree(temp_dir, ignore_errors=True)
    shm = os.path.join(store.state.get("shm_dir", shm_root()), f"snapstore-{store.store_id}")
    if os.path.isdir(shm):
        shutil.rmtree(shm, ignore_errors=True)
    token_file = store.ray_token_file
    if token_file:
        forget_ray_token(token_file)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(token_file)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(store.path)
    return report


def _remove_actors(store: Store, timeout: float) -> int:
    import ray

    from snapstore.control.coordinator import COORDINATOR_NAME

    store.connect_ray()
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == store.namespace
        and (a["name"].startswith("snapstore-smp-") or a["name"] == COORDINATOR_NAME)
    ]
    handles = []
    for name in names:
        with contextlib.suppress(ValueError):
            handles.append((name, ray.get_actor(name, namespace=store.namespace)))
    smps = [h for n, h in handles if n != COORDINATOR_NAME]
    with contextlib.suppress(Exception):
        ray.get([h.destroy.remote() for h in smps], timeout=timeout)
    for _, h in handles:
        with contextlib.suppress(Exception):
            ray.kill(h, no_restart=True)
    return len(handles)


def iter_embedded(store: Store) -> Iterator[EmbeddedNode]:
    yield from store.embedded_nodes()


def add_embedded_node(store: Store) -> EmbeddedNode:
    """Start one more worker raylet in an embedded store (a replacement node)."""
    if not store.embedded:
        raise ClusterError("only an embedded store (snapstore up without --address) can add nodes")
    cfg = store.config
    node = start_worker(
        store.address,
        store.state["temp_dir"],
        cfg.object_store_memory,
        cfg.cpus_per_node,
        ray_token_file=store.ray_token_file,
    )
    store.state["nodes"].append(node.to_dict())
    store.save_state()
    store.connect_ray()
    wait_node_alive(node.node_id)
    return node
