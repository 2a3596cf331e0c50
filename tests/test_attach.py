"""`snapstore up --address`: attach to a Ray cluster it did not start, and leave it running."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

pytestmark = pytest.mark.cluster


def test_attach_then_down_leaves_the_cluster_running() -> None:
    import ray
    import torch

    import snapstore
    from snapstore.clients import Client
    from snapstore.control.handle import ProcessRef, use_ray_token
    from snapstore.errors import FaultInjectionError
    from snapstore.ops.cluster import kill_tree, start_head, start_worker
    from snapstore.private import create_private

    tmp = tempfile.mkdtemp(prefix="ss-att-", dir="/tmp")
    rundir = os.path.join(tmp, "rt")
    procs: list[ProcessRef] = []
    # The operator's Ray token: this process presents it, as `ray start` users do.
    token = os.path.join(tmp, "ray-token")
    create_private(token, b"a" * 64)
    try:
        # A Ray cluster of our own, as an operator would have (token authentication on):
        # head + 3 workers.
        gcs, head = start_head(
            os.path.join(tmp, "ray"), 100 << 20, control=False, ray_token_file=token
        )
        procs += head.procs
        for _ in range(3):
            procs += start_worker(
                gcs, os.path.join(tmp, "ray"), 100 << 20, 2, ray_token_file=token
            ).procs
        store = snapstore.up(
            address=gcs, k=2, m=2, memory_per_node="64MiB", rundir=rundir, rest=False
        )
        assert not store.embedded
        # up copied the operator's token beside the state file, for the store's clients.
        assert store.ray_token_file
        with open(store.ray_token_file) as f:
            assert f.read() == "a" * 64
        nodes = snapstore.nodes(rundir)
        # One SMP per alive Ray node; the head is a plain Ray node here, so it has one too.
        assert len(nodes) == 4 and all(n["alive"] for n in nodes)
        client = Client("att", 0, 1, store=store, node_id=nodes[0]["node_id"])
        state = {"w": torch.arange(1000, dtype=torch.float32)}
        client.save(1, state).result(60)
        step, got = client.restore()
        assert step == 1 and torch.equal(got["w"], state["w"])
        client.close()
        from snapstore.ops import faults

        with pytest.raises(FaultInjectionError):
            faults.kill_node(nodes[1]["node_id"], store)
        snapstore.down(rundir=rundir)
        # Our Ray cluster still runs, and snapstore's actors and memory are gone.
        assert all(p.current() for p in procs)
        use_ray_token(token)
        ray.init(address=gcs, namespace="snapstore", logging_level="ERROR")
        try:
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
            assert not [n for n in names if n.startswith("snapstore-")]
        finally:
            ray.shutdown()
        assert not os.path.exists(os.path.join("/dev/shm", f"snapstore-{store.store_id}"))
    finally:
        import contextlib

        with contextlib.suppress(Exception):
            snapstore.down(rundir=rundir)
        import ray as _ray

        if _ray.is_initialized():
            _ray.shutdown()
        kill_tree(procs)
        shutil.rmtree(tmp, ignore_errors=True)
