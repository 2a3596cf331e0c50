"""The persisted tier on a real 4-node loopback store (k=3, m=1): flushes, crashes, fallback.

Two stores share one persist directory, one after the other, as a whole
store outage would: the first flushes steps (periodically, on demand, on
SIGTERM), survives a flush that fails midway and an SMP killed mid-flush,
and exports; then it goes down, and the second store restores from disk
bitwise, skips a corrupted step, loses more than m nodes and falls back to
disk again, and trains on. Clients run in the test process pinned to nodes
(``node_id=``), except the SIGTERM rank, a process of its own.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from snapstore import persist
from snapstore.bench.workers import make_state, states_equal
from tests.conftest import events, job_status, running_store, smp_infos, wait_for

pytestmark = pytest.mark.cluster

JOB = "pj"  # trained across both stores
CJ = "cj"  # its newest persisted step gets corrupted
WORLD = 2
NBYTES = 64 << 10
SETTINGS: dict[str, Any] = {
    "nodes": 4,
    "k": 3,
    "m": 1,
    "memory_per_node": "64MiB",
    "persist_every": 4,
    "persist_keep": 2,
    "persist_bandwidth": "16MiB",
}


@pytest.fixture(scope="module")
def pdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="ss-persist-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def store(pdir: str) -> Iterator[Any]:
    with running_store(persist_dir=pdir, **SETTINGS) as s:
        yield s


@pytest.fixture(scope="module")
def nodes(store: Any) -> list[str]:
    from snapstore.ops import faults

    return list(faults.store_nodes(store))


def _client(store: Any, node: str, job: str, rank: int, world: int = WORLD, **kw: Any) -> Any:
    from snapstore.clients import Client

    return Client(job, rank, world, store=store, node_id=node, timeout=60, **kw)


@pytest.fixture(scope="module")
def ranks(store: Any, nodes: list[str]) -> Iterator[list[Any]]:
    clients = [_client(store, nodes[r], JOB, r) for r in range(WORLD)]
    yield clients
    for c in clients:
        c.close()


def _save(clients: list[Any], step: int) -> None:
    futs = [c.save(step, make_state(c.rank, step, NBYTES)) for c in clients]
    for f in futs:
        f.result(60)


def _steps(root: str, job: str) -> list[int]:
    return [s.step for s in persist.list_steps(root, job)]


def _file_state(root: str, job: str, step: int, rank: int) -> Any:
    from snapstore.format.frame import read_frame
    from snapstore.format.pack import unpack

    buf = persist.read_rank(persist.step_dir(root, job, step), rank)
    framed = read_frame(buf, len(buf))
    assert framed.step == step
    return unpack(framed.manifest, framed.data)


def _held(store: Any) -> int:
    return sum(info.held for info in smp_infos(store))


# -- the first store ---------------------------------------------------------------------


def test_periodic_flushes_keep_the_last_k_steps_bitwise(
    store: Any, ranks: list[Any], pdir: str
) -> None:
    assert store.config.persist_dir == pdir
    # One flush per job at a time: one that comes due while another runs flushes the
    # then latest step. Waiting for each makes the steps on disk exact.
    for step in range(1, 5):
        _save(ranks, step)
    wait_for(lambda: _steps(pdir, JOB) == [4], 60, "step 4 on disk")
    for step in range(5, 10):
        _save(ranks, step)
    wait_for(lambda: _steps(pdir, JOB) == [4, 8], 60, "steps 4 and 8 on disk")
    for step in (4, 8):
        for r in range(WORLD):
            assert states_equal(make_state(r, step, NBYTES), _file_state(pdir, JOB, step, r))
    flushed = [e for e in events(store, "persisted") if e.get("job") == JOB]
    assert [e["step"] for e in flushed] == [4, 8]
    assert not flushed[-1].get("removed")
    assert not any(n.endswith(".partial") for n in os.listdir(persist.job_dir(pdir, JOB)))
    listed = job_status(store, JOB)["persisted"]
    assert [p["step"] for p in listed] == [4, 8] and all(p["bytes"] > 0 for p in listed)
    wait_for(lambda: _held(store) == 0, 10, "holds released after the flushes")


def test_persist_on_demand_returns_the_committed_step(
    store: Any, ranks: list[Any], pdir: str
) -> None:
    assert ranks[0].persist(timeout=60) == 9
    assert _steps(pdir, JOB) == [8, 9]  # retention: the last 2
    assert ranks[1].persist(timeout=60) == 9  # already on disk: at once
    removed = [e for e in events(store, "persisted") if e.get("step") == 9][-1].get("removed")
    assert removed == [4]


def test_training_goes_on_while_a_flush_holds_its_slots(
    store: Any, ranks: list[Any], nodes: list[str], pdir: str
) -> None:
    from snapstore.ops import faults

    faults.fail_persist(nodes[0], stall=(0, 60.0), store=store)
    try:
        _save(ranks, 12)  # due: the flush starts, and stalls holding step 12's slots
        wait_for(lambda: _held(store) > 0, 20, "the flush holding its slots")
        for step in (13, 14, 15):
            _save(ranks, step)  # commits go on beside the held slots
        assert store.call("latest", JOB) == 15
        assert job_status(store, JOB)["persisting"] == 12 and _held(store) > 0
    finally:
        faults.fail_persist(nodes[0], store=store)  # the writer goes on
    wait_for(lambda: 12 in _steps(pdir, JOB), 30, "step 12 on disk")
    for r in range(WORLD):  # the held bytes were step 12's, not a later step's
        assert states_equal(make_state(r, 12, NBYTES), _file_state(pdir, JOB, 12, r))
    wait_for(lambda: _held(store) == 0, 10, "holds released")
    step, state = ranks[0].restore()
    assert step == 15 and states_equal(make_state(0, 15, NBYTES), state)
    assert ranks[0].last_restore["source"] == "memory"


def test_a_flush_failing_midway_leaves_the_previous_step_intact(
    store: Any, ranks: list[Any], nodes: list[str], pdir: str
) -> None:
    from snapstore.errors import PersistFailedError
    from snapstore.ops import faults

    before = _steps(pdir, JOB)
    faults.fail_persist(nodes[1], after_bytes=1000, store=store)
    try:
        with pytest.raises(PersistFailedError, match="injected write failure") as info:
            ranks[0].persist(timeout=60)
        assert "rank 1" in str(info.value) or nodes[1][:12] in str(info.value)
    finally:
        faults.fail_persist(nodes[1], store=store)
    assert _steps(pdir, JOB) == before
    for r in range(WORLD):
        assert states_equal(
            make_state(r, before[-1], NBYTES), _file_state(pdir, JOB, before[-1], r)
        )
    assert os.path.isdir(persist.partial_dir(pdir, JOB, 15))  # left for the next flush
    failed = [e for e in events(store, "persist_failed") if e.get("step") == 15]
    assert failed and "previous persisted step is intact" in failed[-1]["message"]
    assert job_status(store, JOB)["persist_error"]
    assert ranks[1].persist(timeout=60) == 15
    assert not os.path.exists(persist.partial_dir(pdir, JOB, 15))
    assert job_status(store, JOB)["persist_error"] is None


def test_an_smp_killed_mid_flush_leaves_the_previous_step_intact(
    store: Any, ranks: list[Any], nodes: list[str], pdir: str
) -> None:
    from snapstore.ops import faults

    before = _steps(pdir, JOB)
    faults.fail_persist(nodes[0], stall=(0, 60.0), store=store)
    _save(ranks, 16)  # due: its flush starts, and rank 0's writer stalls mid-file
    partial = persist.partial_dir(pdir, JOB, 16)
    wait_for(lambda: os.path.exists(os.path.join(partial, "rank-0.bin")), 20, "rank 0 writing")
    faults.kill_smp(nodes[0], store=store)  # a real crash of the writer
    wait_for(
        lambda: [e for e in events(store, "persist_failed") if e.get("step") == 16],
        60,
        "the flush of step 16 failing",
    )
    assert _steps(pdir, JOB) == before
    assert states_equal(make_state(0, before[-1], NBYTES), _file_state(pdir, JOB, before[-1], 0))
    assert os.path.isdir(partial)
    # The restarted SMP re-adopted step 16's memory: the next flush writes it.
    wait_for(lambda: all(n["alive"] for n in store.nodes()), 30, "the SMP back")
    assert ranks[1].persist(timeout=60) == 16
    assert _steps(pdir, JOB) == [before[-1], 16] and not os.path.exists(partial)
    for r in range(WORLD):
        assert states_equal(make_state(r, 16, NBYTES), _file_state(pdir, JOB, 16, r))


def test_second_job_gets_two_persisted_steps(store: Any, nodes: list[str], pdir: str) -> None:
    clients = [_client(store, nodes[2 + r], CJ, r) for r in range(WORLD)]
    for step in (2, 3):  # persist_every=4: only on demand
        _save(clients, step)
        assert clients[0].persist(timeout=60) == step
    assert _steps(pdir, CJ) == [2, 3]
    for c in clients:
        c.close()


def test_sigterm_persists_the_last_committed_step_then_dies(
    store: Any, nodes: list[str], pdir: str
) -> None:
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_sigterm_rank, args=(store.rundir, nodes[3], ready))
    proc.start()
    try:
        assert ready.wait(240), "the rank did not get ready"
        assert _steps(pdir, "sj") == []
        assert proc.pid is not None  # started above
        os.kill(proc.pid, 15)
        proc.join(60)
        # It died of the signal as before: through Ray's driver handler (sys.exit(15)),
        # or by the default action when there is none.
        assert proc.exitcode in (15, -15), proc.exitcode
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
    assert _steps(pdir, "sj") == [3]
    assert states_equal(make_state(0, 3, NBYTES), _file_state(pdir, "sj", 3, 0))


def _sigterm_rank(rundir: str, node: str, ready: Any) -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from snapstore.clients import Client

    client = Client("sj", 0, 1, rundir=rundir, node_id=node, timeout=60, persist_on_sigterm=True)
    for step in (1, 2, 3):
        client.save(step, make_state(0, step, NBYTES)).result(60)
    ready.set()
    time.sleep(120)  # training "goes on" until the signal


def test_export_from_memory_and_from_disk_loads_with_plain_torch(
    store: Any, ranks: list[Any], pdir: str, tmp_path: Any
) -> None:
    from snapstore.cli import main
    from snapstore.ops.export import torch_safe

    _save(ranks, 17)
    out = tmp_path / "mem"
    assert main(["--runtime-dir", store.rundir, "export", "--job", JOB, "--to", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["export.json", "rank-0.pt", "rank-1.pt"]
    for r in range(WORLD):
        got = torch.load(out / f"rank-{r}.pt", weights_only=True)
        assert states_equal(torch_safe(make_state(r, 17, NBYTES))[0], got)
    dcp_dir = tmp_path / "dcp"
    argv = ["export", "--job", JOB, "--step", "16", "--to", str(dcp_dir), "--format", "dcp"]
    assert main(["--runtime-dir", store.rundir, *argv]) == 0  # not in memory: from disk
    _check_dcp(dcp_dir, 16)


def _check_dcp(path: Any, step: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from snapstore.ops.export import torch_safe

    template = {f"rank_{r}": torch_safe(make_state(r, 999, NBYTES))[0] for r in range(WORLD)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(template, storage_reader=FileSystemReader(str(path)), no_dist=True)
    for r in range(WORLD):
        assert states_equal(torch_safe(make_state(r, step, NBYTES))[0], template[f"rank_{r}"])


# -- the whole store goes down; a second one comes up on the same persist directory -----------


def test_whole_store_restart_restores_from_disk_bitwise(
    store: Any, ranks: list[Any], pdir: str, tmp_path: Any
) -> None:
    import snapstore
    from snapstore.cli import main
    from snapstore.ops import faults

    for c in ranks:
        c.close()
    newest = _steps(pdir, JOB)[-1]
    snapstore.down(rundir=store.rundir)
    # No store at all: a persisted step still exports.
    out = tmp_path / "offline"
    argv = ["export", "--job", JOB, "--to", str(out), "--persist-dir", pdir, "--format", "dcp"]
    assert main(["--runtime-dir", store.rundir, *argv]) == 0
    _check_dcp(out, newest)
    # The newest persisted step of CJ is corrupted while the store is down.
    path = os.path.join(persist.step_dir(pdir, CJ, 3), "rank-1.bin")
    with open(path, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))

    with running_store(persist_dir=pdir, **SETTINGS) as again:
        nodes = faults.store_nodes(again)
        from snapstore.server.views import build_view

        view = build_view(again.status())
        assert [p.step for p in view.jobs[JOB].job.persisted] == _steps(pdir, JOB)
        clients = [_client(again, nodes[r], JOB, r) for r in range(WORLD)]
        for c in clients:
            step, state = c.restore()
            assert step == newest and states_equal(make_state(c.rank, step, NBYTES), state)
            assert c.last_restore["source"] == "persisted"
            assert c.last_restore["path"] == persist.step_dir(pdir, JOB, newest)
        assert job_status(again, JOB)["last_restore"]["source"] == "persisted"
        # Training goes on from the persisted step, in memory again.
        assert newest % 4 == 0  # so the next two steps are not due for a periodic flush
        for step in (newest + 1, newest + 2):
            _save(clients, step)
        step, _ = clients[0].restore()
        assert step == newest + 2 and clients[0].last_restore["source"] == "memory"

        _corrupt_step_is_skipped(again, nodes)
        _more_than_m_nodes_lost_falls_back_to_disk(again, nodes, clients, pdir)
        for c in clients:
            c.close()


def _corrupt_step_is_skipped(store: Any, nodes: list[str]) -> None:
    clients = [_client(store, nodes[2 + r], CJ, r) for r in range(WORLD)]
    for c in clients:
        step, state = c.restore()
        assert step == 2 and states_equal(make_state(c.rank, 2, NBYTES), state)
        (skipped,) = c.last_restore["skipped"]
        assert skipped["step"] == 3 and "rank-1.bin" in skipped["reason"]
        assert "checksum" in skipped["reason"]
    bad = [e for e in events(store, "persisted_corrupt") if e.get("job") == CJ]
    assert len(bad) == 1 and bad[0]["step"] == 3
    for c in clients:
        c.close()


def _more_than_m_nodes_lost_falls_back_to_disk(
    store: Any, nodes: list[str], clients: list[Any], pdir: str
) -> None:
    from snapstore.ops import faults

    persisted = clients[0].persist(timeout=60)
    assert persisted % 4 == 2
    _save(clients, persisted + 1)  # memory is ahead of disk (and not due for a flush)
    # Both ranks' homes and one more node: two of four lost, m = 1.
    faults.kill_nodes([nodes[0], nodes[1]], store)
    wait_for(lambda: sum(n["alive"] for n in store.nodes()) == 2, 30, "two nodes seen lost")
    fresh = [_client(store, nodes[2 + r], JOB, r) for r in range(WORLD)]
    for c in fresh:
        step, state = c.restore()
        assert step == persisted and states_equal(make_state(c.rank, step, NBYTES), state)
        assert c.last_restore["source"] == "persisted" and c.last_restore["step"] == persisted
    fell = [e for e in events(store, "fallback") if e.get("job") == JOB]
    assert fell and fell[-1]["step"] == persisted
    assert "neither read nor rebuilt" in fell[-1]["message"]  # says why memory could not
    st = job_status(store, JOB)
    assert st["last_restore"]["source"] == "persisted" and st["last_restore"]["step"] == persisted
    # And the job goes on saving after the persisted step (the lost step is dropped),
    # once the store has declared the nodes lost and re-formed its groups without them.
    wait_for(lambda: sum(n["status"] == "lost" for n in store.nodes()) == 2, 30, "two nodes lost")
    _save(fresh, persisted + 1)
    assert store.call("latest", JOB) == persisted + 1
    for c in fresh:
        c.close()
