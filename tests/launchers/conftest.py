"""One store for the launcher tests: 3 nodes, k=2, m=1 (the smallest that survives a loss).

Package-scoped: the quick start, torchrun and Ray Train tests run one after
the other on it. Tests that lose a node add a replacement, so each finds
three alive store nodes (``faults.store_nodes``); each uses its own job names.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import running_store

ROOT = Path(__file__).resolve().parent.parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="package")
def store() -> Iterator[Any]:
    with running_store(nodes=3, k=2, m=1, memory_per_node="64MiB") as s:
        yield s


def user_env(store: Any, **extra: str) -> dict[str, str]:
    """The environment of a user's shell after ``snapstore up`` (this venv on PATH)."""
    env = dict(os.environ, SNAPSTORE_RUNTIME_DIR=store.rundir)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("SNAPSTORE_NODE", None)
    env.update(extra)
    return env
