"""The training-framework integrations on one 4-node loopback store, with real failures.

0. The Hugging Face Trainer example: a GPT-2 trainer SIGKILLed mid-save
   resumes bitwise (docs/examples/hf_trainer.py, run as a script).
1. ``dcp.save``, ``dcp.async_save`` and ``dcp.load`` in a 2-rank gloo job.
2. A node is killed while a 4-rank GPT-2 DDP job is inside ``dcp.save``;
   every rank restarts (one on a replacement node), ``dcp.load`` restores
   bitwise and ``dcp.save`` works again on every rank with no extra call.
3. Elastic: a node is lost with no replacement and jobs resume on 3 ranks
   instead of 4 -- replicated (DDP) state stored once per DP group through
   the client, and FSDP2-sharded state through DCP, resharded on load.

Trainer ranks are processes forked from a preloaded forkserver
(tests/gloo_workers.py); the elastic DDP clients run in the test process.
The tests share the store and run in this order (2 and 3 each lose a node).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import events, job_status, running_store, wait_for
from tests.gloo_workers import Ranks, ddp_gpt2_dcp, free_port, fsdp_gpt2_dcp, save_and_load

pytestmark = pytest.mark.cluster

RANKS_TIMEOUT = 240.0
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "docs", "examples", "hf_trainer.py")


@pytest.fixture(scope="module")
def store() -> Iterator[Any]:
    with running_store(nodes=4, k=3, m=1, memory_per_node="64MiB") as s:
        yield s


def _alive(store: Any) -> list[str]:
    from snapstore.ops import faults

    return list(faults.store_nodes(store))


def _configs(store: Any, job: str, nodes: list[str], steps: int, **kw: Any) -> list[dict[str, Any]]:
    port = free_port()
    return [
        {
            "rank": r,
            "world": len(nodes),
            "port": port,
            "job": job,
            "rundir": store.rundir,
            "node": node,
            "steps": steps,
            **kw,
        }
        for r, node in enumerate(nodes)
    ]


def _wait_lost(store: Any, node: str) -> None:
    wait_for(
        lambda: any(n["node_id"] == node and n["status"] == "lost" for n in store.nodes()),
        60,
        f"node {node[:12]} declared lost",
    )


# -- 0. the Hugging Face Trainer example ------------------------------------------------------


def test_hf_trainer_example_resumes_bitwise_after_its_trainer_is_killed(store: Any) -> None:
    steps, kill_at = 12, 5
    done = subprocess.run(
        [
            *(sys.executable, EXAMPLE, "--runtime-dir", store.rundir, "--json"),
            *("--steps", str(steps), "--kill-at", str(kill_at)),
        ],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    clean, resumed = results["clean"], results["resumed"]
    assert clean["resumed_from"] is None and clean["global_step"] == steps
    # Killed right after starting to save step kill_at: that step or the one before committed.
    assert resumed["resumed_from"] in (kill_at - 1, kill_at), resumed
    assert resumed["global_step"] == steps
    assert clean["failed_steps"] == [] and resumed["failed_steps"] == []
    assert resumed["digest"] == clean["digest"]


# -- 1. save, async_save, load ---------------------------------------------------------------


def test_dcp_save_async_save_and_load_over_gloo(store: Any) -> None:
    configs = _configs(store, "dcp", _alive(store)[:2], steps=0)
    with Ranks(save_and_load, configs) as ranks:
        ranks.wait(lambda _: len(ranks.of("done")) == 2, RANKS_TIMEOUT, "the 2-rank job")
    assert ranks.of("done") == {(0, 2): "ok", (1, 2): "ok"}


# -- 2. a node killed inside dcp.save ----------------------------------------------------------


def test_dcp_saves_again_after_a_node_is_killed_inside_dcp_save(store: Any) -> None:
    from snapstore.ops import faults

    job, k = "hf-dcp", 2  # steps 0..k-1 commit; the node dies inside dcp.save of step k
    nodes = _alive(store)
    first = _configs(store, job, nodes, steps=k + 1)
    first[3]["hang_at"] = k  # rank 3 stops inside dcp.save(step k), before staging
    with Ranks(ddp_gpt2_dcp, first) as ranks:
        ranks.wait(
            lambda _: len(ranks.of("saved")) == 4 * k and (3, k) in ranks.of("hanging"),
            RANKS_TIMEOUT,
            "steps committed, then every rank inside dcp.save",
        )
        wait_for(
            lambda: any(
                p["step"] == k and p["staged"] == [0, 1, 2]
                for p in (store.call("job_info", job, 0) or {}).get("pending", [])
            ),
            60,
            f"ranks 0-2 staged step {k}",
        )
        faults.kill_node(nodes[3], store)
        ranks.kill()  # the launcher sees a rank gone and restarts every rank
        committed = ranks.of("saved")
    assert store.call("latest", job) == k - 1

    replacement = faults.add_node(store)
    _wait_lost(store, nodes[3])
    wait_for(
        lambda: (
            job_status(store, job).get("status") == "protected"
            and replacement in str(job_status(store, job)["record"]["groups"])
        ),
        60,
        "the job re-protected onto the replacement",
    )
    failed = [e for e in events(store, "save_failed") if e.get("job") == job]
    assert any(e.get("step") == k for e in failed), failed  # step k is recorded as aborted

    second = _configs(store, job, [*nodes[:3], replacement], steps=k + 2, load=True)
    with Ranks(ddp_gpt2_dcp, second) as ranks:
        ranks.wait(lambda _: len(ranks.of("done")) == 4, RANKS_TIMEOUT, "the restarted job")
    loaded = ranks.of("loaded")
    assert sorted(loaded) == [(r, k - 1) for r in range(4)], loaded
    for r in range(4):
        assert loaded[(r, k - 1)] == committed[(r, k - 1)], f"rank {r} did not load bitwise"
    # The aborted step's number is saved again (the processes restored), then the next.
    assert sorted(ranks.of("saved")) == [(r, s) for r in range(4) for s in (k, k + 1)]
    assert store.call("latest", job) == k + 1


# -- 3. elastic: 4 ranks -> 3 after a node loss with no replacement ------------------------------


def _ddp_state(rank: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 32)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "data_position": torch.tensor([rank]),
    }


def _client(store: Any, job: str, rank: int, nodes: list[str]) -> Any:
    from snapstore.clients import Client, DPGroup

    world = len(nodes)
    dp = DPGroup(rank, tuple(range(world)), replicated=("model/*", "optim/*"))
    return Client(job, rank, world, store=store, node_id=nodes[rank], timeout=60, dp=dp)


@pytest.fixture(scope="module")
def elastic(store: Any) -> dict[str, Any]:
    """Two 4-rank jobs save two steps; then the node of rank 3 is lost, not replaced."""
    from snapstore.ops import faults

    nodes = _alive(store)
    assert len(nodes) == 4, nodes
    with Ranks(fsdp_gpt2_dcp, _configs(store, "fsdp-elastic", nodes, steps=2)) as ranks:
        ranks.wait(lambda _: len(ranks.of("done")) == 4, RANKS_TIMEOUT, "the FSDP job")
    fsdp = ranks.of("saved")
    clients = [_client(store, "ddp-elastic", r, nodes) for r in range(4)]
    for step in range(2):
        futures = [c.save(step, _ddp_state(r)) for r, c in enumerate(clients)]
        for f in futures:
            f.result(60)
    for c in clients:
        c.close()
    faults.kill_node(nodes[3], store)
    _wait_lost(store, nodes[3])
    return {"nodes": nodes[:3], "fsdp": fsdp}


def test_replicated_state_restores_on_fewer_ranks(store: Any, elastic: dict[str, Any]) -> None:
    import torch

    from snapstore.clients.dp import PLACEHOLDER, DPGroup, shard

    nodes = elastic["nodes"]
    expected = _ddp_state(0)
    # Rank 3, whose node is gone, stored part of the replicated state for all four.
    old = shard(expected, DPGroup(0, (0, 1, 2, 3), ("model/*", "optim/*")))
    assert (PLACEHOLDER, 3) in [old["model"][k] for k in old["model"]], old["model"]
    clients = [_client(store, "ddp-elastic", r, nodes) for r in range(3)]
    for r, c in enumerate(clients):
        step, got = c.restore()
        assert step == 1
        # Rank 3 owned part of the replicated state; it was read from its (rebuilt) buffer.
        for part in ("model", "optim"):
            _assert_equal(got[part], expected[part], f"rank {r} {part}")
        assert torch.equal(got["data_position"], torch.tensor([r]))
    futures = [c.save(2, _ddp_state(r)) for r, c in enumerate(clients)]
    assert [f.result(60) for f in futures] == [2, 2, 2]
    for c in clients:
        c.close()
    # The world-3 step restores too, its replicated state now spread over 3 owners.
    again = [_client(store, "ddp-elastic", r, nodes) for r in range(3)]
    for c in again:
        step, got = c.restore()
        assert step == 2
        _assert_equal(got["model"], expected["model"], "model")
        c.close()


def test_sharded_state_reshards_on_fewer_ranks(store: Any, elastic: dict[str, Any]) -> None:
    configs = _configs(store, "fsdp-elastic", elastic["nodes"], steps=3, load=True)
    with Ranks(fsdp_gpt2_dcp, configs) as ranks:
        ranks.wait(lambda _: len(ranks.of("done")) == 3, RANKS_TIMEOUT, "the FSDP job on 3")
    loaded = ranks.of("loaded")
    assert sorted(loaded) == [(r, 1) for r in range(3)], loaded
    for r in range(3):
        assert loaded[(r, 1)] == elastic["fsdp"][(0, 1)], f"rank {r}: full state differs"
    assert sorted(ranks.of("saved")) == [(r, 2) for r in range(3)]
    assert store.call("latest", "fsdp-elastic") == 2


def _assert_equal(got: Any, want: Any, where: str) -> None:
    import torch

    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert set(got) == set(want), (where, set(got) ^ set(want))
        for key in want:
            _assert_equal(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_equal(g, w, f"{where}/{i}")
    else:
        assert got == want, (where, got, want)
