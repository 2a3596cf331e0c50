"""Data-parallel GPT training on the embedded cluster, with failures injected and recovered.

:class:`GPTRank` is one rank: a Ray actor pinned to a store node that trains
the small GPT of :mod:`snapstore.bench.gpt` with DDP over gloo and saves a snapshot
every step (lazily: the copy overlaps the next forward and backward). The
optimizer state and parameters are replicated across ranks, so each rank
stores only its share of them (data-parallel de-duplication).

:func:`run` is the launcher (what torchelastic or Ray Train is to a user's
job): it starts the ranks, injects failures at set steps (a trainer process
killed, an SMP killed, a whole node killed), notices, replaces the failed
ranks, has every rank restore the last committed step, and trains on. It
calls nothing of the store's between a failure and the restores: ending the
failed incarnation's pending steps and rebuilding lost ranks happen in the
store when ranks restore. It measures, per failure, the time to detect, to
restore, and the steps of work lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["KINDS", "Failure", "GPTRank", "RankSpec", "RunReport", "run"]


KINDS = ("trainer", "smp", "node", "nodes", "corrupt", "stall")


@dataclass
class Failure:
    """A failure to inject when rank 0 reaches ``at_step``.

    Kinds: ``trainer`` (SIGKILL rank ``rank``'s process), ``smp`` (SIGKILL the
    SMP of its node; Ray restarts it), ``node`` (SIGKILL its whole node;
    the rank restarts on a replacement node), ``nodes`` (``count`` nodes at
    once, ranks ``rank`` .. ``rank + count - 1``), ``corrupt`` (flip a byte of
    the rank's last committed snapshot, then kill its trainer, so the
    restore must detect and repair it), ``stall`` (freeze the SMP of its node
    with SIGSTOP for ``seconds``: a healthy node that stops answering; nothing
    is restarted, and nothing should be lost or rolled back).
    """

    kind: str
    at_step: int
    rank: int = 1
    count: int = 1
    seconds: float = 3.0
    # Filled in when it happens:
    injected_at: float = 0.0
    injected_perf: float = field(default=0.0, repr=False)
    step_reached: int = 0
    detect_seconds: float | None = None
    store_detect_seconds: float | None = None
    restart_seconds: float | None = None
    restore_seconds: float | None = None
    resumed_step: int | None = None
    steps_lost: int = 0
    bytes_rebuilt: int = 0
    downtime_seconds: float | None = None
    replacement: str = ""
    """The node a lost node's rank restarted on."""
    note: str = ""


