"""snapstore: an erasure-coded, in-memory snapshot store for PyTorch training.

The package imports lazily: the SMP actors that run on every node use only
the byte-level parts and must not pay for importing torch (3+ s cold).
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# Ray rewrites 127.0.0.1 to the machine's outward address unless this is 0;
# snapstore's embedded cluster, tests and demos live on loopback only. Set
# before anything imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from snapstore.errors import (
    ClusterError,
    ConfigError,
    FaultInjectionError,
    FormatError,
    MemoryBudgetError,
    RestoreRequiredError,
    SaveFailedError,
    SnapshotNotFoundError,
    SnapstoreError,
    StoreNotRunningError,
    StoreTimeoutError,
    UnrecoverableError,
    UnsupportedTypeError,
)

if TYPE_CHECKING:
    from snapstore.clients.client import Client
    from snapstore.clients.control import JobControl
    from snapstore.control.handle import Store, connect, nodes
    from snapstore.format.pack import Packed, pack, unpack
    from snapstore.ops.lifecycle import down, up
    from snapstore.ops.plan import plan

__version__ = "0.1.0"

# name -> module that defines it; resolved on first attribute access.
_LAZY = {
    "pack": "snapstore.format.pack",
    "unpack": "snapstore.format.pack",
    "Packed": "snapstore.format.pack",
    "up": "snapstore.ops.lifecycle",
    "down": "snapstore.ops.lifecycle",
    "connect": "snapstore.control.handle",
    "nodes": "snapstore.control.handle",
    "Store": "snapstore.control.handle",
    "plan": "snapstore.ops.plan",
    "Client": "snapstore.clients.client",
    "JobControl": "snapstore.clients.control",
}

__all__ = [
    "Client",
    "ClusterError",
    "ConfigError",
    "FaultInjectionError",
    "FormatError",
    "JobControl",
    "MemoryBudgetError",
    "Packed",
    "RestoreRequiredError",
    "SaveFailedError",
    "SnapshotNotFoundError",
    "SnapstoreError",
    "Store",
    "StoreNotRunningError",
    "StoreTimeoutError",
    "UnrecoverableError",
    "UnsupportedTypeError",
    "connect",
    "down",
    "nodes",
    "pack",
    "plan",
    "unpack",
    "up",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'snapstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
