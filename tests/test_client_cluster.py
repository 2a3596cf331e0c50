"""The client on a real 4-node loopback store: lazy saves, deltas, DP shards, bitwise resume.

Clients run in the test process, each pinned to a store node with
``node_id=`` (the node's slots are files on this same host). One store
serves the module and tests run in order: the one that kills a node comes
last (its loss changes the store's membership for a while after it ends).
"""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
import pytest
import torch

from snapstore.errors import SaveFailedError
from tests.conftest import running_store, wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def store() -> Any:
    with running_store(nodes=4, k=3, m=1, memory_per_node="256MiB") as s:
        yield s


@pytest.fixture(scope="module")
def nodes(store: Any) -> list[str]:
    from snapstore.ops import faults

    return list(faults.store_nodes(store))


def _client(store: Any, node: str, job: str, rank: int = 0, world: int = 1, **kw: Any) -> Any:
    from snapstore.clients import Client

    return Client(job, rank, world, store=store, node_id=node, timeout=60, **kw)


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(64, 32),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 8, 64),
        torch.nn.GELU(),
        torch.nn.LayerNorm(64),
        torch.nn.Linear(64, 64),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, 64, (16, 8), generator=g)
    y = torch.randint(0, 64, (16,), generator=g)
    return x, y


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    x, y = _batch(step)
    # Dropout-free model, but RNG still consumed to prove RNG state is restored.
    noise = torch.rand(1).item() * 1e-6
    loss = torch.nn.functional.cross_entropy(model(x), y) + noise
    loss.backward()


def _state(model: Any, opt: Any, step: int) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "np_rng": np.random.get_state(),
        "step": step,
    }


def test_resumed_training_is_bitwise_identical(store: Any, nodes: list[str]) -> None:
    steps, crash_at = 12, 7
    # Reference: never interrupted.
    model, opt = _model()
    torch.manual_seed(5)
    random.seed(5)
    for step in range(steps):
        _train_step(model, opt, step)
        opt.step()
        opt.zero_grad()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    ref_opt = opt.state_dict()

    # With snapshots every step (lazy copies), a "crash" after crash_at steps.
    client = _client(store, nodes[0], "resume")
    model, opt = _model()
    torch.manual_seed(5)
    random.seed(5)
    futures = []
    for step in range(crash_at):
        _train_step(model, opt, step)
        client.wait_staged()
        opt.step()
        opt.zero_grad()
        futures.append(client.save(step, _state(model, opt, step), lazy=True))
    assert futures[-1].result(60) == crash_at - 1
    client.close()
    del model, opt

    # A new process would start from scratch: fresh objects, restore in place.
    client = _client(store, nodes[0], "resume")
    model, opt = _model()
    for step in range(3):  # make the live state differ from the snapshot
        _train_step(model, opt, step)
        opt.step()
        opt.zero_grad()
    live = _state(model, opt, -1)
    resumed, restored = client.restore(into=live)
    assert resumed == crash_at - 1
    assert restored["model"]["0.weight"] is live["model"]["0.weight"]  # in place
    model.load_state_dict(restored["model"])
    opt.load_state_dict(restored["optim"])
    torch.set_rng_state(restored["rng"]["torch"])
    random.setstate(restored["rng"]["python"])
    np.random.set_state(restored["np_rng"])
    for step in range(resumed + 1, steps):
        _train_step(model, opt, step)
        client.wait_staged()
        opt.step()
        opt.zero_grad()
        client.save(step, _state(model, opt, step), lazy=True)
    client.wait_staged()
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k
    got = opt.state_dict()
    for pid, st in ref_opt["state"].items():
        for name, t in st.items():
            assert torch.equal(got["state"][pid][name], t), (pid, name)
    client.close()


def test_data_parallel_state_is_stored_once(store: Any, nodes: list[str]) -> None:
    from snapstore.clients.dp import DPGroup

    torch.manual_seed(2)
    shared = {f"w{i}": torch.randn(32 * 1024) for i in range(8)}
    clients, sizes = [], []
    for r in range(2):
        dp = DPGroup(index=r, ranks=(0, 1), replicated=("model/*",))
        clients.append(_client(store, nodes[r + 2], "dp", r, 2, dp=dp))
    futs = []
    for r, c in enumerate(clients):
        state = {
            "model": {k: v.clone() for k, v in shared.items()},
            "rank_local": torch.full((4,), r),
        }
        futs.append(c.save(1, state))
    for f in futs:
        f.result(60)
        sizes.append(f.stats["bytes_total"])
    whole = sum(v.numel() * 4 for v in shared.values())
    assert all(s < 0.7 * whole for s in sizes), (sizes, whole)
    for r, c in enumerate(clients):
        step, got = c.restore()
        assert step == 1
        for k, v in shared.items():
            assert torch.equal(got["model"][k], v), (r, k)
        assert torch.equal(got["rank_local"], torch.full((4,), r))
        c.close()