@dataclass
class RunReport:
    job: str
    steps: int
    world: int
    seconds: float = 0.0
    losses: dict[int, float] = field(default_factory=dict)
    digests: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    saves_failed: int = 0
    step_seconds: float | None = None
    state_bytes: int = 0
    baseline: dict[str, Any] | None = None
    memory_used: list[int] = field(default_factory=list)
    """Bytes each alive store node held once the run's last step committed."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["losses"] = {str(k): v for k, v in sorted(self.losses.items())}
        return d


@dataclass(frozen=True)
class RankSpec:
    """What every rank of a run is given: where to save and how big its state is."""

    job: str
    rundir: str | None
    cfg: dict[str, Any] = field(default_factory=dict)
    snapshot: bool = True
    ballast_bytes: int = 0
    baseline: dict[str, Any] | None = None


def _rendezvous(spec: RankSpec) -> str:
    """A fresh file rendezvous for one process group of the run.

    A file, not a TCP port: a port chosen free can be taken by another
    process before rank 0 binds it. The ranks share this host's /tmp (the
    embedded cluster); across hosts, use a TCP or etcd rendezvous instead.
    """
    import uuid

    base = os.path.join(spec.rundir or "/tmp", "rendezvous")
    os.makedirs(base, exist_ok=True)
    return "file://" + os.path.join(base, uuid.uuid4().hex)


class GPTRank:
    """One data-parallel rank. Threaded actor: ``progress`` answers while ``train`` runs."""

    def __init__(self, rank: int, world: int, rendezvous: str, spec: RankSpec) -> None:
        import torch

        from snapstore.bench.gpt import GPTConfig, make_model

        torch.set_num_threads(1)  # several ranks share two cores
        self.rank, self.world = rank, world
        self._epoch = 0
        self._training = threading.Lock()
        self.cfg = GPTConfig(**spec.cfg)
        # A checkpointing baseline instead of snapstore: {"kind": "torch" | "dcp",
        # "every": N, "dir": where}. torch.save goes to this node's own disk.
        self.baseline = spec.baseline
        self.join(rendezvous)
        self.model, self.opt = make_model(self.cfg, seed=0)
        # Per-rank state standing for a bigger model's bytes: touched every step,
        # so every step's snapshot must carry it.
        n = spec.ballast_bytes // 4
        self.ballast = torch.full((n,), float(rank)) if n else None
        self.client: Any = None
        if spec.snapshot:
            from snapstore.clients import Client, DPGroup

            dp = DPGroup(rank, tuple(range(world)), replicated=("model/*", "optim/*"))
            self.client = Client(spec.job, rank, world, rundir=spec.rundir, dp=dp, timeout=120)
        self.step = 0
        self.losses: dict[int, float] = {}
        self.saves_failed = 0
        self.step_times: list[float] = []
        self.stalls: list[float] = []
        self.protected_after: list[float] = []
        self._dcp_future: Any = None

    def join(self, rendezvous: str) -> None:
        """(Re)join the data-parallel group: after a peer died, survivors join a new one.

        An interrupted ``train`` call that returns late (its collective
        failed) finds the epoch changed and leaves the model alone; one
        still blocked in a collective of the old group cannot be ended from
        here, and the driver replaces that process (see ``_recover``).
        """
        from datetime import timedelta

        import torch.distributed as dist

        self._epoch += 1
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        dist.init_process_group(
            "gloo",
            init_method=rendezvous,
            rank=self.rank,
            world_size=self.world,
            timeout=timedelta(seconds=JOIN_TIMEOUT),
        )
        # dcp.async_save runs collectives from its own thread while training
        # all-reduces: on one gloo group their messages would interleave.
        self._dcp_group = dist.new_group(backend="gloo") if self._uses_dcp() else None

    def pid(self) -> int:
        return os.getpid()

    def job_name(self) -> str:
        return str(self.client.job) if self.client is not None else ""

    def node(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def progress(self) -> int:
        return self.step

    def _state(self) -> dict[str, Any]:
        import torch

        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optim": self.opt.state_dict(),
            "rng": torch.get_rng_state(),
            "step": self.step,
            "data_position": self.step,  # batches are a function of the step
        }
        if self.ballast is not None:
            state["ballast"] = self.ballast
        return state

    def restore(self) -> dict[str, Any]:
        """Restore the last committed step in place; continue after it."""
        import torch

        from snapstore.errors import SnapshotNotFoundError

        t0 = time.perf_counter()
        # The interrupted train call must be out before the state is replaced.
        if not self._training.acquire(timeout=90):
            raise RuntimeError("the interrupted training step did not end")
        self._training.release()
        try:
            step, state = self.client.restore(into=self._state())
        except SnapshotNotFoundError:
            return {"step": None, "seconds": time.perf_counter() - t0}
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optim"])
        self.opt.zero_grad(set_to_none=True)  # an interrupted step may have left gradients
        torch.set_rng_state(state["rng"])
        self.step = int(state["data_position"]) + 1
        return {"step": step, "seconds": time.perf_counter() - t0}

    def train(self, until: int) -> dict[str, Any]:
        """Train up to step ``until``; return early when the rank is regrouped (see join)."""
        with self._training:
            return self._train(until, self._epoch)

    def _train(self, until: int, epoch: int) -> dict[str, Any]:
        from snapstore.bench.gpt import batch
        from snapstore.errors import SnapstoreError

        while self.step < until and epoch == self._epoch:
            t0 = time.perf_counter()
            x, y = batch(self.cfg, self.step, self.rank)
            loss = self._loss(x, y)
            loss.backward()
            self._average_gradients()
            if epoch != self._epoch:
                break  # regrouped while reducing: this step's gradients are void
            if self.client is not None:
                with contextlib.suppress(SnapstoreError):
                    self.client.wait_staged()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.ballast is not None:
                self.ballast[self.step % len(self.ballast)] += 1.0  # changes every step
            self.losses[self.step] = float(loss.item())
            if self.client is not None:
                try:
                    self.client.save(self.step, self._state(), lazy=True)
                except SnapstoreError:
                    self.saves_failed += 1  # e.g. the SMP is restarting; the next step saves
            elif self.baseline is not None and self.step % int(self.baseline["every"]) == 0:
                self._baseline_save()
            self.step += 1
            self.step_times.append(time.perf_counter() - t0)
        if self.client is not None:
            with contextlib.suppress(SnapstoreError):
                self.client.wait_staged()
        return {"step": self.step, "losses": self.losses, "saves_failed": self.saves_failed}

    def _baseline_save(self) -> None:
        """torch.save (with fsync) to this node's disk, or dcp.async_save, every N steps."""
        import torch

        assert self.baseline is not None
        t0 = time.perf_counter()
        if self.baseline["kind"] == "torch":
            d = os.path.join(self.baseline["dir"], self.node()[:12])
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, f"rank{self.rank}-step{self.step}.pt")
            with open(path + ".tmp", "wb") as f:
                torch.save(self._state(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + ".tmp", path)
            self.stalls.append(time.perf_counter() - t0)
            self.protected_after.append(time.perf_counter() - t0)
        else:
            import torch.distributed.checkpoint as dcp

            if self._dcp_future is not None:
                self._dcp_future.result()  # one checkpoint in flight at a time
            ckpt = os.path.join(self.baseline["dir"], f"step-{self.step}")
            fut: Any = dcp.async_save(
                self._dcp_state(), checkpoint_id=ckpt, process_group=self._dcp_group
            )
            self.stalls.append(time.perf_counter() - t0)

            def protected(_f: Any, t: float = t0) -> None:
                self.protected_after.append(time.perf_counter() - t)

            fut.add_done_callback(protected)
            self._dcp_future = fut

    def _uses_dcp(self) -> bool:
        return self.baseline is not None and self.baseline["kind"] == "dcp"

    def _dcp_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.model.state_dict(), "optim": self.opt.state_dict()}
        if self.ballast is not None:
            state["ballast"] = self.ballast
        return state

    def baseline_restore_seconds(self, step: int) -> float:
        """Time to load this rank's baseline checkpoint of ``step`` (the baseline's restore)."""
        import torch

        assert self.baseline is not None
        t0 = time.perf_counter()
        if self.baseline["kind"] == "torch":
            d = os.path.join(self.baseline["dir"], self.node()[:12])
            torch.load(os.path.join(d, f"rank{self.rank}-step{step}.pt"), weights_only=True)
        else:
            import torch.distributed.checkpoint as dcp

            if self._dcp_future is not None:
                self._dcp_future.result()
            dcp.load(
                self._dcp_state(),
                checkpoint_id=os.path.join(self.baseline["dir"], f"step-{step}"),
                process_group=self._dcp_group,
            )
        return time.perf_counter() - t0

    def baseline_stats(self) -> dict[str, Any]:
        if self._dcp_future is not None:
            with contextlib.suppress(Exception):
                self._dcp_future.result()
        return {"stalls": list(self.stalls), "protected_after": list(self.protected_after)}

    def _loss(self, x: Any, y: Any) -> Any:
        return self.model.loss(x, y)

    def _average_gradients(self) -> None:
        """All-reduce gradients as one flat buffer in parameter order.

        Not DDP: DDP re-buckets gradients after its first iteration, and a
        restarted job's first iteration would then sum in another order than
        the uninterrupted run did; one fixed buffer keeps the arithmetic,
        and so the result, bitwise the same across restarts.
        """
        import torch
        import torch.distributed as dist

        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        at = 0
        for g in grads:
            g.copy_(flat[at : at + g.numel()].view_as(g))
            at += g.numel()

    def train_losses(self) -> list[tuple[int, float]]:
        return sorted(self.losses.items())

    def wait_committed(self, timeout: float = 60.0) -> int | None:
        """Wait until the last save is committed; return the job's latest step."""
        if self.client is None:
            return None
        fut = self.client._inflight
        if fut is not None:
            with contextlib.suppress(Exception):
                fut.result(timeout)
        return self.client.latest_step()

    def latest_committed(self) -> int | None:
        """The job's latest committed step, as the store says."""
        return None if self.client is None else self.client.latest_step()

    def digest(self) -> str:
        """SHA-256 over parameters and optimizer state, bitwise."""
        import torch

        h = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
        for pid, st in sorted(self.opt.state_dict()["state"].items()):
            for name, t in sorted(st.items()):
                h.update(f"{pid}.{name}".encode())
                if isinstance(t, torch.Tensor):
                    h.update(t.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def timing(self) -> list[float]:
        return list(self.step_times)

    def state_bytes(self) -> int:
        if self.client is None or self.client._layout is None:
            return 0
        return int(self.client._layout.nbytes)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close(timeout=30)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


REGROUP_ATTEMPTS = 3
"""Tries at forming the new process group after a failure (see ``_recover``)."""
JOIN_TIMEOUT = 60
"""Seconds a rank waits for the others at a group's rendezvous (and in each collective)."""


def _start_rank(rank: int, node: str, world: int, rendezvous: str, spec: RankSpec) -> Any:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return (
        ray.remote(GPTRank)
        .options(
            num_cpus=0,
            max_concurrency=2,
            max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        )
        .remote(rank, world, rendezvous, spec)
    )


def _stop(ranks: list[Any]) -> None:
    import ray

    for r in ranks:
        with contextlib.suppress(Exception):
            ray.kill(r, no_restart=True)


def run(
    store: Any,
    job: str,
    steps: int,
    failures: list[Failure],
    cfg: dict[str, Any],
    world: int = 4,
    snapshot: bool = True,
    ballast_bytes: int = 0,
    baseline: dict[str, Any] | None = None,
    on_progress: Callable[[int, str], None] | None = None,
) -> RunReport:
    """Train ``steps`` steps on ``world`` ranks (one per store node), injecting ``failures``.

    Recovery follows the surviving-ranks model (as torchft does): failed
    ranks' processes are replaced (on replacement nodes if their nodes died),
    the surviving processes stay, every rank joins a new process group and
    restores the last committed step in place, and training goes on. The
    store is told nothing: the first restore of a replaced rank ends the
    steps the failed job left pending, and a lost node's ranks are rebuilt
    onto the replacement nodes as they restore.
    """
    import ray

    from snapstore.ops import faults

    spec = RankSpec(job, getattr(store, "rundir", None), cfg, snapshot, ballast_bytes, baseline)
    report = RunReport(job, steps, world)
    nodes = faults.store_nodes(store)
    if len(nodes) < world:
        raise RuntimeError(f"{world} ranks need {world} store nodes, found {len(nodes)}")
    placement = nodes[:world]
    pending = sorted(failures, key=lambda f: f.at_step)
    t_start = time.perf_counter()
    rdv = _rendezvous(spec)
    ranks = [_start_rank(r, n, world, rdv, spec) for r, n in enumerate(placement)]
    try:
        while True:
            refs = [r.train.remote(steps) for r in ranks]
            failure = _watch(ranks, refs, pending, store, placement, on_progress)
            if failure is None:
                results = ray.get(refs)
                report.losses.update({int(k): v for k, v in results[0]["losses"].items()})
                report.saves_failed += sum(r["saves_failed"] for r in results)
                break
            with contextlib.suppress(Exception):
                report.losses.update(dict(ray.get(ranks[0].train_losses.remote(), timeout=5)))
            _drain(refs)
            stuck = [
                i
                for i, ref in enumerate(refs)
                if i not in _victims(failure) and not ray.wait([ref], timeout=0)[0]
            ]
            _recover(store, ranks, placement, failure, spec, stuck)
            resumed = failure.resumed_step or 0
            if on_progress is not None:
                on_progress(resumed, f"resumed at step {resumed} after {failure.kind} failure")
        report.digests = ray.get([r.digest.remote() for r in ranks], timeout=60)
        times = ray.get(ranks[0].timing.remote(), timeout=30)
        if times:
            times = sorted(times[len(times) // 10 :])  # drop warm-up
            report.step_seconds = times[len(times) // 2]
        report.state_bytes = int(ray.get(ranks[0].state_bytes.remote(), timeout=30))
        if snapshot:
            ray.get([r.wait_committed.remote() for r in ranks], timeout=120)
            report.memory_used = [int(n["used"]) for n in store.nodes() if n["alive"]]
        if baseline is not None:
            report.baseline = _baseline_report(ranks, baseline)
        ray.get([r.shutdown.remote() for r in ranks], timeout=60)
    finally:
        _stop(ranks)
        if snapshot:
            # The run is over: free its memory for the next run on this store.
            with contextlib.suppress(Exception):
                store.call("drop_job", job)
    report.failures = failures
    report.seconds = time.perf_counter() - t_start
    return report


def _baseline_report(ranks: list[Any], baseline: dict[str, Any]) -> dict[str, Any]:
    import ray

    stats = ray.get([r.baseline_stats.remote() for r in ranks], timeout=300)
    stalls = sorted(x for s in stats for x in s["stalls"])
    protected = sorted(x for s in stats for x in s["protected_after"])
    last = int(ray.get(ranks[0].progress.remote(), timeout=30))
    every = int(baseline["every"])
    last_ckpt = ((last - 1) // every) * every  # the newest step a checkpoint was taken at
    loads = ray.get([r.baseline_restore_seconds.remote(last_ckpt) for r in ranks], timeout=600)
    return {
        "kind": baseline["kind"],
        "every": every,
        "stall_median": stalls[len(stalls) // 2] if stalls else None,
        "protected_median": protected[len(protected) // 2] if protected else None,
        "restore_seconds": max(loads),
        "saves": len(stalls) // max(1, len(ranks)),
    }


def _drain(refs: list[Any], timeout: float = 1.0) -> None:
    """Collect the outcome of rank train calls that already ended (errors expected).

    Survivors may still be blocked in a collective of the old group; they
    are released when they join the new one, so this does not wait for them.
    """
    import ray

    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    for ref in ready:
        with contextlib.suppress(Exception):
            ray.get(ref, timeout=0)


def _victims(failure: Failure) -> list[int]:
    return list(range(failure.rank, failure.rank + failure.count))


def _recover(
    store: Any,
    ranks: list[Any],
    placement: list[str],
    failure: Failure,
    spec: RankSpec,
    stuck: list[int],
) -> None:
    """Replace the failed ranks, regroup every rank, restore the last committed step.

    ``stuck`` are surviving ranks still blocked in a collective of the old
    group. A gloo collective cannot be interrupted (neither destroying nor
    aborting its group ends a pending receive before the group's timeout):
    a survivor whose ring neighbour left the collective alive waits for a
    message that never comes. Those processes are replaced as well, on
    their own nodes, and restore from their node's memory like the rest.
    """
    import ray

    from snapstore.ops import faults

    victims = _victims(failure)
    replaced = victims + [i for i in stuck if i not in victims]
    for f in replaced:
        with contextlib.suppress(Exception):
            ray.kill(ranks[f], no_restart=True)
    if stuck:
        failure.note = (
            f"{len(stuck)} surviving rank(s) blocked in the old group's all-reduce "
            "were restarted too"
        )
    t0 = time.perf_counter()
    if failure.kind in ("node", "nodes"):
        for f in victims:
            placement[f] = faults.add_node(store)  # replacement nodes join the store
        failure.replacement = placement[failure.rank]
    for attempt in range(1, REGROUP_ATTEMPTS + 1):
        rdv = _rendezvous(spec)
        joins = {i: r.join.remote(rdv) for i, r in enumerate(ranks) if i not in replaced}
        for f in replaced:
            ranks[f] = _start_rank(f, placement[f], len(ranks), rdv, spec)
        try:
            ray.get([*joins.values(), *(ranks[f].pid.remote() for f in replaced)], timeout=300)
            break
        except (ray.exceptions.RayError, TimeoutError) as e:
            # A member missed the group's rendezvous deadline (a replacement process
            # slow to start on a loaded machine) or died: form a new group. Survivors
            # whose join has ended (failed with the rest) stay; one still inside the old
            # rendezvous, or dead, is replaced too, so that no process ever runs two joins.
            if attempt == REGROUP_ATTEMPTS:
                raise
            ray.wait(list(joins.values()), num_returns=len(joins), timeout=JOIN_TIMEOUT + 30)
            for i, ref in joins.items():
                try:
                    ray.get(ref, timeout=0)
                except ray.exceptions.RayActorError:
                    replaced.append(i)  # the survivor died
                except ray.exceptions.GetTimeoutError:
                    replaced.append(i)  # still joining: not safe to join again
                except ray.exceptions.RayError:
                    pass  # its join failed like everyone's: it can join the next group
            failure.note = (failure.note + "; " if failure.note else "") + (
                f"regrouped again after {type(e).__name__}"
            )
            _stop([ranks[f] for f in replaced])
    failure.restart_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    restored = ray.get([r.restore.remote() for r in ranks], timeout=300)
    failure.restore_seconds = time.perf_counter() - t1
    first = restored[0]["step"]
    failure.resumed_step = 0 if first is None else first + 1
    failure.steps_lost = max(0, failure.step_reached - failure.resumed_step)
    failure.downtime_seconds = time.perf_counter() - failure.injected_perf
    _collect_store_view(store, spec.job, failure)


def _watch(
    ranks: list[Any],
    refs: list[Any],
    pending: list[Failure],
    store: Any,
    placement: list[str],
    on_progress: Callable[[int, str], None] | None,
) -> Failure | None:
    """Poll progress; inject the next failure when due; return it once it is noticed."""
    import ray

    from snapstore.ops import faults

    injected: Failure | None = None
    last = -1
    while True:
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0.05)
        errors = []
        for ref in done:
            try:
                ray.get(ref, timeout=0)
            except Exception as e:  # a rank died
                errors.append(e)
        if errors:
            if injected is None:
                raise RuntimeError(
                    f"a rank failed with no failure injected: {errors[0]}\n"
                    + _post_mortem(ranks, store)
                )
            injected.detect_seconds = time.perf_counter() - injected.injected_perf
            return injected
        if len(done) == len(refs) and injected is None:
            return None
        try:
            step = ray.get(ranks[0].progress.remote(), timeout=10)
        except Exception:
            step = last
        if step != last and on_progress is not None:
            on_progress(step, "")
        last = step
        if injected is None and pending and step >= pending[0].at_step:
            f = pending.pop(0)
            f.step_reached = step
            f.injected_at = time.time()
            f.injected_perf = time.perf_counter()
            if on_progress is not None:
                on_progress(step, f"injecting {f.kind} failure at step {step}")
            if f.kind == "trainer":
                faults.kill_trainer(ray.get(ranks[f.rank].pid.remote(), timeout=10), store)
            elif f.kind == "corrupt":
                # Stop the rank (no newer step can commit without it), damage its
                # last committed snapshot, and let recovery find out.
                job = ray.get(ranks[f.rank].job_name.remote(), timeout=10)
                faults.kill_trainer(ray.get(ranks[f.rank].pid.remote(), timeout=10), store)
                time.sleep(0.2)  # a commit already under way finishes first
                faults.corrupt_chunk(job, rank=f.rank, piece=0, offset=7, store=store)
            elif f.kind == "node":
                faults.kill_node(placement[f.rank], store)
            elif f.kind == "nodes":
                faults.kill_nodes([placement[r] for r in _victims(f)], store)
            elif f.kind == "smp":
                info = faults.kill_smp(placement[f.rank], store=store)
                _wait_smp_back(store, placement[f.rank], info["incarnation"], f)
                continue  # trainers keep going: nothing to restart
            elif f.kind == "stall":
                stall = faults.stall_smp(placement[f.rank], f.seconds, store)
                _wait_stall_over(store, ranks, stall, f)
                continue  # trainers keep going: nothing to restart
            else:
                raise ValueError(f"unknown failure kind {f.kind!r}")
            injected = f


def _wait_smp_back(store: Any, node: str, old: str, f: Failure, timeout: float = 60.0) -> None:
    """An SMP crash does not stop training: record how long the store took to notice and recover."""
    t0 = time.perf_counter()
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        for n in store.nodes():
            if n["node_id"] == node and n["incarnation"] != old and n["alive"]:
                f.detect_seconds = time.perf_counter() - t0
                f.restore_seconds = 0.0
                f.downtime_seconds = 0.0
                f.steps_lost = 0
                f.note = "trainers kept training; the restarted SMP re-adopted its segments"
                _collect_store_view(store, "", f)
                return
        time.sleep(0.05)
    f.note = "the SMP did not come back in time"


def _wait_stall_over(
    store: Any, ranks: list[Any], stall: dict[str, Any], f: Failure, timeout: float = 120.0
) -> None:
    """A stalled SMP stops nothing for good: wait until it runs again and the job commits
    a step past the one it had reached; that is the stall's downtime."""
    import ray

    stall["resumed"].wait(f.seconds + 30)
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        with contextlib.suppress(Exception):
            latest = ray.get(ranks[0].latest_committed.remote(), timeout=10)
            if latest is not None and latest > f.step_reached:
                f.downtime_seconds = time.perf_counter() - f.injected_perf
                f.restore_seconds = 0.0
                f.steps_lost = 0
                f.note = f"SMP frozen {f.seconds:.1f} s; training went on once it ran again"
                _collect_store_view(store, "", f)
                return
        time.sleep(0.05)
    f.note = "the job committed no step after the stall in time"


_DETECTED = ("node_dead", "node_silent", "smp_restarted")
"""Events by which the store first notices a failure."""


def _post_mortem(ranks: list[Any], store: Any) -> str:
    """Where each rank was and what the store last logged: for a failure nobody injected."""
    import ray

    lines = []
    for i, r in enumerate(ranks):
        try:
            lines.append(f"rank {i}: step {ray.get(r.progress.remote(), timeout=5)}")
        except Exception as e:
            lines.append(f"rank {i}: no answer ({type(e).__name__})")
    try:
        status = store.status(events=40)
        lines += [f"job {j.get('job')}: {j}" for j in status.get("jobs", [])]
        lines += [f"event {e['kind']}: {e['message']}" for e in status["events"]]
    except Exception as e:
        lines.append(f"store status unavailable: {type(e).__name__}: {e}")
    return "\n".join(lines)


def _collect_store_view(store: Any, job: str, f: Failure) -> None:
    """The store's own account: when it noticed the failure, and bytes it rebuilt."""
    with contextlib.suppress(Exception):
        for e in store.status(events=500)["events"]:
            if e["time"] < f.injected_at:
                continue
            if e["kind"] in _DETECTED and f.store_detect_seconds is None:
                f.store_detect_seconds = round(e["time"] - f.injected_at, 3)
            if e["kind"] in ("rebuild", "repaired") and isinstance(e.get("bytes"), int):
                f.bytes_rebuilt += e["bytes"]
