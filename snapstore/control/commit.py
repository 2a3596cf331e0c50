"""The commit protocol, coordinator side: a step is visible only when all of it is in memory.

1. Ranks stage on their nodes; each node tells its group leader; each
   leader reports the group's staged ranks (:meth:`Commits.on_report`).
   The coordinator checks each staging against the job's rules (steps
   increase; after a restart, only ranks that restored may save; a step that
   failed in this incarnation is not saved again) and refuses the others.
2. When all ``world_size`` ranks are staged (one attempt, versioned), every
   group that holds some of them is ordered to prepare its slice of the
   record: parity computed and stored, the slice kept by every member.
3. When every such group reported prepared, the step is committed: this is
   the commit point, one transition of :class:`StepLife`. From here on the
   step is committed whatever happens; failing it is a no-op. The decision
   goes to each group's leader, which applies it on its members; those wake
   their trainers with the outcome and the next slot's lease.
4. Any failure before 3 fails the attempt: its stagings are freed on the
   nodes, the previous committed step is untouched and is what restores get.

Decisions not acknowledged by a group are sent again (to the group's
current leader, or to each member directly) until they are.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from snapstore.config import MAX_WORLD_SIZE
from snapstore.control.jobs import (
    Attempt,
    Job,
    JobRecord,
    NextSaves,
    PreparedSlice,
    TicketBase,
    session_of,
)
from snapstore.control.links import AbandonReply
from snapstore.control.messages import (
    Decision,
    GroupReport,
    Outcome,
    OutcomeStatus,
    PrepareOrder,
    term_of,
)
from snapstore.control.states import JobPhase, Redundancy, StepLife, StepPhase
from snapstore.errors import FormatError
from snapstore.format.record import StepRecord
from snapstore.format.work import CommitResult

if TYPE_CHECKING:
    from snapstore.control.plane import ControlPlane

__all__ = ["Commits"]

logger = logging.getLogger(__name__)

PREPARE_TIMEOUT = 240.0
"""An attempt preparing this long fails (parity of a group normally takes well under a second)."""
DECISION_TIMEOUT = 30.0

RESTORE_FIRST = "restore first"

_CLIENT_COUNTERS = {
    "waits": "save_waits_total",
    "wait_seconds": "save_wait_seconds_total",
    "skipped": "saves_skipped_total",
    "bytes_copied": "staged_bytes_total",
}


class Commits:
    """The coordinator's side of the commit protocol. See the module docstring."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    # -- reports from leaders -----------------------------------------------------------

    def on_report(self, r: GroupReport) -> None:
        if r.applied:
            self._acked(r)
        elif r.early:
            self._early(r)
        elif r.version >= 0:
            self._prepared(r)
        else:
            self._staged(r)

    def _staged(self, r: GroupReport) -> None:
        taken = self._take(r, r.sessions)
        if taken is not None:
            self._advance(*taken)

    @staticmethod
    def _following(job: Job | None, r: GroupReport) -> tuple[NextSaves, TicketBase] | None:
        """The stagings a report that follows the ticket's commit names (``r.follows``),
        and what that commit handed out; None if this coordinator does not hold that
        commit's stagings of the group (the report is ignored: the leader reports the
        stagings one by one when no decision comes)."""
        base = job.ticket_base if job is not None else None
        if base is None or base.version != r.version or r.follows <= 0:
            return None
        mine = base.ranks.by_group.get(r.group)
        if not mine:
            return None
        return NextSaves(mine, r.follows), base

    def _stagings(self, r: GroupReport) -> Mapping[int, str] | None:
        """rank -> staging of a staged or early report: its ``sessions``, or those it
        follows (None if they are not known here)."""
        if not r.follows:
            return r.sessions
        following = self._following(self.plane.jobs.get(r.job), r)
        return following[0] if following is not None else None

    def _early(self, r: GroupReport) -> None:
        """A group prepared under the job's ticket without an order (leader.py): its
        stagings are checked as a staged report's, and the slice is the group's prepared
        one only if every staging in it was accepted into the attempt of that version."""
        steady = self._steady(r)
        if steady is not None:
            job, att = steady
            self._count_client(r.stats.get("client"))
            att.leaders[r.group] = r.leader
            # Collecting, this group's slice taken: nothing to advance before the last rank.
            if self._take_slice(job, att, r) and len(att.ranks) >= att.world_size:
                self._advance(job, att)
            return
        stagings = self._stagings(r)
        taken = self._take(r, stagings) if stagings is not None else None
        if taken is None:
            known = self.plane.jobs.get(r.job)
            if known is not None and known.ticket == r.version:
                known.ticket = None  # nothing accepted: the version names that slice only
            return
        job, att = taken
        if att.version == r.version and att.life.open:
            why = r.failed or ("" if r.prepared is not None else "an early report without a slice")
            if not why and att.by_group.get(r.group) != stagings:
                why = f"group of {r.leader[:12]} prepared early stagings that were not accepted"
            if not why and self._take_slice(job, att, r):
                self._advance(job, att)
                return
            if why:
                self.fail(job, att, why)
            return
        # The ticket did not hold (the attempt has another version): the slice is not this
        # attempt's, and goes with the next commit; the group is ordered to prepare.
        self._advance(job, att)

    def _steady(self, r: GroupReport) -> tuple[Job, Attempt] | None:
        """The job and the attempt an early report joined as it is, when nothing in it
        needs :meth:`_take`'s checks one by one: the ticket's attempt (opened here if it is
        the step's first report), collecting, this group not in it yet, no other step in
        flight, nothing about the job that could refuse a rank (:meth:`_unrefusable`),
        every staging from the session the job knows for its rank, and no rank staged in
        another group (:meth:`Attempt.join`). This is every group's report
        of every step in steady training, so it is the coordinator's cost per step at
        scale (bench.scale); anything else (None, nothing changed) takes the general
        path, which decides the same for these reports."""
        plane = self.plane
        job = plane.jobs.get(r.job)
        if job is None or r.epoch != plane.membership.epoch or r.failed or r.prepared is None:
            return None
        att = job.attempts.get(r.step)
        if len(job.attempts) != (att is not None):
            return None  # another step in flight: a rank may move on from it (_take)
        if att is None:
            if job.ticket != r.version:
                return None
        elif (
            att.version != r.version
            or att.life.phase is not StepPhase.COLLECTING
            or r.group in att.by_group
        ):
            return None
        following = self._following(job, r) if r.follows else None
        stagings: Mapping[int, str] = following[0] if following is not None else r.sessions
        if not (
            stagings
            and self._unrefusable(job, stagings, r.step, r.world_size, known=True)
            and (
                # Following the commit's stagings, which agreed with the session table,
                # and the table has not changed since: known, with no check per rank.
                following[1].agreed == job.sessions.version
                if following is not None
                else _sessions_known(job, stagings)
            )
        ):
            return None
        if att is None:
            job.ticket = None
            att = job.attempts[r.step] = self._open(job, r, r.version)
        if following is not None:
            joined = att.ranks.join_following(r.group, following[0], following[1].ranks)
        else:
            joined = att.join(r.group, stagings)
        if not joined:
            return None  # a rank staged in another group too (_take sorts that out)
        return job, att

    def _open(self, job: Job, r: GroupReport, version: int) -> Attempt:
        """A new attempt at ``r``'s step of ``job`` under ``version``."""
        clock = self.plane.clock
        return Attempt(
            StepLife(r.job, r.step, version),
            world_size=r.world_size,
            epoch=r.epoch,
            started_at=clock.now(),
            wall_started=clock.wall(),
            table_version=job.sessions.version,
        )

    def _take(self, r: GroupReport, stagings: Mapping[int, str]) -> tuple[Job, Attempt] | None:
        """``stagings`` (a staged or early report's, :meth:`_stagings`) checked and added
        to the step's attempt, opened if none is (under the job's ticket when it holds
        one); the job and the attempt, or None when nothing was accepted."""
        plane = self.plane
        if r.epoch != plane.membership.epoch:
            return None  # a stale leader: members re-send to the current one
        job = plane.job(r.job, r.world_size)
        self._count_client(r.stats.get("client"))
        open_att = job.attempts.get(r.step)
        known = open_att.by_group.get(r.group, {}) if open_att and open_att.life.open else {}
        past = job.history.get(r.step)
        if not known and past is None:
            # The group's first report of the step: all of it is new.
            fresh = stagings if isinstance(stagings, dict) else dict(stagings)
        else:
            fresh = {
                rank: session
                for rank, session in sorted(stagings.items())
                # Accepted from an earlier report of this group (checked then), or a late
                # report of a staging that committed: nothing to say.
                if known.get(rank) != session
                and (past is None or past[1].get(rank, ("",))[0] != session)
            }
        rec = job.record
        if fresh and past is None and rec is not None and r.step == rec.step:
            # The committed step, from nodes that missed its decision, and this coordinator
            # never saw its stagings (it recovered the record from nodes): the decision
            # again, and the nodes tell by the bytes whose staging it was.
            decision = Decision(job.name, rec.step, rec.version, OutcomeStatus.COMMITTED)
            plane.send_leaders([(r.leader, decision)])
            return None
        same = _sessions_known(job, fresh)
        accepted, refused = self._check(job, fresh, r.step, r.world_size, same)
        for why, sessions in refused.items():
            refusal = Decision(
                r.job,
                r.step,
                -1,
                OutcomeStatus.FAILED,
                reason=why,
                sessions=tuple(sessions),
                restore=why.startswith(RESTORE_FIRST),
            )
            plane.send_leaders([(r.leader, refusal)])
        if not accepted:
            return None
        att = job.attempts.get(r.step)
        if att is None or not att.life.open:
            version = job.ticket if job.ticket is not None else job.take_version()
            job.ticket = None
            att = job.attempts[r.step] = self._open(job, r, version)
        if att.life.phase is StepPhase.PREPARING:
            for rank, session in accepted.items():
                prev = att.ranks.get(rank)
                if prev is not None and prev[0] != session:
                    self._note_sessions(job, {k: v for k, v in accepted.items() if k <= rank})
                    self.fail(
                        job, att, f"rank {rank} staged step {r.step} again from a new process"
                    )
                    return None
        att.add_group(r.group, accepted)
        att.leaders[r.group] = r.leader
        if not (same and accepted is fresh):
            self._note_sessions(job, accepted)
        for s, other in list(job.attempts.items()):
            if s >= r.step or not other.life.open or other.reprotect:
                continue
            moved = other.ranks.keys() & accepted.keys()
            if moved:
                self.fail(job, other, f"rank {min(moved)} moved on to step {r.step}")
        return job, att

    def _advance(self, job: Job, att: Attempt) -> None:
        """Every rank staged: the groups not prepared yet are ordered to; every group
        prepared (early): the commit."""
        if att.life.phase is StepPhase.COLLECTING and len(att.ranks) >= att.world_size:
            att.life.all_staged()
            self.send_prepare(job, att)
        if att.life.phase is StepPhase.PREPARING and self._all_prepared(att):
            self.commit(job, att)

    @staticmethod
    def _all_prepared(att: Attempt) -> bool:
        # Counted first: a pass over every group on every report is O(groups^2) per step.
        return len(att.prepared) >= len(att.leaders) and all(g in att.prepared for g in att.leaders)

    def _count_client(self, client: Any) -> None:
        """Fold what trainers' clients counted (reported with their stagings) into metrics."""
        if not isinstance(client, dict):
            return
        counters = self.plane.events.metrics.counters
        for key, name in _CLIENT_COUNTERS.items():
            value = client.get(key)
            if isinstance(value, (int, float)) and value > 0:
                counters[name] += value

    @staticmethod
    def _note_sessions(job: Job, stagings: dict[int, str]) -> None:
        """The client session each rank saves from now (its restore count kept if known)."""
        sessions = job.sessions
        for rank, staging in stagings.items():
            session = session_of(staging)
            mine = sessions.get(rank)
            if mine is None or mine[0] != session:
                sessions[rank] = (session, -1)

    def _check(
        self, job: Job, stagings: dict[int, str], step: int, world: int, known: bool = False
    ) -> tuple[dict[int, str], dict[str, list[str]]]:
        """Stagings of ``step`` (rank -> staging) accepted, and those refused by reason;
        ``known``: each is of the session the job knows for its rank (_sessions_known).

        When nothing about the job can refuse a rank (:meth:`_unrefusable`), every rank is
        accepted without a check per rank: a group's report costs the same at any size.
        """
        accepted: dict[int, str] = {}
        refused: dict[str, list[str]] = {}
        if self._unrefusable(job, stagings, step, world, known):
            return stagings, refused
        for rank, staging in stagings.items():
            why = self._refusal(job, rank, staging, step, world)
            if why:
                refused.setdefault(why, []).append(staging)
            else:
                accepted[rank] = staging
        return accepted, refused

    @classmethod
    def _unrefusable(
        cls, job: Job, stagings: Mapping[int, str], step: int, world: int, known: bool
    ) -> bool:
        """Nothing about the job can refuse any of ``stagings`` (the per-rank checks of
        :meth:`_refusal` can be skipped): same world size, a newer step, no retired
        sessions, the step never failed, no restore window, every rank in range, and no
        rank staged by another process than the one that restored it (``known``: every
        staging is of the session the job knows for its rank, :func:`_sessions_known`).
        The ranks' sessions are compared in one pass; the check of each rank only where
        some session is new."""
        return (
            world == job.world_size
            and world <= MAX_WORLD_SIZE
            and (job.record is None or step > job.record.step)
            and not job.retired
            and not job.failed.get(step)
            and job.life.phase is not JobPhase.RESTORING
            and (not stagings or (min(stagings) >= 0 and max(stagings) < world))
            and (known or not any(cls._not_the_restored(job, k, v) for k, v in stagings.items()))
        )

    @staticmethod
    def _not_the_restored(job: Job, rank: int, staging: str) -> bool:
        """Another process of ``rank`` restored: not the one that staged ``staging``."""
        mine = job.sessions.get(rank)
        return mine is not None and mine[1] >= 0 and mine[0] != session_of(staging)

    def _refusal(self, job: Job, rank: int, staging: str, step: int, world: int) -> str:
        """Why a staging (``<session>/<save number>``) of ``step`` by ``rank`` is refused."""
        session = session_of(staging)
        if not 0 < world <= MAX_WORLD_SIZE:
            return f"world size {world} outside [1, {MAX_WORLD_SIZE}]"
        if not 0 <= rank < world:
            return f"rank {rank} outside world size {world}"
        if world != job.world_size:
            open_ = any(a.life.open for a in job.attempts.values())
            if job.record is None and not open_ and job.life.phase is not JobPhase.RESTORING:
                job.world_size = world
            else:
                return (
                    f"job {job.name!r} has world size {job.world_size}; rank {rank} saved step "
                    f"{step} with world size {world} (restore with the new world size first)"
                )
        if job.record is not None and step <= job.record.step:
            return (
                f"job {job.name!r} already committed step {job.record.step}; step {step} is "
                "not newer (steps must increase; restore, or drop the job to start over)"
            )
        if session in job.retired:
            return (
                f"{RESTORE_FIRST}: rank {rank}'s process belongs to an ended incarnation of job "
                f"{job.name!r} (another process of that rank restored since)"
            )
        mine = job.sessions.get(rank)
        if self._not_the_restored(job, rank, staging):
            # Another process of the rank restored (after a coordinator restart the
            # sessions of ended incarnations are not known, only that one).
            return (
                f"{RESTORE_FIRST}: rank {rank} of job {job.name!r} was restored by another "
                "process; a process must restore before it saves"
            )
        since = mine[1] if mine is not None and mine[0] == session else -1
        failed = job.failed_since(step, since)
        if failed is not None:
            return (
                f"step {step} of job {job.name!r} was aborted ({failed}) and rank {rank} has not "
                "restored since; save the next step"
            )
        restored = mine is not None and mine[0] == session and rank in job.life.restored
        if job.life.phase is JobPhase.RESTORING and not restored:
            return (
                f"{RESTORE_FIRST}: job {job.name!r} restarted (incarnation "
                f"{job.life.incarnation}, every rank restores step {job.life.pinned}) and rank "
                f"{rank}'s process did not restore"
            )
        return ""

    def send_prepare(self, job: Job, att: Attempt, straight: bool = False) -> None:
        """Each group not yet prepared is ordered to (``straight``: past relays, a re-send)."""
        plane = self.plane
        att.prepare_sent = plane.clock.now()
        posts: list[tuple[str, PrepareOrder]] = []
        for group, leader in att.leaders.items():
            if group in att.prepared:
                continue
            order = att.orders.get(group)
            if order is None:
                order = PrepareOrder(
                    job.name,
                    att.step,
                    att.version,
                    att.epoch,
                    att.world_size,
                    sessions=att.group_sessions(group),
                )
            posts.append((leader, order))
        plane.send_leaders(posts, straight)

    def _prepared(self, r: GroupReport) -> None:
        plane = self.plane
        job = plane.jobs.get(r.job)
        att = job.attempts.get(r.step) if job is not None else None
        if job is None or att is None or att.version != r.version:
            return  # a late report of an attempt already over
        if att.life.phase is not StepPhase.PREPARING or r.group not in att.leaders:
            return
        if r.failed:
            self.fail(job, att, r.failed)
            return
        if r.prepared is not None and self._take_slice(job, att, r) and self._all_prepared(att):
            self.commit(job, att)

    def _take_slice(self, job: Job, att: Attempt, r: GroupReport) -> bool:
        """The group's prepared slice, checked by its head, kept as the group's; False (the
        attempt failed) when it is not the slice of this attempt's stagings."""
        assert r.prepared is not None
        try:
            head = StepRecord.head(r.prepared)
        except FormatError as e:
            self.fail(job, att, f"group of {r.leader[:12]} sent a malformed slice: {e}")
            return False
        if (
            (head.job, head.step, head.version) != (job.name, att.step, att.version)
            or head.rank_ids != att.ranks.rank_ids(r.group)
            or head.early != r.early
        ):
            self.fail(job, att, f"group of {r.leader[:12]} prepared another slice")
            return False
        att.prepared[r.group] = PreparedSlice(head, r.prepared)
        att.stats[r.group] = dict(r.stats)
        return True

    # -- the commit point -------------------------------------------------------------------

    def commit(self, job: Job, att: Attempt) -> None:
        plane = self.plane
        att.life.commit()  # the commit point: from here on it is committed
        record = JobRecord.of([att.prepared[g] for g in sorted(att.prepared)])
        if record.world_size != att.world_size or record.rank_count != att.world_size:
            logger.error("committed %s with %d ranks", att.life.name, record.rank_count)
        job.attempts.pop(att.step, None)
        att.ranks.committed()
        for s, other in list(job.attempts.items()):
            if s < att.step:
                self.fail(job, other, f"step {att.step} committed first")
        new_step = job.record is None or att.step != job.record.step
        previous = job.record
        job.record = record
        if new_step and not att.reprotect:
            job.life.committed()
            job.commits += 1
            job.commit_seq = job.restore_seq
            job.note_committed(record, att.ranks)
        elif att.step in job.history:
            job.note_committed(record, job.history[att.step][1])
        job.last_commit_latency = plane.clock.now() - att.started_at
        job.redundancy = Redundancy.PROTECTED if record.protected else Redundancy.UNPROTECTED
        job.detail = "" if record.protected else "fewer than k + m nodes: data has no parity"
        job.protected_at = plane.clock.wall()
        job.relocated.clear()
        job.unrecoverable.clear()
        job.preferred_home.clear()
        stats = _merge_stats(att, plane.clock.now())
        job.committed_stats = stats
        hold, ttl = ("", 0.0)
        if not att.reprotect:
            held = plane.flusher.hold_for(job, previous, record)
            if held is not None:
                hold, ttl = held
        if not att.reprotect:
            job.ticket = job.take_version()
            # The table did not change while the attempt was open: every staging of it
            # agreed with the table when accepted (or was noted in it), so all still do.
            table = job.sessions.version
            agreed = table if att.table_version == table else -1
            job.ticket_base = TicketBase(job.ticket, att.ranks, agreed)
        job.unconfirmed = any(p.head.early for p in att.prepared.values())
        decision = Decision(
            job.name,
            att.step,
            att.version,
            OutcomeStatus.COMMITTED,
            hold=hold,
            hold_ttl=ttl,
            stats=stats,
            ticket=-1 if job.ticket is None or att.reprotect else job.ticket,
        )
        # Every group hears of it, not only those holding the step: a node with no
        # slice of it lets go of the job's older steps.
        job.applied = asyncio.Event()
        targets = {g: x for g, x in plane.membership.leaders.items() if x is not None}
        targets.update(att.leaders)
        job.unacked = dict.fromkeys(targets, (decision, plane.clock.now()))
        plane.send_decision(targets.values(), decision)
        job.touch()
        plane.flusher.on_commit(job.name)
        if hold:
            plane.flusher.start(record, hold)
        if att.reprotect:
            plane.events.add(
                "reprotected",
                f"job {job.name!r} step {att.step} protected again (version {att.version}, "
                f"groups {[[n[:8] for n in g] for g in record.groups]}) in "
                f"{job.last_commit_latency:.3f} s",
                job=job.name,
                step=att.step,
                duration=round(job.last_commit_latency, 4),
            )
        else:
            counters = plane.events.metrics.counters
            # As the leaders counted them: the record's slices are not decoded to commit.
            data_bytes = stats.get("data_bytes")
            parity_bytes = stats.get("parity_bytes")
            if data_bytes is None or parity_bytes is None:
                data_bytes, parity_bytes = record.data_bytes(), record.parity_bytes()
            counters["committed_bytes_total"] += data_bytes
            counters["early_commits_total"] += job.unconfirmed
            counters["parity_network_bytes_total"] += stats.get("peer_bytes", 0)
            plane.events.add(
                "commit",
                f"job {job.name!r} committed step {att.step} ({data_bytes} data bytes, "
                f"{parity_bytes} parity bytes) in {job.last_commit_latency:.3f} s",
                job=job.name,
                step=att.step,
                latency=round(job.last_commit_latency, 4),
                **{k: v for k, v in stats.items() if k in ("parity_seconds", "delta")},
            )

    def fail(self, job: Job, att: Attempt, reason: str) -> bool:
        """Fail an attempt; False when it is already committed (nothing changes then)."""
        if not att.life.fail(reason):
            return False
        if job.attempts.get(att.step) is att:
            del job.attempts[att.step]
        sessions = frozenset(att.sessions())
        if not att.reprotect:
            job.note_failed(att.step, sessions, reason)
            self.plane.events.add(
                "save_failed",
                f"job {job.name!r} step {att.step} aborted: {reason}",
                job=job.name,
                step=att.step,
            )
        else:
            self.plane.events.add(
                "error", f"job {job.name!r}: re-protection failed: {reason}", job=job.name
            )
        decision = Decision(
            job.name,
            att.step,
            att.version,
            OutcomeStatus.FAILED,
            reason=reason,
            sessions=tuple(sorted(sessions)),
            reprotect=att.reprotect,
        )
        self.plane.send_leaders((leader, decision) for leader in set(att.leaders.values()))
        job.touch()
        return True

    def fail_open(self, job: Job, reason: str) -> list[int]:
        """Fail every attempt in flight of a job; the steps failed."""
        out = []
        for att in list(job.attempts.values()):
            if self.fail(job, att, reason):
                out.append(att.step)
        return sorted(out)

    def _acked(self, r: GroupReport) -> None:
        job = self.plane.jobs.get(r.job)
        if job is None or term_of(r.epoch) < term_of(self.plane.membership.epoch):
            return  # a leader of a replaced coordinator: it applied that one's decision
        pending = job.unacked.get(r.group)
        if pending is not None and (pending[0].step, pending[0].version) == (r.step, r.version):
            del job.unacked[r.group]
            if not job.unacked:
                job.applied.set()
        if r.holds:  # a fact about a node, whichever of this coordinator's sends it answers
            self._confirmed(job, r.step, r.version)

    # -- questions from nodes -------------------------------------------------------------

    def abandon(self, name: str, rank: int, step: int, session: str) -> AbandonReply:
        """A node wants to reuse ``rank``'s slot of ``step``: end that step first.

        A staging (``session``) that no attempt holds and that never failed is kept
        (neither abandoned nor committed): its report may still be on its way (through
        a stalled relay), and would open an attempt that commits the slot the node
        reused. The node frees the slot once the staging is decided."""
        job = self.plane.jobs.get(name)
        if job is None:
            return AbandonReply(abandoned=True)
        rec = job.record
        if rec is not None and rec.step >= step:
            if rec.step == step:
                return AbandonReply(abandoned=False, committed=True)
            return AbandonReply(abandoned=True, reason=f"step {rec.step} is committed")
        att = job.attempts.get(step)
        mine = (
            att is not None
            and rank in att.ranks
            and session_of(att.ranks[rank][0]) in (session_of(session), "")
        )
        reason = f"rank {rank} reused its slot for a newer step"
        if mine and att is not None and not self.fail(job, att, reason):
            return AbandonReply(abandoned=False, committed=True)
        failed = job.failed.get(step, [])
        if not mine and session and not any(session in stagings for _, stagings, _ in failed):
            return AbandonReply(abandoned=False)
        return AbandonReply(abandoned=True)

    def step_status(
        self, name: str, step: int, rank: int, sums: tuple[int, ...], staging: str = ""
    ) -> Outcome:
        """What became of ``rank``'s staging of ``step`` (that hashed to ``sums``; ``staging``:
        its id, when known). A failure of the step's number counts only for the stagings it
        failed: the next incarnation saves the same number again, and asking before its
        staging reached this coordinator must not find the failure of its predecessor's."""
        job = self.plane.jobs.get(name)
        if job is None:
            return Outcome(OutcomeStatus.UNKNOWN, step, f"no job {name!r}")
        rec = job.record
        if rec is not None and step == rec.step and job.unconfirmed:
            return Outcome(OutcomeStatus.PENDING, step)  # see Job.unconfirmed
        if rec is not None and step == rec.step:
            entry = rec.entry(rank)
            if entry is not None and (not sums or tuple(entry.sums) == tuple(sums)):
                return Outcome(OutcomeStatus.COMMITTED, step, "", dict(job.committed_stats))
            return Outcome(OutcomeStatus.FAILED, step, "the step committed with other bytes")
        if rec is not None and step < rec.step:
            past = job.history.get(step)
            entry = past[0].entry(rank) if past is not None else None
            if entry is not None:
                if not sums or tuple(entry.sums) == tuple(sums):
                    return Outcome(OutcomeStatus.COMMITTED, step)
                return Outcome(OutcomeStatus.FAILED, step, "the step committed with other bytes")
            if past is not None or step > min(job.history, default=step):
                return Outcome(OutcomeStatus.FAILED, step, f"step {rec.step} was committed first")
            return Outcome(OutcomeStatus.UNKNOWN, step, f"step {step} is too old to tell")
        att = job.attempts.get(step)
        if att is not None and rank in att.ranks:
            return Outcome(OutcomeStatus.PENDING, step)
        for _inc, stagings, reason in job.failed.get(step, []):
            if not staging or not stagings or staging in stagings:
                return Outcome(OutcomeStatus.FAILED, step, reason)
        return Outcome(OutcomeStatus.UNKNOWN, step, f"step {step} of job {name!r} is not known")

    # -- timers -------------------------------------------------------------------------------

    def tick(self) -> None:
        plane = self.plane
        now = plane.clock.now()
        cfg = plane.cfg
        for job in list(plane.jobs.values()):
            for att in list(job.attempts.values()):
                if (
                    att.life.phase is StepPhase.COLLECTING
                    and now - att.started_at > cfg.save_timeout
                ):
                    missing = sorted(set(range(att.world_size)) - set(att.ranks))
                    self.fail(
                        job,
                        att,
                        f"ranks {missing} of {att.world_size} did not stage it within "
                        f"{cfg.save_timeout:.0f} s",
                    )
                elif att.life.phase is StepPhase.PREPARING:
                    if now - att.prepare_sent > PREPARE_TIMEOUT:
                        self.fail(
                            job, att, f"groups did not prepare within {PREPARE_TIMEOUT:.0f} s"
                        )
                    elif now - att.prepare_sent > 5 * cfg.resend_interval:
                        # A lost order or report: ask again, past the relays.
                        self.send_prepare(job, att, straight=True)
            for group, (decision, sent) in list(job.unacked.items()):
                if now - sent < max(cfg.resend_interval, 2.0):
                    continue
                job.unacked[group] = (decision, now)
                self._resend(group, decision)

    def _resend(self, group: tuple[str, ...], decision: Decision) -> None:
        """A decision not acknowledged: to the group's leader now, or to each member."""
        plane = self.plane
        members = set(group) if group else set()
        leader = plane.membership.leader_of(group)
        if leader is not None:
            plane.send_leaders([(leader, decision)], straight=True)
            return
        nodes = sorted(members & set(plane.membership.readable()))
        job = plane.jobs.get(decision.job)
        if job is not None and _unconfirmed(job, decision.step, decision.version):
            # No leader acknowledges for these members: their answers confirm the commit.
            plane.tasks.spawn(self._confirm(job, decision, nodes), f"confirm {job.name!r}")
            return
        plane.send_nodes((node, decision) for node in nodes)

    async def _confirm(self, job: Job, decision: Decision, nodes: list[str]) -> None:
        """``decision`` (the job's unconfirmed commit) to ``nodes`` directly; one that now
        holds the record confirms it (Job.unconfirmed)."""
        plane = self.plane
        stamped = plane.stamper()(decision)
        results = await asyncio.gather(
            *(
                asyncio.wait_for(plane.fabric.node(n).decide(stamped), DECISION_TIMEOUT)
                for n in nodes
            ),
            return_exceptions=True,
        )
        if any(isinstance(r, CommitResult) and r.holds for r in results):
            self._confirmed(job, decision.step, decision.version)

    @staticmethod
    def _confirmed(job: Job, step: int, version: int) -> None:
        """A node holds (step, version) committed: a restarted coordinator that reaches it
        recovers it, so it may be told (Job.unconfirmed)."""
        if _unconfirmed(job, step, version):
            job.unconfirmed = False
            job.touch()


