"""Starting, finding and stopping a store: ``up``, ``connect``, ``nodes``, ``down``.

Where a running store is (its Ray address, settings, the processes an
embedded cluster started) is kept in one small JSON file, mode 0600, in the
user's runtime directory: ``$SNAPSTORE_RUNTIME_DIR``, else
``$XDG_RUNTIME_DIR/snapstore``, else ``/tmp/snapstore-<uid>``. Clients, the
CLI and ``down`` find the store through it.
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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from snapstore.cluster import EmbeddedNode, kill_tree, start_head, start_worker, wait_node_alive
from snapstore.config import StoreConfig
from snapstore.errors import ClusterError, ConfigError, StoreNotRunningError
from snapstore.persist import is_url
from snapstore.segments import shm_root

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

STATE_VERSION = 1
READY_TIMEOUT = 180.0
DEFAULT_REST_PORT = 8470
SERVER_START_TIMEOUT = 60.0


def runtime_dir(override: str | None = None) -> str:
    if override:
        return override
    env = os.environ.get("SNAPSTORE_RUNTIME_DIR")
    if env:
        return env
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "snapstore")
    return os.path.join("/tmp", f"snapstore-{os.getuid()}")


def default_persist_dir(rundir: str | None = None) -> str:
    """Where steps are flushed when ``persist_dir`` is not set (see StoreConfig).

    Under the runtime directory when that was chosen explicitly (a private
    store: tests, several stores on one machine); otherwise in the user's
    state directory on disk, because the default runtime directory may be
    RAM (``$XDG_RUNTIME_DIR`` is a tmpfs) and cleared at reboot.
    """
    if rundir or os.environ.get("SNAPSTORE_RUNTIME_DIR"):
        return os.path.abspath(os.path.join(runtime_dir(rundir), "persist"))
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.abspath(os.path.join(state, "snapstore", "persist"))


def state_path(rundir: str | None = None) -> str:
    return os.path.join(runtime_dir(rundir), "store.json")


def _write_state(path: str, state: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _read_state(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise StoreNotRunningError(
            f"no running store: {path} does not exist (start one with `snapstore up`)"
        ) from None
    except (OSError, ValueError) as e:
        raise StoreNotRunningError(f"cannot read the store's state file {path}: {e}") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise StoreNotRunningError(
            f"{path} is not a snapstore state file of version {STATE_VERSION}"
        )
    return state


def ensure_ray(address: str, namespace: str) -> None:
    """Connect this process to the store's Ray cluster, unless it already is."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(
            address=address,
            namespace=namespace,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=False,
        )
    except Exception as e:
        raise StoreNotRunningError(
            f"cannot connect to the store's Ray cluster at {address}: {e}"
        ) from e


@dataclass
class Store:
    """A handle on a running store, read from its state file."""

    path: str
    state: dict[str, Any]

    @property
    def config(self) -> StoreConfig:
        return StoreConfig.from_dict(self.state["config"])

    @property
    def address(self) -> str:
        return str(self.state["address"])

    @property
    def namespace(self) -> str:
        return str(self.state["config"].get("namespace", "snapstore"))

    @property
    def embedded(self) -> bool:
        return bool(self.state.get("embedded"))

    @property
    def store_id(self) -> str:
        return str(self.state["store_id"])

    def connect_ray(self) -> None:
        ensure_ray(self.address, self.namespace)

    def coordinator(self) -> Any:
        from snapstore.coordinator import COORDINATOR_NAME

        self.connect_ray()
        import ray

        try:
            return ray.get_actor(COORDINATOR_NAME, namespace=self.namespace)
        except ValueError:
            raise StoreNotRunningError(
                f"the store's coordinator is not running on {self.address}"
            ) from None

    def call(self, method: str, *args: Any, timeout: float = 30.0) -> Any:
        """Call a coordinator method and wait for it, with a timeout."""
        from snapstore.rpc import call

        ref = getattr(self.coordinator(), method).remote(*args)
        return call(ref, timeout, f"coordinator.{method}")

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.call("node_list"))

    def status(self, events: int = 50) -> dict[str, Any]:
        return dict(self.call("snapshot", events))

    def embedded_nodes(self) -> list[EmbeddedNode]:
        return [EmbeddedNode.from_dict(d) for d in self.state.get("nodes", [])]

    def save_state(self) -> None:
        _write_state(self.path, self.state)

    def reload(self) -> Store:
        self.state = _read_state(self.path)
        return self


def connect(rundir: str | None = None) -> Store:
    """A handle on the running store recorded in the runtime directory."""
    path = state_path(rundir)
    return Store(path, _read_state(path))


