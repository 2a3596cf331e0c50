"""The persisted tier at an fsspec URL on a real 4-node loopback store (k=3, m=1).

``file://`` goes through the same code as an object store (``s3://``,
``gs://``): rank objects first, the manifest last, no directory renames.
Here: periodic flushes with retention, a flush failing midway, then a whole
store outage with the newest step damaged, a second store restoring the
older step from the URL bitwise, and an offline export. What a directory
root does is tests/test_persist_cluster.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import torch

from snapstore import persist
from snapstore.bench.workers import make_state, states_equal
from tests.conftest import events, job_status, running_store, wait_for

pytestmark = pytest.mark.cluster

JOB = "uj"
WORLD = 2
NBYTES = 64 << 10
SETTINGS: dict[str, Any] = {
    "nodes": 4,
    "k": 3,
    "m": 1,
    "memory_per_node": "64MiB",
    "persist_every": 2,
    "persist_keep": 2,
}


@pytest.fixture(scope="module")
def local() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="ss-url-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def url(local: str) -> str:
    return "file://" + local


def _clients(store: Any) -> list[Any]:
    from snapstore.clients import Client
    from snapstore.ops import faults

    nodes = faults.store_nodes(store)
    return [Client(JOB, r, WORLD, store=store, node_id=nodes[r], timeout=60) for r in range(WORLD)]


def _save(clients: list[Any], step: int) -> None:
    futs = [c.save(step, make_state(c.rank, step, NBYTES)) for c in clients]
    for f in futs:
        f.result(60)


def _steps(url: str) -> list[int]:
    return [s.step for s in persist.list_steps(url, JOB)]


def _at_url(url: str, step: int) -> bool:
    return step in _steps(url)


def test_a_store_flushes_to_a_url_and_a_second_store_restores_from_it(
    url: str, local: str, tmp_path: Any
) -> None:
    import snapstore
    from snapstore.cli import main
    from snapstore.errors import PersistFailedError
    from snapstore.ops import faults

    with running_store(persist_dir=url, **SETTINGS) as store:
        assert store.config.persist_dir == url  # a URL is kept as given, not made a path
        nodes = faults.store_nodes(store)
        clients = _clients(store)
        for step in range(1, 7):
            _save(clients, step)
            if step % 2 == 0:  # persist_every=2: each even step is flushed
                wait_for(partial(_at_url, url, step), 60, f"step {step} at the URL")
        assert _steps(url) == [4, 6]  # retention: the last 2
        # No renames at a URL: complete steps and nothing else, no .partial or .trash.
        assert sorted(os.listdir(os.path.join(local, JOB))) == ["step-4", "step-6"]
        listed = job_status(store, JOB)["persisted"]
        assert [p["path"] for p in listed] == [persist.step_dir(url, JOB, s) for s in (4, 6)]

        # A flush failing midway: the step stays without its manifest, not a step.
        _save(clients, 7)
        faults.fail_persist(nodes[1], after_bytes=1000, store=store)
        try:
            with pytest.raises(PersistFailedError, match="injected write failure"):
                clients[0].persist(timeout=60)
        finally:
            faults.fail_persist(nodes[1], store=store)
        assert _steps(url) == [4, 6]
        assert os.path.isdir(os.path.join(local, JOB, "step-7"))
        assert not os.path.exists(os.path.join(local, JOB, "step-7", persist.MANIFEST_NAME))
        failed = [e for e in events(store, "persist_failed") if e.get("step") == 7]
        assert failed and "previous persisted step is intact" in failed[-1]["message"]
        assert clients[1].persist(timeout=60) == 7
        assert _steps(url) == [6, 7]
        for c in clients:
            c.close()
        snapstore.down(rundir=store.rundir)

        # Whole store down; the newest step's rank 1 object is damaged meanwhile.
        damaged = os.path.join(local, JOB, "step-7", "rank-1.bin")
        with open(damaged, "r+b") as f:
            f.seek(200)
            b = f.read(1)
            f.seek(200)
            f.write(bytes([b[0] ^ 0xFF]))

    out = tmp_path / "offline"  # no store at all: the URL still exports
    argv = ["export", "--job", JOB, "--to", str(out), "--persist-dir", url, "--step", "6"]
    assert main(["--runtime-dir", str(tmp_path), *argv]) == 0
    from snapstore.ops.export import torch_safe

    for r in range(WORLD):
        got = torch.load(out / f"rank-{r}.pt", weights_only=True)
        assert states_equal(torch_safe(make_state(r, 6, NBYTES))[0], got)

    with running_store(persist_dir=url, **SETTINGS) as again:
        clients = _clients(again)
        for c in clients:
            step, state = c.restore()
            assert step == 6 and states_equal(make_state(c.rank, 6, NBYTES), state)
            assert c.last_restore["source"] == "persisted"
            assert c.last_restore["path"] == persist.step_dir(url, JOB, 6)
            (skipped,) = c.last_restore["skipped"]
            assert skipped["step"] == 7 and "rank-1.bin" in skipped["reason"]
        # Training goes on from there, and the next flush replaces the damaged step.
        _save(clients, 7)
        assert clients[0].persist(timeout=60) == 7
        assert _steps(url) == [6, 7]
        for r in range(WORLD):
            buf = persist.read_rank(persist.step_dir(url, JOB, 7), r)  # verified
            assert len(buf) > NBYTES
        for c in clients:
            c.close()


def test_up_refuses_an_unknown_url_before_starting_anything(tmp_path: Any) -> None:
    import snapstore
    from snapstore.errors import ConfigError

    rundir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match="no-such-protocol"):
        snapstore.up(rundir=rundir, persist_dir="no-such-protocol://bucket/x", rest=False)
    assert not os.path.exists(os.path.join(rundir, "store.json"))
