"""Shared fixtures: real embedded stores on loopback, always torn down."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow",
        action="store_true",
        help="also run the slow tier (marker slow: benchmark smoke runs, the failure matrix)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave the slow tier out unless --slow is given or -m names it (as -m "slow" does):
    a marker expression of the user's own (-m "not cluster") still composes with it."""
    if config.getoption("--slow") or "slow" in (config.getoption("markexpr") or ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@contextlib.contextmanager
def running_store(rundir: str | None = None, **settings: Any) -> Iterator[Any]:
    """Start an embedded store in a private runtime dir; stop it whatever happens.

    The runtime dir is short (Ray's socket paths must fit 107 bytes) and
    private, so tests never touch a store the user may be running; ``rundir``
    names one for ``up`` to create (the caller removes its parent).

    Nothing here handles Ray's token: ``up`` starts the cluster with one,
    and every driver that finds the store through its state file (this
    process, clients in subprocesses, the REST server) presents it.
    """
    import snapstore

    rundir = rundir or tempfile.mkdtemp(prefix="ss-", dir="/tmp")
    store = None
    try:
        settings.setdefault("rest", False)  # REST tests ask for it; it costs a process
        settings.setdefault("rest_port", 0)
        settings.setdefault("reprotect_delay", 1.0)
        store = snapstore.up(rundir=rundir, **settings)
        store.rundir = rundir  # type: ignore[attr-defined]
        yield store
    finally:
        with contextlib.suppress(Exception):
            snapstore.down(rundir=rundir)
        shutil.rmtree(rundir, ignore_errors=True)


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def job_status(store: Any, job: str) -> dict[str, Any]:
    for j in store.status(events=0)["jobs"]:
        if j["job"] == job:
            return dict(j)
    return {}


def events(store: Any, kind: str | None = None, n: int = 500) -> list[dict[str, Any]]:
    evs = store.status(events=n)["events"]
    return [e for e in evs if kind is None or e["kind"] == kind]


def smp_infos(store: Any) -> list[Any]:
    """Each alive node's SMP as it describes itself (NodeInfo: its peer, counters, held)."""
    import ray

    from snapstore.control.messages import NodeInfo
    from snapstore.format.wire import decode
    from snapstore.node.store import smp_name

    store.connect_ray()
    out = []
    for n in store.nodes():
        if n["alive"]:
            h = ray.get_actor(smp_name(n["node_id"]), namespace=store.namespace)
            out.append(decode(ray.get(h.info.remote(), timeout=30), NodeInfo))
    return out


@pytest.fixture(scope="session")
def reference_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One directory of cached fault-free training runs for the session (bench.reference):
    ``bench.chaos --quick`` and the demo train the same reference (same code, steps and
    ranks), and the second to run reuses the first's instead of training it again."""
    return str(tmp_path_factory.mktemp("reference-cache"))
