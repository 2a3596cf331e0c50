"""A handle on a running store: where it is recorded and how to reach its coordinator.

Where a running store is (its Ray address, settings, secrets, the processes
an embedded cluster started) is kept in one small JSON file, ``store.json``,
mode 0600, in the user's runtime directory: ``$SNAPSTORE_RUNTIME_DIR``, else
``$XDG_RUNTIME_DIR/snapstore``, else ``/tmp/snapstore-<uid>``. Clients, the
CLI, the REST server and ``down`` find the store through it;
:mod:`snapstore.ops.lifecycle` writes it.

Security contract (see docs/operating.md, Security):

- The runtime directory is private (:func:`snapstore.private.private_dir`:
  0700, owned by this user, not a symlink) before anything is read from or
  written into it; the state file is written with exclusive, no-follow
  creation and read only when it is a 0600 regular file of this user.
- The store's Ray cluster requires Ray's token authentication; the token
  lives in a 0600 file beside the state file, named in it
  (``ray_token_file``), and :func:`ensure_ray` presents it for every driver
  that finds the store here (clients, the CLI, the REST server, tests).
- Every process the store started is recorded as a :class:`ProcessRef`
  (pid, start time, executable, boot): a pid alone never identifies a
  process to signal.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from snapstore.config import StoreConfig
from snapstore.errors import ConfigError, StoreNotRunningError
from snapstore.private import private_dir, read_private, write_private

__all__ = [
    "STATE_VERSION",
    "EmbeddedNode",
    "ProcessRef",
    "Store",
    "connect",
    "default_persist_dir",
    "ensure_ray",
    "forget_ray_token",
    "nodes",
    "private_runtime_dir",
    "ray_token",
    "ray_token_mode",
    "runtime_dir",
    "state_path",
    "use_ray_token",
]

logger = logging.getLogger(__name__)

STATE_VERSION = 2
"""2: processes are recorded with their start time (``procs``), the Ray token file is named."""
STATE_LIMIT = 4 << 20  # a state file is a few KiB; refuse to read a huge one
RAY_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class ProcessRef:
    """One process we started, identified beyond its pid.

    A pid is reused once its process is gone; the pair (pid, start time in
    clock ticks since boot) names one process of one boot, and the
    executable guards against anything left. :meth:`identify` reads them
    from ``/proc``; a ref is :meth:`current` while the pid still names that
    very process.
    """

    pid: int
    start: int
    exe: str
    boot: str

    @classmethod
    def identify(cls, pid: int) -> ProcessRef | None:
        """The process ``pid`` names now, or None if there is none (or /proc cannot say)."""
        try:
            with open(f"/proc/{int(pid)}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            return None
        # Field 2 (the command) may hold spaces and parentheses: split after the last ')'.
        fields = raw[raw.rfind(b")") + 2 :].split()
        try:
            start = int(fields[19])  # field 22: starttime, in clock ticks after boot
        except (IndexError, ValueError):
            return None
        try:
            exe = os.readlink(f"/proc/{int(pid)}/exe")
        except OSError:
            exe = ""
        return cls(int(pid), start, exe, _boot_id())

    def current(self) -> bool:
        """Whether ``pid`` still names the process recorded here."""
        return ProcessRef.identify(self.pid) == self

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "start": self.start, "exe": self.exe, "boot": self.boot}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProcessRef:
        return cls(int(d["pid"]), int(d["start"]), str(d["exe"]), str(d["boot"]))


@dataclass
class EmbeddedNode:
    """One raylet we started: its Ray node id and its processes."""

    node_id: str
    procs: list[ProcessRef]
    head: bool = False
    started_at: float = field(default_factory=time.time)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "procs": [p.to_dict() for p in self.procs],
            "head": self.head,
            "started_at": self.started_at,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbeddedNode:
        return cls(
            str(d["node_id"]),
            [ProcessRef.from_dict(p) for p in d.get("procs", [])],
            bool(d.get("head")),
            float(d.get("started_at", 0.0)),
        )


def runtime_dir(override: str | None = None) -> str:
    """Where the state file lives (not created here; see :func:`private_runtime_dir`)."""
    if override:
        return override
    env = os.environ.get("SNAPSTORE_RUNTIME_DIR")
    if env:
        return env
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "snapstore")
    return os.path.join("/tmp", f"snapstore-{os.getuid()}")


def private_runtime_dir(override: str | None = None) -> str:
    """The runtime directory, created 0700 if missing; ConfigError unless it is private."""
    return private_dir(runtime_dir(override), "runtime directory")


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
    """Write the state file atomically: private directory, exclusive no-follow temp, rename."""
    private_dir(os.path.dirname(path), "runtime directory")
    write_private(path, json.dumps(state, indent=1, sort_keys=True).encode())


def read_state(path: str) -> dict[str, Any]:
    try:
        private_dir(os.path.dirname(path), "runtime directory", create=False)
        raw = read_private(path, STATE_LIMIT)
        state = json.loads(raw)
    except FileNotFoundError:
        raise StoreNotRunningError(
            f"no running store: {path} does not exist (start one with `snapstore up`)"
        ) from None
    except ConfigError as e:
        raise StoreNotRunningError(f"not using the state file {path}: {e}") from None
    except (OSError, ValueError) as e:
        raise StoreNotRunningError(f"cannot read the store's state file {path}: {e}") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise StoreNotRunningError(
            f"{path} is not a snapstore state file of version {STATE_VERSION} (one written "
            "by another snapstore release: stop that store with the release that started "
            "it, or remove the file if its cluster is gone)"
        )
    return state


_ray_token_in_use: str | None = None


def use_ray_token(token_file: str | None) -> None:
    """Make this process (and the processes it starts) use Ray's token authentication.

    With a file: ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` in the
    environment (Ray's own variables, read by its C++ core and inherited by
    the raylets, GCS and workers this process starts). With None: token
    mode off in this process, for a cluster that has none (only a test or
    an explicitly unauthenticated attach). Ray caches both at start, so the
    cache is refreshed; call it only while this process is not connected.
    """
    global _ray_token_in_use
    if token_file is not None:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = token_file
        os.environ.pop("RAY_AUTH_TOKEN", None)
    else:
        os.environ["RAY_AUTH_MODE"] = "disabled"
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        os.environ.pop("RAY_AUTH_TOKEN", None)
    _ray_token_in_use = token_file
    _refresh_ray_auth()


def forget_ray_token(token_file: str) -> None:
    """Undo :func:`use_ray_token` for ``token_file`` (its store is gone), if it is in use."""
    global _ray_token_in_use
    if _ray_token_in_use != token_file:
        return
    _ray_token_in_use = None
    if os.environ.get("RAY_AUTH_TOKEN_PATH") == token_file:
        for var in RAY_AUTH_VARS:
            os.environ.pop(var, None)
        _refresh_ray_auth()


def _raylet() -> Any:
    # Ray's token API lives in its compiled core, which its type stub does not describe.
    return importlib.import_module("ray._raylet")


def _refresh_ray_auth() -> None:
    import ray

    if ray.is_initialized():
        return
    raylet = _raylet()
    raylet.Config.initialize("")
    raylet.AuthenticationTokenLoader.instance().reset_cache()


def ray_token_mode() -> bool:
    """Whether this process runs Ray in token-authentication mode (what it connected with)."""
    raylet = _raylet()
    return bool(raylet.get_authentication_mode() == raylet.AuthenticationMode.TOKEN)


def ray_token() -> str:
    """The Ray token this process presents (from its environment, as Ray finds it)."""
    loader = _raylet().AuthenticationTokenLoader.instance()
    return str(loader.get_raw_token(ignore_auth_mode=True))


def ensure_ray(address: str, namespace: str, ray_token_file: str | None = None) -> None:
    """Connect this process to the store's Ray cluster, unless it already is.

    ``ray_token_file``: the store's Ray token (None: the cluster has no
    token authentication, or this process's environment already holds it).
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    if ray_token_file is not None:
        use_ray_token(ray_token_file)
    try:
        ray.init(
            address=address,
            namespace=namespace,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=False,
        )
    except Exception as e:
        hint = ""
        if "auth" in str(e).lower():
            hint = " (Ray refused this process's authentication token)"
        raise StoreNotRunningError(
            f"cannot connect to the store's Ray cluster at {address}{hint}: {e}"
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

    @property
    def ray_token_file(self) -> str | None:
        """The store's Ray token (0600, beside the state file); None for an unauthenticated
        attached cluster (``up(allow_unauthenticated_ray=True)``)."""
        path = self.state.get("ray_token_file")
        return str(path) if path else None

    def connect_ray(self) -> None:
        ensure_ray(self.address, self.namespace, self.ray_token_file)

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
