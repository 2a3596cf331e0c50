"""The client training code calls: save every step, restore the last committed one.

::

    client = Client("gpt", rank=rank, world_size=world)
    for step in range(start, steps):
        loss = model(batch).loss
        loss.backward()
        client.wait_staged()            # lazy copy of the last save done: params may change
        optimizer.step()
        optimizer.zero_grad()
        client.save(step, state, lazy=True)   # copies during the next forward/backward

    step, state = client.restore(into=state)  # after a crash: the last committed step

When memory cannot serve the job (more than m nodes of a stripe group lost,
or the store was restarted), ``restore`` falls back to the newest complete
step flushed to the store's persist directory; ``client.last_restore`` says
which source and step it used. ``client.persist()`` flushes the last
committed step now; ``Client(..., persist_on_sigterm=True)`` does so when
the process receives SIGTERM, before it dies as it would have.

``save`` copies each tensor once into a shared-memory slot of the trainer's
node (owned by that node's SMP) and returns a :class:`SaveFuture`; the SMP
checksums it, the coordinator has parity computed across nodes and commits
the step when every rank's data and every parity chunk is stored. Nothing is
pickled. Tensors unchanged since a slot was last written are not copied
again, and with changed byte ranges known, parity is updated from the
deltas only.

Threads: the caller's thread copies (or, with ``lazy=True``, a copier
thread does); a follower thread waits for each commit and leases the next
slot ahead of time, so the training loop never waits on a round trip. A
Client is used from one training thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
import uuid
from typing import Any

from snapstore.clients.dp import DPGroup, fill, localize, placeholders, shard
from snapstore.clients.future import DEFAULT_TIMEOUT, SaveFuture
from snapstore.clients.locate import find_smp, ray_node_alive
from snapstore.clients.persisted import (
    Opened,
    install_sigterm,
    open_persisted,
    persist_now,
    read_persisted,
    still_intact,
    uninstall_sigterm,
)
from snapstore.clients.staging import Stager
from snapstore.config import MAX_WORLD_SIZE, check_job_name
from snapstore.control.handle import Store, connect
from snapstore.control.messages import ErrorKind, ErrorReply, Outcome, OutcomeStatus, RestorePlan
from snapstore.errors import (
    ActorUnavailableError,
    FormatError,
    MemoryBudgetError,
    RestoreRequiredError,
    SaveFailedError,
    SnapshotNotFoundError,
    SnapstoreError,
    StoreTimeoutError,
    UnrecoverableError,
)
from snapstore.format.frame import frame_size, read_frame, write_trailer
from snapstore.format.wire import decode, decode_any, encode
from snapstore.format.work import Lease
from snapstore.format.work import Opened as NodeOpened
from snapstore.node.channel import ChannelClient, ChannelUnreachable
from snapstore.node.transport import ChunkUnavailableError
from snapstore.rpc import call

__all__ = ["Client", "SaveFuture"]

logger = logging.getLogger(__name__)

POLICIES = ("wait", "skip")
FIRST_WAIT = 10.0
"""Seconds a save's one call to its SMP waits for the step's outcome after staging, and
each further wait of its follower thread: a long poll, ended at once by the decision."""
LEASE_RETRY = 0.2
"""Seconds between lease requests while this node's SMP restarts."""
CHANNEL_ASK_TIMEOUT = 10.0
"""Seconds the SMP has to say where its control channel is (SMP.channel_access)."""
CHANNEL_RETRY = 30.0
"""Seconds before a client whose SMP gave it no control channel asks again (meanwhile its
saves go through Ray)."""