def nodes(rundir: str | None = None) -> list[dict[str, Any]]:
    """The store's nodes: Ray node id, address, alive, heartbeat age, memory, group."""
    return connect(rundir).nodes()


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
    **settings: Any,
) -> Store:
    """Start a store and return a handle on it; the cluster keeps running after return.

    Without ``address``: start an embedded Ray cluster of a head and
    ``nodes`` worker raylets on this machine, all on 127.0.0.1, with one SMP
    per worker. With ``address`` ("auto" or HOST:PORT): attach to a running
    Ray cluster and put one SMP on every alive node; ``down`` will then
    remove snapstore's actors and leave that cluster running.

    With ``rest`` (the default) the REST monitoring server starts too, as
    its own process (``python -m server``), bound to ``rest_host``
    (127.0.0.1 unless told otherwise; anything else requires a bearer token,
    ``rest_token`` or one generated and recorded in the state file).
    ``rest_port=0`` picks a free port.
    """
    cfg = StoreConfig.resolve(nodes=nodes, k=k, m=m, memory_per_node=memory_per_node, **settings)
    persist_dir = cfg.persist_dir or default_persist_dir(rundir)
    if is_url(persist_dir):
        from snapstore import objstore

        objstore.reach(persist_dir)
    else:
        persist_dir = os.path.abspath(persist_dir)
        try:
            os.makedirs(persist_dir, exist_ok=True)
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
    rd = runtime_dir(rundir)
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
    try:
        if address is None:
            temp_dir = os.path.join(rd, f"ray-{store_id}")
            state["temp_dir"] = temp_dir
            gcs, head = start_head(temp_dir, cfg.object_store_memory)
            state["address"] = gcs
            state["nodes"].append(head.to_dict())
            store.save_state()  # from here on, `down` can clean up
            for _ in range(cfg.nodes):
                node = start_worker(gcs, temp_dir, cfg.object_store_memory, cfg.cpus_per_node)
                state["nodes"].append(node.to_dict())
                store.save_state()
            store.connect_ray()
            expected = cfg.nodes
        else:
            ensure_ray(address, cfg.namespace)
            import ray

            state["address"] = ray.get_runtime_context().gcs_address
            from snapstore.coordinator import CONTROL_RESOURCE

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
            state["server"] = _start_server(store, rest_host, rest_port, rest_token)
            store.save_state()
    except BaseException:
        with contextlib.suppress(Exception):
            _teardown(store)
        raise
    return store


def _start_server(store: Store, host: str, port: int, token: str | None) -> dict[str, Any]:
    """Start the REST server as its own process and wait until it answers.

    snapstore does not import the HTTP layer: it runs ``python -m server``,
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
        "server",
        "--runtime-dir",
        rd,
        "--host",
        host,
        "--port",
        str(port),
        "--ready-file",
        ready,
    ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(
                f"the REST server exited with code {proc.returncode} before serving; "
                f"its log is {log_path}:\n{_tail(log_path)}"
            )
        try:
            with open(ready) as f:
                info = json.load(f)
        except (FileNotFoundError, ValueError):
            time.sleep(0.1)
            continue
        info["pid"] = proc.pid
        info["log"] = log_path
        return dict(info)
    kill_tree([proc.pid], sig=15)
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

    from snapstore.coordinator import COORDINATOR_NAME, Coordinator

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
    """Stop what ``up`` started and remove the shared memory it created."""
    store = connect(rundir)
    return _teardown(store, timeout)


def _teardown(store: Store, timeout: float = 60.0) -> dict[str, Any]:
    report: dict[str, Any] = {"actors": 0, "processes": 0}
    server = store.state.get("server")
    if server and server.get("pid"):
        report["processes"] += kill_tree([int(server["pid"])], sig=15)
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
        pids = [p for n in store.embedded_nodes() for p in n.pids]
        # Workers first, the head (GCS) last, so raylets do not wait on a dead GCS.
        workers = [p for n in store.embedded_nodes() if not n.head for p in n.pids]
        head = [p for p in pids if p not in workers]
        report["processes"] += kill_tree(workers) + kill_tree(head)
        temp_dir = store.state.get("temp_dir")
        if temp_dir and os.path.isdir(temp_dir) and not os.environ.get("SNAPSTORE_KEEP_LOGS"):
            shutil.rmtree(temp_dir, ignore_errors=True)
    shm = os.path.join(store.state.get("shm_dir", shm_root()), f"snapstore-{store.store_id}")
    if os.path.isdir(shm):
        shutil.rmtree(shm, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(store.path)
    return report


def _remove_actors(store: Store, timeout: float) -> int:
    import ray

    from snapstore.coordinator import COORDINATOR_NAME

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
        store.address, store.state["temp_dir"], cfg.object_store_memory, cfg.cpus_per_node
    )
    store.state["nodes"].append(node.to_dict())
    store.save_state()
    store.connect_ray()
    wait_node_alive(node.node_id)
    return node
