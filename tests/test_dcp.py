"""torch.distributed.checkpoint over snapstore: a real 2-process gloo job on loopback."""

from __future__ import annotations

import multiprocessing as mp
import socket
from typing import Any

import pytest

from tests.conftest import running_store

pytestmark = pytest.mark.cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model_state(seed: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(8, 16)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "extra": {"epoch": 3}}


def _worker(rank: int, world: int, port: int, rundir: str, nodes: list[str], out: Any) -> None:
    import os

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from snapstore.clients import Client
    from snapstore.clients.dcp import SnapstoreReader, SnapstoreWriter

    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        client = Client("dcp", rank, world, rundir=rundir, node_id=nodes[rank], timeout=60)
        saved = _model_state(seed=1)
        dcp.save(saved, storage_writer=SnapstoreWriter(client), checkpoint_id="step-1")
        dist.barrier()
        fresh = _model_state(seed=2)
        dcp.load(fresh, storage_reader=SnapstoreReader(client))
        ok = all(torch.equal(fresh["model"][k], v) for k, v in saved["model"].items())
        ok = ok and all(
            torch.equal(fresh["optim"]["state"][p][n], t)
            for p, st in saved["optim"]["state"].items()
            for n, t in st.items()
        )
        ok = ok and fresh["extra"]["epoch"] == 3
        # async_save: the same, through DCP's background staging.
        saved2 = _model_state(seed=3)
        dcp.async_save(
            saved2, storage_writer=SnapstoreWriter(client), checkpoint_id="step-2"
        ).result()
        dist.barrier()
        fresh2 = _model_state(seed=4)
        dcp.load(fresh2, storage_reader=SnapstoreReader(client))
        ok = ok and all(torch.equal(fresh2["model"][k], v) for k, v in saved2["model"].items())
        ok = ok and client.latest_step() == 2
        client.close()
        dist.destroy_process_group()
        out.put((rank, ok, ""))
    except Exception as e:  # report to the test, which fails with it
        out.put((rank, False, repr(e)))


def test_dcp_save_async_save_and_load_over_gloo() -> None:
    from snapstore.ops import faults

    with running_store(nodes=4, k=3, m=1, memory_per_node="64MiB") as store:
        nodes = faults.store_nodes(store)
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        port = _free_port()
        procs = [
            ctx.Process(target=_worker, args=(r, 2, port, store.rundir, nodes, out))
            for r in range(2)
        ]
        for p in procs:
            p.start()
        try:
            results = [out.get(timeout=240) for _ in procs]
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
        assert all(ok for _, ok, _ in results), results