def _unconfirmed(job: Job, step: int, version: int) -> bool:
    """(step, version) is the job's committed record, told to nobody yet (Job.unconfirmed)."""
    rec = job.record
    return job.unconfirmed and rec is not None and (rec.step, rec.version) == (step, version)


def _sessions_known(job: Job, stagings: Mapping[int, str]) -> bool:
    """Every rank of ``stagings`` (rank -> staging) saves from the client session the job
    already knows for it: nothing to note, and no rank is another process than the one
    that restored it. One pass in C, not a check per rank: a staging is
    ``<session>/<save number>``, and each known session's prefix is kept with it."""
    if not stagings or min(stagings) < 0:
        return not stagings
    try:
        prefixes: Iterator[Any] = map(job.sessions.prefixes.__getitem__, stagings)
        return all(map(str.startswith, stagings.values(), prefixes))
    except (IndexError, TypeError):  # a rank not known, or a session no staging has
        return False


def _merge_stats(att: Attempt, now: float) -> dict[str, Any]:
    """The step's stats from its groups' (one pass over them: a commit at 4,096 nodes
    merges a thousand)."""
    stats: dict[str, Any] = {"wait_ranks_seconds": round(att.prepare_sent - att.started_at, 6)}
    if att.stats:
        parity_seconds = 0.0
        peer_bytes = delta_bytes = 0
        delta = True
        counted: dict[str, int | None] = {"data_bytes": 0, "parity_bytes": 0}
        for g in att.stats.values():
            parity_seconds = max(parity_seconds, float(g.get("parity_seconds", 0.0)))
            peer_bytes += int(g.get("peer_bytes", 0))
            delta_bytes += int(g.get("delta_bytes", 0))
            if delta and "delta" in g:
                delta = bool(g["delta"])
            for key, total in counted.items():
                value = g.get(key)
                if total is not None:
                    counted[key] = total + value if isinstance(value, int) else None
        stats["parity_seconds"] = parity_seconds
        stats["peer_bytes"] = peer_bytes
        stats["delta"] = delta
        stats["delta_bytes"] = delta_bytes
        # Where every group's leader counted them.
        stats.update((key, total) for key, total in counted.items() if total is not None)
    stats["commit_seconds"] = round(now - att.started_at, 6)
    return stats
