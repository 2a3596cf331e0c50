"""The client training code calls: save a step, restore the last committed one.

::

    client = Client("gpt", rank=rank, world_size=world)
    fut = client.save(step, {"model": model.state_dict(), "optim": opt.state_dict()})
    ...
    fut.result(timeout=60)          # the step is committed: data and parity stored
    step, state = client.restore()  # after a crash: the last globally committed step

``save`` copies each tensor once into a shared-memory slot of the trainer's
own node, owned by that node's SMP, and returns; the SMP checksums it, the
coordinator has parity computed across nodes and commits the step when every
rank's data and every parity chunk is stored. Nothing is pickled.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from snapstore.config import check_job_name
from snapstore.errors import (
    SaveFailedError,
    SnapshotNotFoundError,
    SnapstoreError,
    StoreTimeoutError,
    UnrecoverableError,
)
from snapstore.lifecycle import Store, connect
from snapstore.rpc import call
from snapstore.segments import Segment
from snapstore.slot import frame_size, read_frame, write_trailer
from snapstore.smp import smp_name

__all__ = ["Client", "SaveFuture"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0


def _ray() -> Any:
    import ray

    return ray


class SaveFuture:
    """The commit of one saved step. ``result()`` waits for it."""

    def __init__(self, client: Client, step: int, staged_ref: Any, started: float) -> None:
        self.client = client
        self.step = step
        self._staged_ref = staged_ref
        self._started = started
        self._outcome: dict[str, Any] | None = None

    def done(self) -> bool:
        if self._outcome is not None:
            return True
        ray = _ray()
        ready, _ = ray.wait([self._staged_ref], timeout=0)
        if not ready:
            return False
        try:
            self.result(timeout=0.001)
        except StoreTimeoutError:
            return False
        except SnapstoreError:
            return True
        return True

    def result(self, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        """Wait until the step is committed and return it.

        Raises SaveFailedError (the step will never commit; the previous one is
        intact) or StoreTimeoutError.
        """
        if self._outcome is not None:
            return self._finish(self._outcome)
        ray = _ray()
        deadline = time.monotonic() + (DEFAULT_TIMEOUT if timeout is None else timeout)
        try:
            ray.get(self._staged_ref, timeout=max(0.001, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            raise StoreTimeoutError(f"step {self.step} was not staged within {timeout} s") from None
        except ray.exceptions.RayError as e:
            self._outcome = {"status": "failed", "reason": f"staging failed: {_cause(e)}"}
            return self._finish(self._outcome)
        coord = self.client.store.coordinator()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreTimeoutError(f"step {self.step} not committed within {timeout} s")
            try:
                reply = ray.get(
                    coord.wait_commit.remote(self.client.job, self.step, min(left, 10.0)),
                    timeout=min(left, 10.0) + 10.0,
                )
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
                logger.info("waiting for commit: %s; retrying", e)
                time.sleep(0.2)
                continue
            if reply["status"] != "pending":
                self._outcome = reply
                self.client._committed(self.step, reply, time.monotonic() - self._started)
                return self._finish(reply)

    def _finish(self, outcome: dict[str, Any]) -> int:
        if outcome["status"] == "committed":
            return self.step
        raise SaveFailedError(
            f"job {self.client.job!r} step {self.step} was not committed: "
            f"{outcome.get('reason', outcome['status'])}; the previous committed step is intact"
        )


def _cause(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    return str(cause if cause is not None else e).strip().splitlines()[-1]


class Client:
    """Save and restore one rank's state of one job. Not thread-safe: one per rank.

    ``node_id`` defaults to the Ray node this process runs on; the client
    stages into that node's SMP. Every call takes a timeout.
    """

    def __init__(
        self,
        job: str,
        rank: int = 0,
        world_size: int = 1,
        *,
        store: Store | None = None,
        rundir: str | None = None,
        node_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        check_job_name(job)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.job = job
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.store = store or connect(rundir)
        self.store.connect_ray()
        ray = _ray()
        self.node_id = node_id or ray.get_runtime_context().get_node_id()
        try:
            self.smp = ray.get_actor(smp_name(self.node_id), namespace=self.store.namespace)
        except ValueError:
            raise SnapstoreError(
                f"no SMP on node {self.node_id[:12]}: is this process on a store node? "
                "(pass node_id= to choose one)"
            ) from None
        self._layout: Any = None
        self._maps: dict[tuple[int, int], Segment] = {}
        self.stats: dict[str, Any] = {"saves": 0, "last_commit_latency": None}

    # -- saving ---------------------------------------------------------------

    def save(self, step: int, state: Any, *, timeout: float | None = None) -> SaveFuture:
        """Stage ``state`` as ``step`` and return the future of its commit."""
        from snapstore.format import plan

        timeout = self.timeout if timeout is None else timeout
        t0 = time.monotonic()
        layout = plan(state, previous=self._layout)
        self._layout = layout
        bound = layout.bind(state)
        manifest = bound.manifest()
        size = frame_size(layout.nbytes, len(manifest))
        slot = self._prepare(step, size, timeout)
        seg = self._map(slot["path"], writable=True)
        bound.copy_into(seg.array[: layout.nbytes])
        write_trailer(seg.array, layout.nbytes, manifest, step)
        ref = self.smp.staged.remote(self.job, self.rank, step, size, self.world_size)
        self.stats["saves"] += 1
        self.stats["last_stage_seconds"] = time.monotonic() - t0
        self.stats["last_bytes"] = size
        return SaveFuture(self, step, ref, t0)

    def _prepare(self, step: int, size: int, timeout: float | None = None) -> dict[str, Any]:
        """Ask this node's SMP for a slot of ``size`` bytes for ``step``."""
        ref = self.smp.prepare.remote(self.job, self.rank, step, size)
        return dict(call(ref, self.timeout if timeout is None else timeout, "SMP.prepare"))

    def _committed(self, step: int, reply: dict[str, Any], latency: float) -> None:
        self.stats["last_commit_latency"] = latency

    # -- restoring ------------------------------------------------------------

    def latest_step(self, timeout: float | None = None) -> int | None:
        """The job's last globally committed step, or None."""
        return self.store.call(
            "latest", self.job, timeout=self.timeout if timeout is None else timeout
        )

    def restore(self, into: Any = None, *, timeout: float | None = None) -> tuple[int, Any]:
        """Return ``(step, state)`` of the last committed step; ``into=`` restores in place.

        Every piece is checked against its checksum; a corrupt piece is
        rebuilt from its stripe group first. Raises SnapshotNotFoundError when
        the job has no committed step, UnrecoverableError when more than m
        chunks of a stripe are lost.
        """
        from snapstore.format import unpack

        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        source = "local"
        for _attempt in range(3):
            left = max(0.1, deadline - time.monotonic())
            plan = call(
                self.store.coordinator().restore_plan.remote(
                    self.job, self.rank, self.node_id, left
                ),
                left + 5,
                "coordinator.restore_plan",
            )
            if not plan["ok"]:
                _raise_plan_error(self.job, self.rank, plan)
            step, size, sums = plan["step"], plan["size"], plan["sums"]
            if plan["local"]:
                res = call(
                    self.smp.open_committed.remote(self.job, self.rank, step, size, sums),
                    left,
                    "SMP.open_committed",
                )
                source = "local"
            else:
                res = call(
                    self.smp.fetch.remote(self.job, self.rank, step, size, sums, plan["home_peer"]),
                    left,
                    "SMP.fetch",
                )
                source = f"node {plan['home'][:12]}"
            if not res["bad"] and res["path"]:
                break
            rep = call(
                self.store.coordinator().repair.remote(self.job, self.rank, step, res["bad"]),
                left,
                "coordinator.repair",
            )
            if not rep["ok"] and rep["error"] == "unrecoverable":
                raise UnrecoverableError(
                    f"job {self.job!r} rank {self.rank} step {step}: pieces {res['bad']} fail "
                    "their checksums and cannot be rebuilt",
                    rep.get("lost", []),
                )
        else:
            raise SnapstoreError(f"job {self.job!r} rank {self.rank}: restore kept failing")
        seg = self._map(res["path"], writable=False)
        framed = read_frame(seg.array, size)
        if framed.step != step:
            raise SnapstoreError(f"slot holds step {framed.step}, expected {step}")
        state = unpack(framed.manifest, framed.data, into=into)
        self.store.coordinator().note_restore.remote(
            self.job,
            self.rank,
            {
                "step": step,
                "source": source,
                "seconds": round(time.monotonic() - t0, 4),
                "node": self.node_id,
            },
        )
        return step, state

    # -- internals ------------------------------------------------------------

    def _map(self, path: str, writable: bool) -> Segment:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        seg = self._maps.get(key)
        if seg is not None and seg.size == st.st_size and (seg.writable or not writable):
            seg.path = path
            return seg
        if seg is not None:
            seg.close()
        seg = Segment.open(path, writable=writable)
        self._maps[key] = seg
        # Keep at most a few mappings: the two slots of this rank, and a restore.
        while len(self._maps) > 4:
            old = next(iter(self._maps))
            self._maps.pop(old).close()
        return seg

    def close(self) -> None:
        for seg in self._maps.values():
            seg.close()
        self._maps.clear()


def _raise_plan_error(job: str, rank: int, plan: dict[str, Any]) -> None:
    kind, message = plan.get("error"), plan.get("message", "")
    if kind == "not_found":
        raise SnapshotNotFoundError(message)
    if kind == "unrecoverable":
        raise UnrecoverableError(message, plan.get("lost", []))
    if kind == "timeout":
        raise StoreTimeoutError(message)
    raise SnapstoreError(f"job {job!r} rank {rank}: {message or kind}")