def test_skip_policy_and_backpressure_metrics(store: Any, nodes: list[str]) -> None:
    """A save while the previous one is still committing: skipped, or waits for it.

    Step 1 of a two-rank job cannot commit until rank 1 saves it, so rank 0's
    next save meets a previous save in flight every time, whatever the timing.
    """
    import threading

    small = {"x": torch.arange(1024, dtype=torch.float32)}
    skip0 = _client(store, nodes[3], "skip", 0, 2, policy="skip")
    skip1 = _client(store, nodes[2], "skip", 1, 2)
    first = skip0.save(1, small)
    second = skip0.save(2, small)
    assert second.skipped and skip0.metrics["skipped"] == 1
    with pytest.raises(SaveFailedError, match="skipped"):
        second.result(5)
    assert not first.done()
    skip1.save(1, small).result(60)
    assert first.result(60) == 1

    wait0 = _client(store, nodes[3], "wait", 0, 2)
    wait1 = _client(store, nodes[2], "wait", 1, 2)
    wait0.save(1, small)
    saved: list[Any] = []
    blocked = threading.Thread(target=lambda: saved.append(wait0.save(2, small)))
    blocked.start()
    time.sleep(0.5)
    assert blocked.is_alive(), "policy 'wait' must wait for step 1 before staging step 2"
    wait1.save(1, small).result(60)
    blocked.join(60)
    assert not blocked.is_alive() and saved
    assert wait0.metrics["waits"] == 1 and wait0.metrics["wait_seconds"] >= 0.4
    assert wait0.metrics["skipped"] == 0
    wait1.save(2, small)
    assert saved[0].result(60) == 2
    for c in (skip0, skip1, wait0, wait1):
        c.close()


def test_errors_are_clear(store: Any, nodes: list[str]) -> None:
    from snapstore.errors import SnapshotNotFoundError, UnsupportedTypeError

    c = _client(store, nodes[3], "errors")
    with pytest.raises(SnapshotNotFoundError):
        c.restore()
    with pytest.raises(UnsupportedTypeError, match=r"\['bad'\]"):
        c.save(1, {"bad": object()})
    c.save(1, {"ok": torch.ones(3)}).result(60)
    with pytest.raises(ValueError, match="not after"):
        c.save(1, {"ok": torch.ones(3)})
    c.close()


def test_job_control_reads_the_job_and_ends_steps_in_flight(store: Any, nodes: list[str]) -> None:
    from snapstore.clients import JobControl
    from snapstore.errors import SnapshotNotFoundError

    small = {"x": torch.arange(256, dtype=torch.float32)}
    r0 = _client(store, nodes[0], "ctl", 0, 2)
    r1 = _client(store, nodes[1], "ctl", 1, 2)
    r0.save(1, small)
    r1.save(1, small).result(60)
    ctl = JobControl("ctl", store=store)
    assert ctl.latest() == 1
    pending = r0.save(2, small)  # rank 1 never saves step 2: it stays in flight
    wait_for(lambda: 2 in ctl.info()["pending_steps"], 30, "step 2 in flight")
    assert ctl.abort_pending("the scheduler preempts the job") == [2]
    with pytest.raises(SaveFailedError, match="the scheduler preempts the job"):
        pending.result(30)
    info = ctl.info()
    assert info["latest_step"] == 1 and info["phase"] == "active"
    kinds = [e["kind"] for e in ctl.events(20)]
    assert "commit" in kinds and "save_failed" in kinds
    with pytest.raises(ValueError, match="reason"):
        ctl.abort_pending("  ")
    with pytest.raises(SnapshotNotFoundError, match="no job 'never'"):
        JobControl("never", store=store).info()
    for c in (r0, r1):
        c.close()


def test_delta_moves_few_bytes_and_parity_stays_right(store: Any, nodes: list[str]) -> None:
    from snapstore.ops import faults

    torch.manual_seed(1)
    world = 3
    states: list[dict[str, Any]] = [
        {f"t{i}": torch.randn(64 * 1024) for i in range(20)} | {"step": 0} for _ in range(world)
    ]
    clients = [_client(store, nodes[r], "delta", r, world) for r in range(world)]
    for step in range(6):
        futs = []
        for r, c in enumerate(clients):
            st = states[r]
            if step:
                for i in (r, 7):  # 2 of 20 tensors change per step: 10%
                    st[f"t{i}"].add_(1.0)
            st["step"] = step
            futs.append(c.save(step, st))
        for f in futs:
            f.result(60)
        if step >= 3:
            total = sum(f.stats["bytes_total"] for f in futs)
            copied = sum(f.stats["bytes_copied"] for f in futs)
            network = futs[0].stats["peer_bytes"]
            assert futs[0].stats["delta"], futs[0].stats
            # Full snapshot: stage everything, send everything to m=1 parity holder.
            assert copied + network <= 0.15 * (2 * total), (copied, network, total)
    # Every tensor changed: parity is encoded in full (cheaper than from
    # deltas), yet the next step goes back to deltas against this one.
    for step in (6, 7):
        futs = []
        for r, c in enumerate(clients):
            for i in range(20) if step == 6 else (r,):
                states[r][f"t{i}"].add_(1.0)
            states[r]["step"] = step
            futs.append(c.save(step, states[r]))
        for f in futs:
            f.result(60)
        assert futs[0].stats["delta"] is (step == 7), (step, futs[0].stats)
    # Parity built from deltas must rebuild a lost node bitwise.
    faults.kill_node(nodes[1], store)
    c = _client(store, nodes[2], "delta", 1, world)
    step, got = c.restore(timeout=60)
    assert step == 7
    for k, v in states[1].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(got[k], v), k
    for cl in [*clients, c]:
        cl.close()
