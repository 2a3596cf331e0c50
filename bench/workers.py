"""Trainer stand-ins that run as Ray actors on chosen nodes, for tests and benchmarks.

A :class:`SyntheticRank` holds a deterministic state (tensors and plain
values derived from (rank, step, seed)), saves and restores it through the
real client, and checks restored state bitwise against a regenerated copy,
so a test never has to ship tensors back to the driver to compare them.
"""

from __future__ import annotations

import os
import time
from typing import Any

__all__ = ["SyntheticRank", "make_state", "rank_actor", "states_equal"]


def make_state(rank: int, step: int, nbytes: int, seed: int = 0) -> dict[str, Any]:
    """A state of about ``nbytes`` tensor bytes, a function of (rank, step, seed) only."""
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(hash((seed, rank, step)) & 0x7FFFFFFF)
    n = max(1, nbytes // 4)
    big = torch.randn(n - n // 8, generator=g)
    small = torch.randint(-(2**31), 2**31 - 1, (n // 8,), generator=g, dtype=torch.int32)
    half = torch.randn(257, generator=g).to(torch.bfloat16)
    return {
        "model": {"w": big, "b": small, "h": half, "tied": big[:7]},
        "optim": {"step": step, "lr": 1e-3 * (rank + 1), "betas": (0.9, 0.999)},
        "rng": np.arange(rank, rank + 5, dtype=np.int64),
        "meta": {"rank": rank, "name": f"rank-{rank}", "blob": bytes([rank % 256]) * 3},
    }


def states_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of nested states (tensors by bytes, dtype and shape)."""
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
        )
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(states_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(states_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    return type(a) is type(b) and a == b


class SyntheticRank:
    """One rank of a job: saves synthetic states, restores and verifies them."""

    def __init__(self, job: str, rank: int, world_size: int, rundir: str, nbytes: int) -> None:
        from snapstore.clients.client import Client

        self.job, self.rank, self.world_size, self.nbytes = job, rank, world_size, nbytes
        self.client = Client(job, rank, world_size, rundir=rundir)
        self._hung: Any = None

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        return self.client.node_id

    def save(self, step: int, wait: float | None = 60.0, seed: int = 0) -> dict[str, Any]:
        """Save step ``step``; with ``wait``, wait for its commit. Returns timings."""
        state = make_state(self.rank, step, self.nbytes, seed)
        t0 = time.perf_counter()
        fut = self.client.save(step, state)
        staged = time.perf_counter() - t0
        if wait is None:
            return {"staged": staged}
        fut.result(timeout=wait)
        return {"staged": staged, "committed": time.perf_counter() - t0}

    def save_expect_error(self, step: int, seed: int = 0) -> str:
        """Save and return the error's class and message (or '' if it committed)."""
        try:
            self.save(step, seed=seed)
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return ""

    def start_save_and_hang(self, step: int, seed: int = 0) -> str:
        """Prepare a slot and write half of it, then stop before telling the SMP.

        Stands for a rank that dies in the middle of its staging copy: the
        test kills this process while it "copies".
        """
        from snapstore.format.frame import frame_size
        from snapstore.format.pack import plan

        state = make_state(self.rank, step, self.nbytes, seed)
        layout = plan(state)
        size = frame_size(layout.nbytes, len(layout.manifest(state)))
        lease = self.client._take_lease(size, 60.0)
        seg, _ = self.client._stager.maps.get(lease.path, writable=True)
        seg.array[: size // 2] = 0xAB
        self._hung = seg
        return str(lease.path)

    def restore(self, seed: int = 0) -> dict[str, Any]:
        """Restore the last committed step; report it and whether it is bitwise right."""
        t0 = time.perf_counter()
        step, state = self.client.restore()
        took = time.perf_counter() - t0
        expected = make_state(self.rank, step, self.nbytes, seed)
        return {"step": step, "ok": states_equal(expected, state), "seconds": took}

    def restore_error(self) -> str:
        try:
            self.restore()
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return ""

    def latest(self) -> int | None:
        return self.client.latest_step()


def rank_actor(node_id: str, **options: Any) -> Any:
    """The SyntheticRank actor class pinned to ``node_id`` (hard affinity)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(SyntheticRank).options(
        num_cpus=0,
        max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        **options,
    )
