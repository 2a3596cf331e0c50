"""Snapshots from a Ray Train ``TorchTrainer`` loop: restore on (re)start, save every step.

::

    def train_loop_per_worker(config):
        snaps = RayTrainSnapshots("my-job")          # rank and world size from Ray Train
        model, opt = build()
        state = {"model": model.state_dict(), "optim": opt.state_dict()}
        start = snaps.restore(into=state, on_restore=lambda s: opt.load_state_dict(s["optim"]))
        for step in range(start, config["steps"]):
            loss = model(batch(step)).loss
            loss.backward()
            snaps.wait_staged()                      # before the optimizer changes parameters
            opt.step()
            opt.zero_grad()
            snaps.save(step, {"model": model.state_dict(), "optim": opt.state_dict()})

When Ray Train restarts the worker group after a failure (``FailureConfig``),
every worker comes back into ``train_loop_per_worker`` and ``restore``
returns the step after the last one all ranks committed. Place workers on
store nodes (each needs its node's SMP): on the embedded cluster, ask for
``resources_per_worker={"snapstore_node": 0.01}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from snapstore.clients.client import Client
from snapstore.clients.future import SaveFuture
from snapstore.errors import SnapshotNotFoundError

__all__ = ["RayTrainSnapshots"]


class RayTrainSnapshots:
    """A :class:`Client` for this Ray Train worker (rank and world size from Ray Train)."""

    def __init__(self, job: str, *, rundir: str | None = None, lazy: bool = True, **kw: Any):
        import ray.train

        ctx = ray.train.get_context()
        self.lazy = lazy
        self.client = Client(job, ctx.get_world_rank(), ctx.get_world_size(), rundir=rundir, **kw)

    def restore(
        self,
        into: Any = None,
        on_restore: Callable[[Any], None] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Restore the last committed step into ``into``; return the step to train next.

        Returns 0 when the job has no snapshot yet (a fresh start).
        ``on_restore(state)`` runs after a restore, e.g. to load an
        optimizer's state dict or RNG states.
        """
        try:
            step, state = self.client.restore(into=into, timeout=timeout)
        except SnapshotNotFoundError:
            return 0
        if on_restore is not None:
            on_restore(state)
        return step + 1

    def save(self, step: int, state: Any, timeout: float | None = None) -> SaveFuture:
        """Save ``step`` (lazily by default: call :meth:`wait_staged` before the optimizer)."""
        return self.client.save(step, state, lazy=self.lazy, timeout=timeout)

    def wait_staged(self, timeout: float | None = None) -> None:
        self.client.wait_staged(timeout)

    def close(self) -> None:
        self.client.close()
