"""A handle on a running store: where it is recorded and how to reach its coordinator.

Where a running store is (its Ray address, settings, the processes an
embedded cluster started) is kept in one small JSON file, mode 0600, in the
user's runtime directory: ``$SNAPSTORE_RUNTIME_DIR``, else
``$XDG_RUNTIME_DIR/snapstore``, else ``/tmp/snapstore-<uid>``. Clients, the
CLI, the REST server and ``down`` find the store through it;
:mod:`snapstore.ops.lifecycle` writes it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from snapstore.config import StoreConfig
from snapstore.errors import StoreNotRunningError

__all__ = [
    "STATE_VERSION",
    "EmbeddedNode",
    "Store",
    "connect",
    "default_persist_dir",
    "ensure_ray",
    "nodes",
    "runtime_dir",
    "state_path",
]

logger = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class EmbeddedNode:
    """One raylet we started: its Ray node id and the pids of its processes."""

    node_id: str
    pids: list[int]
    head: bool = False
    started_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "pids": self.pids,
            "head": self.head,
            "started_at": self.started_at,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbeddedNode:
        return cls(
            str(d["node_id"]),
            [int(p) for p in d["pids"]],
            bool(d.get("head")),
            float(d.get("started_at", 0.0)),
        )


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


def write_state(path: str, state: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_state(path: str) -> dict[str, Any]:
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
        from snapstore.node.store import COORDINATOR_NAME

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
        write_state(self.path, self.state)

    def reload(self) -> Store:
        self.state = read_state(self.path)
        return self


def connect(rundir: str | None = None) -> Store:
    """A handle on the running store recorded in the runtime directory."""
    path = state_path(rundir)
    return Store(path, read_state(path))


def nodes(rundir: str | None = None) -> list[dict[str, Any]]:
    """The store's nodes: Ray node id, address, alive, heartbeat age, memory, group."""
    return connect(rundir).nodes()