class Client:
    """Save and restore one rank's state of one job.

    The client stages into the SMP of one store node on this host:
    ``node_id`` (an id or a unique prefix), else ``$SNAPSTORE_NODE``, else
    the Ray node this process runs on when it has an SMP, else the host's
    store node at ``rank`` modulo their number (sorted by id); see
    :mod:`snapstore.clients.locate`. ``policy`` says what ``save`` does while the
    previous save is still committing: ``"wait"`` for it (default) or
    ``"skip"`` this step. ``dp`` (a :class:`snapstore.clients.dp.DPGroup`, or a
    torch.distributed process group of the DP ranks) stores replicated state
    once per DP group. ``deltas=False`` copies everything every step (for
    code that changes tensors behind their version counter, e.g. via
    ``.data``). Every call takes a timeout.

    ``persist_on_sigterm=True`` (create the client on the main thread)
    installs a SIGTERM handler that flushes the job's last committed step
    to disk (bounded by ``sigterm_timeout`` seconds), then lets the signal
    take its course: the previous handler runs, or the process dies of it.
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
        policy: str = "wait",
        deltas: bool = True,
        dp: Any = None,
        replicated: tuple[str, ...] | list[str] | None = None,
        threads: int | None = None,
        persist_on_sigterm: bool = False,
        sigterm_timeout: float = 30.0,
    ) -> None:
        check_job_name(job)
        if not 1 <= world_size <= MAX_WORLD_SIZE:
            raise ValueError(f"world size {world_size} outside [1, {MAX_WORLD_SIZE}]")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.job, self.rank, self.world_size = job, rank, world_size
        self.session = uuid.uuid4().hex
        """Identifies this process's client to the store: a restarted rank has a new one."""
        self._saves = 0
        self._must_restore: str = ""
        self.timeout = timeout
        self.policy = policy
        self.dp = _dp_group(dp, replicated)
        self.store = store or connect(rundir)
        self.store.connect_ray()
        self.node_id, self.smp = find_smp(self.store, rank, node_id)
        """The store node this client stages into (:mod:`snapstore.clients.locate`)."""
        self._stager = Stager(deltas=deltas, threads=threads)
        self._layout: Any = None
        self._lease: Lease | None = None
        self._lease_lock = threading.Lock()
        self._last_size = 0
        self._last_step: int | None = None
        self._committed_step: int | None = None
        self._inflight: SaveFuture | None = None
        self._staging: concurrent.futures.Future[None] | None = None
        self._copier = concurrent.futures.ThreadPoolExecutor(1, f"snapstore-copy-{rank}")
        self._follower = concurrent.futures.ThreadPoolExecutor(1, f"snapstore-follow-{rank}")
        self._chan: ChannelClient | None = None
        self._chan_retry = 0.0
        self._unreported = {"waits": 0, "wait_seconds": 0.0, "skipped": 0, "bytes_copied": 0}
        self.metrics: dict[str, Any] = {
            "saves": 0,
            "skipped": 0,
            "waits": 0,
            "wait_seconds": 0.0,
            "bytes_copied": 0,
            "bytes_staged": 0,
        }
        self.last_restore: dict[str, Any] | None = None
        """Where the last :meth:`restore` came from: ``source`` ("memory" or
        "persisted"), ``step``, ``path`` (the persisted step's directory),
        ``read_from`` ("local", "node <id>", "persisted"), ``skipped``."""
        self._closed = False
        self._sigterm: Any = None
        if persist_on_sigterm:
            self._sigterm = install_sigterm(self, sigterm_timeout)

    # -- saving ---------------------------------------------------------------

    def save(
        self, step: int, state: Any, *, lazy: bool = False, timeout: float | None = None
    ) -> SaveFuture:
        """Stage ``state`` as ``step``; return the future of its commit.

        Blocks only for the staging copy (``lazy=False``), or not at all
        (``lazy=True``: the copy runs on a background thread; call
        :meth:`wait_staged` before anything modifies the state's tensors,
        i.e. before the optimizer step). Raises RestoreRequiredError (restore
        first), MemoryBudgetError (the node has no room for the slot),
        StoreTimeoutError, or ActorUnavailableError when this node's SMP gave
        no slot within ``timeout`` or Ray reports its node dead (a restarting
        SMP is waited for).
        """
        self._check_open()
        timeout = self.timeout if timeout is None else timeout
        if self._must_restore:
            raise RestoreRequiredError(
                f"job {self.job!r} rank {self.rank}: {self._must_restore}; restore before "
                "saving (let this process fail: the launcher restarts every rank)"
            )
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step {step} is not after the last saved step {self._last_step}")
        self.wait_staged(timeout)
        prev = self._inflight
        if prev is not None and not prev._ready_next.is_set():
            if self.policy == "skip":
                self._count(skipped=1)
                return SaveFuture(self.job, step, skipped=True)
            t0 = time.monotonic()
            if not prev._ready_next.wait(timeout):
                raise StoreTimeoutError(
                    f"the previous save (step {prev.step}) did not commit within {timeout} s"
                )
            self._count(waits=1, wait_seconds=time.monotonic() - t0)
        from snapstore.format.pack import bind

        t0 = time.perf_counter()
        stored = shard(localize(state), self.dp) if self.dp else localize(state)
        binding = bind(stored, previous=self._layout)
        self._layout = binding.layout
        manifest = binding.manifest()
        size = frame_size(binding.layout.nbytes, len(manifest))
        lease = self._take_lease(size, timeout)
        try:
            seg, slot = self._stager.maps.get(lease.path, writable=True)
        except FileNotFoundError:
            # A lease taken ahead of time whose slot the SMP has since lost
            # (it restarted without its memory): ask again.
            lease = self._new_lease(size, timeout)
            seg, slot = self._stager.maps.get(lease.path, writable=True)
        plan = self._stager.plan(binding, slot, lease.holds, self._committed_step)
        if plan.changed is not None:
            plan.changed.append([binding.layout.nbytes, size - binding.layout.nbytes])
        fut = SaveFuture(self.job, step)
        self._saves += 1
        fut.staging = f"{self.session}/{self._saves}"
        fut.stats.update(bytes_total=size, bytes_copied=plan.copy_bytes, delta_copy=not plan.full)
        self._last_step = step
        self._inflight = fut
        self._last_size = size

        def stage() -> None:
            try:
                self._stager.copy(binding, plan, seg, slot)
                write_trailer(seg.array, binding.layout.nbytes, manifest, step)
            except BaseException as e:
                self._stager.forget()
                fut._fail(SaveFailedError(f"staging copy of step {step} failed: {e!r}"))
                raise
            self._stager.wrote(step, binding, plan, slot)
            fut.stats["stage_seconds"] = time.perf_counter() - t0
            self._count(bytes_copied=plan.copy_bytes)
            report, self._unreported = self._unreported, dict.fromkeys(self._unreported, 0)
            # One call: the SMP checksums the staging, then answers with the step's outcome
            # (or PENDING after a first wait), so a save costs one round trip to the node.
            args = (
                self.job,
                self.rank,
                step,
                size,
                self.world_size,
                fut.staging,
                plan.changed,
                plan.base_step,
                report,
                min(timeout, FIRST_WAIT),
                size,
            )
            # Over the SMP's control channel when it has one (the follower makes the call),
            # else a Ray call made now.
            channel = self._channel()
            ref = self.smp.stage_and_wait.remote(*args) if channel is None else None
            fut._staged.set()
            self._follower.submit(self._follow, fut, ref, args, timeout)

        self.metrics["saves"] += 1
        self.metrics["bytes_staged"] += size
        if lazy:
            self._staging = self._copier.submit(stage)
        else:
            stage()
        return fut

    def wait_staged(self, timeout: float | None = None) -> None:
        """Wait until the last lazy save's copy is done; raise if it failed.

        Call it before anything modifies the tensors of a state saved with
        ``lazy=True`` (normally: right before ``optimizer.step()``).
        """
        staging, self._staging = self._staging, None
        if staging is None:
            return
        try:
            staging.result(self.timeout if timeout is None else timeout)
        except concurrent.futures.TimeoutError:
            self._staging = staging
            raise StoreTimeoutError(f"the staging copy did not finish within {timeout} s") from None

    def _channel(self) -> ChannelClient | None:
        """This node's SMP's control channel (snapstore.node.channel), asked for once, and
        again after it could not be reached (a restarted SMP listens elsewhere); None:
        saves go through Ray."""
        channel = self._chan
        if channel is None and time.monotonic() >= self._chan_retry:
            try:
                node, address, port, token = call(
                    self.smp.channel_access.remote(), CHANNEL_ASK_TIMEOUT, "SMP.channel_access"
                )
                channel = self._chan = ChannelClient(str(token), str(node), str(address), port)
            except (SnapstoreError, ValueError, TypeError, AttributeError) as e:
                # AttributeError: an SMP of a snapstore without channels.
                logger.info("saving through Ray: no control channel from the SMP (%s)", e)
                self._chan_retry = time.monotonic() + CHANNEL_RETRY
        return channel

    def _ask(self, method: str, args: tuple[Any, ...], ref: Any, timeout: float) -> Outcome:
        """The outcome ``method(*args)`` answers: over the SMP's channel when ``ref`` is None
        (through Ray when the channel cannot be reached), else Ray's call ``ref``."""
        channel = self._chan if ref is None else None
        if channel is not None:
            try:
                return decode(channel.call(method, *args, timeout=timeout), Outcome)
            except ChannelUnreachable as e:
                logger.info("%s through Ray: %s", method, e)
                self._chan = None
                channel.close()
        if ref is None:
            ref = getattr(self.smp, method).remote(*args)
        return decode(call(ref, timeout, f"SMP.{method}"), Outcome)

    def _follow(
        self, fut: SaveFuture, staged_ref: Any, args: tuple[Any, ...], timeout: float
    ) -> None:
        """Follower thread: wait for the step's outcome from this node's SMP.

        The save's :meth:`SMP.stage_and_wait` call (``args``; ``staged_ref``: made through
        Ray already, or None: made here, over the control channel) answers with the
        outcome, or PENDING, and then the thread waits again. The outcome comes with the
        lease of the next slot (taken once the step is decided), so the next save starts
        without a round trip.
        """
        deadline = time.monotonic() + timeout
        try:
            outcome = self._ask("stage_and_wait", args, staged_ref, timeout + FIRST_WAIT + 10.0)
        except SnapstoreError as e:
            # The step cannot commit without this rank: say so, so that the
            # other ranks' waits end now instead of at their timeout. An SMP that
            # died during the call may have staged the rank already: the step is
            # abandoned all the same (unless it committed first), and this save fails.
            with contextlib.suppress(SnapstoreError):
                coord = self.store.coordinator()
                call(
                    coord.abandon.remote(self.job, self.rank, fut.step, fut.staging),
                    10.0,
                    "coordinator.abandon",
                )
            fut._fail(_save_failed(self.job, fut.step, e))
            fut._ready_next.set()
            return
        try:
            while outcome.status is OutcomeStatus.PENDING:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreTimeoutError(f"step {fut.step} not decided within {timeout} s")
                wait = min(left, FIRST_WAIT)
                again = (self.job, self.rank, fut.step, fut.staging, wait, self._last_size)
                outcome = self._ask("wait_outcome", again, None, wait + 10.0)
        except BaseException as e:
            fut._fail(e if isinstance(e, SnapstoreError) else SnapstoreError(repr(e)))
            fut._ready_next.set()
            return
        fut.stats.update(outcome.stats)
        fut.stats["commit_seconds"] = timeout - (deadline - time.monotonic())
        if outcome.status is OutcomeStatus.COMMITTED:
            self._committed_step = fut.step
        if outcome.restore:
            self._must_restore = outcome.reason
        if outcome.lease is not None and not self._closed:
            try:
                self._stager.maps.get(outcome.lease.path, writable=True)  # map it now
                with self._lease_lock:
                    self._lease = outcome.lease
            except OSError as e:
                logger.info("the lease for the next step is gone already: %s", e)
        fut._resolve({"status": outcome.status.value, "step": fut.step, "reason": outcome.reason})
        fut._ready_next.set()

    def _take_lease(self, size: int, timeout: float) -> Lease:
        with self._lease_lock:
            lease, self._lease = self._lease, None
        if lease is not None and lease.capacity >= size:
            return lease
        return self._new_lease(size, timeout)

    def _new_lease(self, size: int, timeout: float) -> Lease:
        """A slot from this node's SMP. One that is restarting (Ray restarts a crashed SMP
        within seconds) is asked again until ``timeout``; once Ray reports the node itself
        dead, its SMP will not come back: ActorUnavailableError at once."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(deadline - time.monotonic(), 0.1)
            try:
                got = call(self.smp.lease.remote(self.job, self.rank, size), left, "SMP.lease")
                return decode(got, Lease)
            except ActorUnavailableError as e:
                gone = not ray_node_alive(self.node_id)
                if gone or time.monotonic() + LEASE_RETRY >= deadline:
                    why = "its node is dead" if gone else f"not back within {timeout} s"
                    raise ActorUnavailableError(
                        f"job {self.job!r} rank {self.rank}: no slot from the SMP of store node "
                        f"{self.node_id[:12]}, {why} ({e}); this process must run on a live "
                        "store node"
                    ) from None
            time.sleep(LEASE_RETRY)

    def _count(self, **deltas: float) -> None:
        for k, v in deltas.items():
            self.metrics[k] = self.metrics.get(k, 0) + v
            if k in self._unreported:
                self._unreported[k] += v

    # -- restoring ------------------------------------------------------------

    def latest_step(self, timeout: float | None = None) -> int | None:
        """The job's last globally committed step, or None."""
        timeout = self.timeout if timeout is None else timeout
        latest = self.store.call("latest", self.job, timeout=timeout)
        return None if latest is None else int(latest)

    def restore(self, into: Any = None, *, timeout: float | None = None) -> tuple[int, Any]:
        """Return ``(step, state)`` of the job's last committed step.

        ``into=`` a live state (same structure as saved) restores in place:
        its tensors are overwritten and returned, no new allocation. Every
        piece is checked against its checksum; a corrupt or lost piece is
        rebuilt from its stripe group first.

        When memory cannot serve the job -- more than m chunks of a stripe
        lost, or no committed step in memory (the store was restarted) --
        the newest complete persisted step whose files verify is restored
        instead (every rank of the job gets the same one), and the job goes
        on saving after it. :attr:`last_restore` says which source and step
        were used. Raises SnapshotNotFoundError when there is neither,
        UnrecoverableError when memory lost the step and nothing is
        persisted, PersistedStepCorruptError when the persisted file of this
        rank fails its checksum after the step was chosen (restore again:
        the step is marked bad and an older one is used).
        """
        self._check_open()
        from snapstore.format.pack import unpack

        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        self.wait_staged(timeout)
        live = localize(into) if into is not None else None
        opened = self._open_any(self.rank, deadline, restarted=True)
        step = opened.step
        framed = read_frame(opened.buf, opened.size)
        if framed.step != step:
            raise FormatError(
                f"job {self.job!r} rank {self.rank}: the buffer of step {step} says step "
                f"{framed.step} in its trailer"
            )
        # A buffer read from disk is ours alone: tensors may view it, no second copy.
        state = unpack(framed.manifest, framed.data, into=live, copy=opened.tier == "memory")
        holes = placeholders(state) if self.dp else {}
        for owner in sorted(set(holes.values())):
            if opened.tier == "persisted":
                assert opened.path is not None
                obuf = read_persisted(self, opened.path, owner)
                ostep, osize = step, len(obuf)
            else:
                ostep, oseg, osize, _, _ = self._open(owner, deadline, restarted=False)
                obuf = oseg.array
            if ostep != step:
                raise SnapstoreError(
                    f"rank {owner}'s committed step {ostep} differs from {step}; retry restore"
                )
            oframed = read_frame(obuf, osize)
            theirs = unpack(oframed.manifest, oframed.data, copy=False)
            wanted = {p: _get(theirs, p) for p, o in holes.items() if o == owner}
            fill(state, wanted, into=live)
        self._stager.forget()
        with self._lease_lock:
            self._lease = None
        self._must_restore = ""
        self._last_step = step
        self._committed_step = step if opened.tier == "memory" else None
        self._inflight = None
        self.last_restore = {
            "source": opened.tier,
            "step": step,
            "path": opened.path,
            "read_from": opened.source,
            "skipped": opened.skipped,
        }
        info: dict[str, Any] = {
            "step": step,
            "source": opened.source,
            "tier": opened.tier,
            "seconds": round(time.monotonic() - t0, 4),
            "node": self.node_id,
        }
        if opened.path is not None:
            info["path"] = opened.path
        self.store.coordinator().note_restore.remote(self.job, self.rank, info)
        return step, state

    def peek(
        self, rank: int | None = None, *, timeout: float | None = None, copy: bool = False
    ) -> tuple[int, Any]:
        """``(step, state)`` of a rank of this job at its last committed step, read-only.

        Does not restore this rank: nothing it staged is aborted. Without
        ``copy`` the returned tensors view the mapped snapshot (no copy; do
        not write to them; valid until the job commits two more steps).
        ``copy=True`` returns tensors of their own, checked against the
        record's checksums after the copy, so the state stays right however
        long it is kept (``snapstore export``).
        When memory cannot serve the job, the persisted step is read instead.
        Used by data-parallel restores, the DCP reader and export.
        """
        self._check_open()
        from snapstore.format.pack import unpack

        timeout = self.timeout if timeout is None else timeout
        rank = self.rank if rank is None else rank
        deadline = time.monotonic() + timeout
        for _attempt in range(3):
            opened = self._open_any(rank, deadline, restarted=False)
            framed = read_frame(opened.buf, opened.size)
            state = unpack(framed.manifest, framed.data, copy=copy)
            if copy and opened.tier == "memory" and not still_intact(opened):
                continue  # the slot was reused while it was copied: read the new step
            return opened.step, state
        raise SnapstoreError(
            f"job {self.job!r} rank {rank}: the committed step kept changing while it was copied"
        )

    def _open_any(self, rank: int, deadline: float, restarted: bool) -> Opened:
        """Open rank ``rank``'s committed buffer from memory, else from the persisted tier."""
        for attempt in range(2):
            try:
                step, seg, size, source, sums = self._open(rank, deadline, restarted)
                return Opened(step, seg.array, size, "memory", source, None, sums, [])
            except (UnrecoverableError, SnapshotNotFoundError) as e:
                opened = open_persisted(self, rank, e, deadline, restarted, retry=attempt == 0)
            if opened is not None:
                return opened
            # None: the coordinator says memory serves the job (its nodes came back): retry.
        raise SnapstoreError(f"job {self.job!r} rank {rank}: restore kept failing")

    def _open(
        self, rank: int, deadline: float, restarted: bool
    ) -> tuple[int, Any, int, str, list[int]]:
        """Map rank ``rank``'s committed buffer on this node (fetched or rebuilt if needed)."""
        coord = self.store.coordinator()
        attempts = 0
        while attempts < 8 and time.monotonic() < deadline:
            attempts += 1
            left = max(0.1, deadline - time.monotonic())
            reply = call(
                coord.restore_plan.remote(
                    self.job,
                    rank,
                    self.node_id,
                    self.session,
                    restarted,
                    self.world_size,
                    left,
                ),
                left + 5,
                "coordinator.restore_plan",
            )
            plan = decode_any(reply, RestorePlan, ErrorReply)
            if isinstance(plan, ErrorReply):
                _raise_plan_error(self.job, rank, plan)
            step, size, sums = plan.step, plan.size, list(plan.sums)
            if plan.local:
                ref = self.smp.open_committed.remote(self.job, rank, step, size, sums)
                source = "local"
            else:
                ref = self.smp.fetch.remote(
                    self.job, rank, step, size, sums, encode(plan.home_peer)
                )
                source = f"node {plan.home[:12]}"
            try:
                res = decode(
                    call(ref, left, "SMP.open_committed" if plan.local else "SMP.fetch"),
                    NodeOpened,
                )
            except (ChunkUnavailableError, ActorUnavailableError) as e:
                # The home died and the store has not been told yet (Ray reports a dead
                # node within about a second): plan again once it knows.
                logger.info("reading rank %d from %s failed (%s); planning again", rank, source, e)
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
                continue
            if res.path and not res.bad:
                try:
                    seg, _ = self._stager.maps.get(res.path, writable=False)
                except FileNotFoundError:
                    continue  # the copy was reused (a newer record came): plan again
                return step, seg, size, source, [int(x) for x in sums]
            rep = call(
                coord.repair.remote(self.job, rank, step, list(res.bad)),
                left,
                "coordinator.repair",
            )
            if isinstance(rep, bytes):
                err = decode(rep, ErrorReply)
                if err.kind is ErrorKind.UNRECOVERABLE:
                    raise UnrecoverableError(
                        f"job {self.job!r} rank {rank} step {step}: pieces {list(res.bad)} fail "
                        "their checksums and cannot be rebuilt",
                        list(err.lost),
                    )
        raise SnapstoreError(f"job {self.job!r} rank {rank}: restore kept failing")

    # -- the persisted tier ------------------------------------------------------

    def persist(self, timeout: float | None = None) -> int:
        """Flush the job's last committed step to the persist directory now; return it.

        Returns once the step is complete on disk (data, checksums, manifest,
        rename), or at once if it already is. Raises SnapshotNotFoundError
        when the job has nothing committed, PersistFailedError when the
        flush failed (the previous persisted step is intact),
        StoreTimeoutError after ``timeout`` (the flush goes on).
        """
        self._check_open()
        return persist_now(self, self.timeout if timeout is None else timeout)

    # -- lifecycle -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SnapstoreError("this client is closed")

    def close(self, timeout: float | None = None) -> None:
        """Wait for the last copy, stop the helper threads, unmap the slots."""
        if self._closed:
            return
        if self._sigterm is not None:
            uninstall_sigterm(self._sigterm)
            self._sigterm = None
        try:
            self.wait_staged(timeout)
        finally:
            self._closed = True
            self._copier.shutdown(wait=True)
            self._follower.shutdown(wait=False, cancel_futures=True)
            self._stager.close()
            if self._chan is not None:
                self._chan.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dp_group(dp: Any, replicated: tuple[str, ...] | list[str] | None) -> DPGroup | None:
    if dp is None:
        if replicated:
            raise ValueError("replicated= needs dp= (the data-parallel group)")
        return None
    globs = tuple(replicated) if replicated else ("*",)
    if isinstance(dp, DPGroup):
        return DPGroup(dp.index, dp.ranks, globs if replicated else dp.replicated)
    return DPGroup.from_process_group(dp, globs)


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _raise_plan_error(job: str, rank: int, plan: ErrorReply) -> None:
    if plan.kind is ErrorKind.NOT_FOUND:
        raise SnapshotNotFoundError(plan.message)
    if plan.kind is ErrorKind.UNRECOVERABLE:
        raise UnrecoverableError(plan.message, list(plan.lost))
    if plan.kind is ErrorKind.TIMEOUT:
        raise StoreTimeoutError(plan.message)
    raise SnapstoreError(f"job {job!r} rank {rank}: {plan.message or plan.kind.value}")


def _save_failed(job: str, step: int, e: SnapstoreError) -> SnapstoreError:
    """A staging the node refused: the step will not commit (SaveFailedError), unless the
    error is one a caller acts on differently (memory, timeouts, a dead SMP)."""
    if isinstance(e, (MemoryBudgetError, StoreTimeoutError, ActorUnavailableError)):
        return e
    return SaveFailedError(f"job {job!r} step {step} was not saved: {e}")
