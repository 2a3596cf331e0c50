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

    trainer = TorchTrainer(
        train_loop_per_worker,
        scaling_config=one_rank_per_node(4),         # one worker on each of 4 store nodes
        run_config=RunConfig(failure_config=FailureConfig(max_failures=3)),
    )

When Ray Train restarts the worker group after a failure (``FailureConfig``)
-- a worker crashed, or a node was lost with the workers on it -- every
worker comes back into ``train_loop_per_worker`` and ``restore`` returns
the step after the last one all ranks committed. Nothing else is needed:
the first restore of the new group ends what the failed group left pending,
and a rank whose node was lost is rebuilt from parity onto the node its new
worker runs on.

Each worker needs an SMP on its host; :func:`one_rank_per_node` places one
worker on each store node (a worker per node is what the store's
protection assumes: a node loss takes one rank's data, which parity covers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from snapstore.clients.client import Client
from snapstore.clients.future import SaveFuture
from snapstore.control.handle import connect
from snapstore.errors import SnapshotNotFoundError, SnapstoreError

__all__ = ["STORE_NODE_RESOURCE", "RayTrainSnapshots", "one_rank_per_node"]

STORE_NODE_RESOURCE = "snapstore_node"
"""The custom resource every embedded store node has (``snapstore.ops.cluster``)."""


def one_rank_per_node(
    num_workers: int | None = None,
    *,
    rundir: str | None = None,
    cpus_per_worker: float = 1.0,
    **kw: Any,
) -> Any:
    """A Ray Train ``ScalingConfig`` that puts one worker on each of ``num_workers`` store nodes.

    ``num_workers`` defaults to the store's alive nodes. The workers form a
    ``STRICT_SPREAD`` placement group: no two on one node. On the embedded
    cluster each also asks for a little of the ``snapstore_node`` resource,
    which only store nodes have (the head node, which has no SMP, is never
    used); on an attached cluster every node is a store node. After a node
    loss, Ray Train's restart places the group on the surviving nodes and any
    replacement that joined, one worker per node again. ``kw`` go to
    ``ScalingConfig`` (e.g. ``use_gpu=True``).
    """
    from ray.train import ScalingConfig

    store = connect(rundir)
    if num_workers is None:
        num_workers = sum(1 for n in store.nodes() if n["alive"])
    if num_workers < 1:
        raise SnapstoreError("one_rank_per_node: the store has no alive node to place a worker")
    resources: dict[str, float] = {"CPU": cpus_per_worker, **kw.pop("resources_per_worker", {})}
    if store.embedded:
        resources.setdefault(STORE_NODE_RESOURCE, 0.01)
    return ScalingConfig(
        num_workers=num_workers,
        resources_per_worker=resources,
        placement_strategy="STRICT_SPREAD",
        **kw,
    )


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

        Call it in every worker, every time the loop starts. Returns 0 when
        the job has no snapshot yet (a fresh start). ``on_restore(state)``
        runs after a restore, e.g. to load an optimizer's state dict or RNG
        states.
        """
        try:
            step, state = self.client.restore(into=into, timeout=timeout)
        except SnapshotNotFoundError:
            return 0
        if on_restore is not None:
            on_restore(state)
        return step + 1

    def save(self, step: int, state: Any, timeout: float | None = None) -> SaveFuture:
        """Save ``step`` (lazily by default: call :meth:`wait_staged` before the optimizer).

        Raises RestoreRequiredError when the job restarted under this worker:
        let it propagate, Ray Train restarts the worker group.
        """
        return self.client.save(step, state, lazy=self.lazy, timeout=timeout)

    def wait_staged(self, timeout: float | None = None) -> None:
        self.client.wait_staged(timeout)

    def close(self) -> None:
        self.client.close()
