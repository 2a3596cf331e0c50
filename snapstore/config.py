"""Settings of a store, with one precedence rule: argument over environment over default.

Every field has a documented default that works on a 2-core, 24 GiB machine
running the embedded cluster. An environment variable ``SNAPSTORE_<FIELD>``
(upper case) overrides a default; an explicit argument overrides both. The
resolved settings are recorded in the store's state file, so clients and the
CLI see what ``up`` chose.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from snapstore.errors import ConfigError

__all__ = ["JOB_NAME_RE", "StoreConfig", "check_job_name", "format_size", "parse_size"]

JOB_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 1000**4,
    "tib": 1 << 40,
}


def parse_size(text: str | int, what: str = "size") -> int:
    """Parse ``"2GiB"``, ``"512M"``, ``"1.5g"`` or an int into bytes (K/M/G/T are binary)."""
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a size, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"{what}: expected a non-negative size, got {text}")
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"{what}: cannot read {text!r} as a size; use a number with an optional "
            "unit, e.g. 512MiB, 2G, 1.5GiB"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


MAX_WORLD_SIZE = 1 << 20
"""Most ranks a job may have: the coordinator keeps per-rank lists of a job's world size
(snapstore.control.jobs), and a persisted step lists its ranks (snapstore.persist): a
mistyped or forged world size is refused by name, not allocated."""


def format_size(n: float) -> str:
    """``1536 -> '1.5 KiB'``: for messages and tables."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_job_name(job: str) -> str:
    """Job names become parts of shared-memory file names: keep them tame."""
    if not isinstance(job, str) or not JOB_NAME_RE.fullmatch(job):
        raise ConfigError(
            f"job name {job!r}: use 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return job


@dataclass(frozen=True)
class StoreConfig:
    """How a store is laid out and how fast it reacts. Defaults in brackets.

    k, m: data and parity chunks per stripe [3, 1]; any m nodes of a stripe
        group may be lost at once. Needs at least k + m store nodes.
    nodes: worker raylets the embedded cluster starts [4]; ignored when attaching.
    memory_per_node: shared-memory budget of each SMP in bytes; 0 means "auto":
        half of this machine's RAM divided by the store nodes on it [0].
    backend: erasure-coding backend ["isa_l_rs_vand"].
    heartbeat_interval: seconds between heartbeats of a node to its group
        leader, and of a leader to the coordinator [1.0]. Liveness comes from Ray
        (a dead process or raylet is reported at once); beats only mark a silent
        node *suspect*, so they can be slow and cheap.
    failure_timeout: seconds without a heartbeat before a node is *suspect*
        [2.0]. Suspicion is logged and shown, never acted on: a stalled node
        aborts nothing and loses nothing. A node is *dead* when Ray says its
        SMP process or its node died (at once for a crashed process or
        raylet), and only then are steps on it aborted.
    save_timeout: seconds a step may stay staged by some ranks but not all
        before it is aborted (a rank died mid-save and never came back) [300].
    reprotect_delay: seconds a dead node may take to come back (Ray restarts
        a crashed SMP in about a second, with its memory) before it is
        *lost*: its data is rebuilt elsewhere and its group re-formed [2.0].
    resend_interval: seconds after which an undecided step's notices and
        reports are sent again (lost messages, a new leader) [1.0].
    status_after: seconds a trainer's wait for an outcome lasts before its
        node asks the coordinator directly [5.0].
    relay_groups: stripe groups per *relay region* [16]. The leaders of a
        region send their reports and beats through one node of the region
        (its relay), which forwards whatever arrived meanwhile as one message:
        the coordinator takes one message per region where it took one per
        group (docs/architecture.md, "Relays"). A region of a single group
        sends straight to the coordinator; 1 gives every group a relay of its
        own (one more hop, nothing batched: for tests); 0 turns relays off.
    transport: how SMPs read each other's chunks: "auto" (shared memory when
        both are on one host, TCP otherwise), "tcp" (always TCP) ["auto"].
    namespace: the Ray namespace of snapstore's actors ["snapstore"].
    object_store_memory: Ray object store per embedded raylet [100 MiB];
        snapstore moves its own bytes through shared memory and TCP.
    persist_dir: where committed steps are flushed to disk, one directory per
        job (see docs/persistence.md). "" means: ``<runtime dir>/persist`` when
        the store's runtime directory was chosen explicitly (``--runtime-dir``
        or ``$SNAPSTORE_RUNTIME_DIR``), else ``$XDG_STATE_HOME/snapstore/persist``
        (``~/.local/state/...``), a disk location that outlives a reboot, where
        the default runtime directory may be RAM (tmpfs) [""]. ``up`` records
        the absolute path it chose. On a multi-host cluster it must be a
        directory every node mounts at the same path, or a URL. An fsspec URL
        (``s3://bucket/prefix``, ``file:///path``...) is flushed to through
        fsspec (snapstore.persist.objstore); it must not carry a password (status
        shows it) nor name a one-process filesystem (``memory://``).
    persist_every: flush a job's committed step to ``persist_dir`` whenever its
        step crosses a multiple of this many steps; 0 turns periodic flushing
        off (``Client.persist()`` still works) [100].
    persist_keep: complete persisted steps kept per job; older ones are deleted
        after a newer one is complete [3].
    persist_bandwidth: bytes per second each node may write while flushing
        (a token bucket per SMP); 0 means unlimited [256 MiB].
    persist_timeout: seconds a flush may take before it is abandoned and the
        memory slots it holds are released [600].
    """

    k: int = 3
    m: int = 1
    nodes: int = 4
    memory_per_node: int = 0
    backend: str = "isa_l_rs_vand"
    heartbeat_interval: float = 1.0
    failure_timeout: float = 2.0
    reprotect_delay: float = 2.0
    save_timeout: float = 300.0
    resend_interval: float = 1.0
    status_after: float = 5.0
    relay_groups: int = 16
    transport: str = "auto"
    namespace: str = "snapstore"
    object_store_memory: int = 100 << 20
    cpus_per_node: int = 2
    persist_dir: str = ""
    persist_every: int = 100
    persist_keep: int = 3
    persist_bandwidth: int = 256 << 20
    persist_timeout: float = 600.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or not isinstance(self.m, int) or self.k < 1 or self.m < 1:
            raise ConfigError(f"k and m must be integers >= 1, got k={self.k!r}, m={self.m!r}")
        if self.k + self.m > 32:
            raise ConfigError(f"k + m = {self.k + self.m} exceeds 32 chunks per stripe")
        if self.nodes < 1:
            raise ConfigError(f"nodes must be >= 1, got {self.nodes}")
        if self.memory_per_node < 0:
            raise ConfigError(f"memory_per_node must be >= 0, got {self.memory_per_node}")
        if self.transport not in ("auto", "tcp"):
            raise ConfigError(f"transport must be 'auto' or 'tcp', got {self.transport!r}")
        if not 0 < self.heartbeat_interval < self.failure_timeout:
            raise ConfigError(
                f"need 0 < heartbeat_interval ({self.heartbeat_interval}) < "
                f"failure_timeout ({self.failure_timeout})"
            )
        if not (self.resend_interval > 0 and self.status_after > 0):
            raise ConfigError(
                f"resend_interval ({self.resend_interval}) and status_after "
                f"({self.status_after}) must be > 0"
            )
        if not isinstance(self.relay_groups, int) or self.relay_groups < 0:
            raise ConfigError(
                f"relay_groups must be an integer >= 0 (0 turns relays off), "
                f"got {self.relay_groups!r}"
            )
        if self.reprotect_delay < 0:
            raise ConfigError(f"reprotect_delay must be >= 0, got {self.reprotect_delay}")
        if not self.save_timeout > 0:
            raise ConfigError(f"save_timeout must be > 0, got {self.save_timeout}")
        if self.persist_every < 0:
            raise ConfigError(
                f"persist_every must be >= 0 (0 turns periodic flushing off), "
                f"got {self.persist_every}"
            )
        if self.persist_keep < 1:
            raise ConfigError(f"persist_keep must be >= 1, got {self.persist_keep}")
        if self.persist_bandwidth < 0:
            raise ConfigError(
                f"persist_bandwidth must be >= 0 bytes/s (0 = unlimited), "
                f"got {self.persist_bandwidth}"
            )
        if not self.persist_timeout > 0:
            raise ConfigError(f"persist_timeout must be > 0, got {self.persist_timeout}")
        if "://" in self.persist_dir:
            _check_persist_url(self.persist_dir)
        if self.backend == "liberasurecode_rs_vand":
            # It codes 16-bit words; stripes are cut at any byte.
            raise ConfigError(
                "backend liberasurecode_rs_vand codes 2-byte words and cannot code the "
                "store's byte-granular chunks; use isa_l_rs_vand or isa_l_rs_cauchy"
            )

    @classmethod
    def resolve(cls, env: Mapping[str, str] | None = None, **args: Any) -> StoreConfig:
        """Build a config: ``args`` (None = not given) over ``SNAPSTORE_*`` over defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            given = args.pop(f.name, None)
            if given is None:
                raw = env.get(f"SNAPSTORE_{f.name.upper()}")
                if raw is None:
                    continue
                given = raw
            values[f.name] = _coerce(f.name, f.type, given)
        if args:
            raise ConfigError(f"unknown settings: {', '.join(sorted(args))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StoreConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _coerce(name: str, typ: Any, value: Any) -> Any:
    typ = str(typ)
    try:
        if name in ("memory_per_node", "object_store_memory", "persist_bandwidth"):
            if isinstance(value, str) and value.strip().lower() in ("auto", "unlimited"):
                return 0
            return parse_size(value, name)
        if typ == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ConfigError(f"{name}: expected an integer, got {value!r}")
            return int(value)
        if typ == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{name}: cannot use {value!r}: {e}") from None


# fsspec filesystems whose contents live inside one process: the SMPs, the
# coordinator and readers are separate processes, each would see its own.
_PROCESS_LOCAL_SCHEMES = ("memory",)


def _check_persist_url(url: str) -> None:
    """What can be said of a persist URL without its driver (see snapstore.persist.objstore)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        raise ConfigError(
            f"persist_dir {parts.scheme}://...: the URL carries a password, which status and "
            "the REST server would show; give credentials through fsspec's configuration "
            "(FSSPEC_<PROTOCOL>_<OPTION> environment variables or its config file)"
        )
    if not parts.scheme:
        raise ConfigError(f"persist_dir {url!r} is not a URL (scheme://path) nor a directory")
    if parts.scheme in _PROCESS_LOCAL_SCHEMES:
        raise ConfigError(
            f"persist_dir {url!r}: that filesystem lives inside one process, and the store's "
            "SMPs, coordinator and readers are separate processes; use a directory, a "
            "file:// URL or an object store URL"
        )
