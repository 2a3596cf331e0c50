"""Relays: a region's leaders reach the coordinator through one node, in batches.

Every group's leader sends the coordinator a few messages per step (staged,
prepared, applied) and a beat a second. The coordinator's cost is mostly
per *message*: a Ray actor call, a decode, a task. So groups are put in
*regions* of ``StoreConfig.relay_groups`` (the membership names one node of
each region its relay: :attr:`snapstore.control.messages.NodeConfig.relay`),
and a leader sends through its region's relay:

- :class:`Relay` (on every node) forwards what it is given to the coordinator
  as one :class:`ReportBatch`. The first message to reach an idle relay
  waits :data:`RELAY_LINGER` for the rest of its burst (a region's groups
  report a step, or apply a decision, within a few milliseconds of each
  other); while a batch is on its way, what arrives waits and goes with the
  next one, at once. So a region's step costs the coordinator about one
  message per kind, whether or not it is behind: forwarded at once, a
  region's reports arrived a few at a time, and the number of batches
  depended on how closely their leaders happened to agree. Sending to a relay
  is a cast, as sending to the coordinator is: it returns once the relay has
  the message.
- :class:`Uplink` (a leader's way up) sends through the relay, and straight
  to the coordinator when the relay does not answer within
  :data:`RELAY_TIMEOUT` (a beat: a third of ``failure_timeout``) or refuses,
  and then straight for :data:`RELAY_BACKOFF` seconds: a dead or stalled
  relay costs a leader one timeout, and never loses a message for good.
- A relay whose batch did not reach the coordinator refuses messages for
  :data:`RELAY_BACKOFF` seconds: its leaders send straight and see for
  themselves whether the coordinator takes them (a relayed message counts as
  sent once the relay holds it; what a relay drops is repaired by re-sends).

A relay keeps no state and decides nothing: it is part of the network. What
it may do to a message -- delay it, lose it (its node dies), deliver it after
a later one, deliver it twice (the leader timed out and sent it straight) --
the network may do too, and the protocol already repairs it: leaders re-send
staged reports, the coordinator re-sends prepare orders and decisions, and
every report is idempotent. The simulation runs half its schedules with
every group reporting through a relay (``tests/sim``), crashing and stalling
relay nodes among the rest.

The way down goes through the relay too: the coordinator's post of prepare
orders or decisions to many groups is one :class:`LeaderBatch` per region,
to its relay (:meth:`snapstore.control.links.Fabric.post_relays`), which
posts each on to its leader (:meth:`Relay.down`). Only first sends take
that way: the coordinator's re-sends of an order or a decision no group
answered go straight to the leaders, so a dead relay costs one re-send
interval, as a lost message does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from snapstore.control.links import Fabric, RelayLink
from snapstore.control.messages import GroupBeat, GroupReport, LeaderBatch, ReportBatch
from snapstore.control.runtime import Tasks
from snapstore.errors import ActorUnavailableError, SnapstoreError
from snapstore.rpc import describe

__all__ = [
    "BATCH_MAX",
    "FORWARD_TIMEOUT",
    "RELAY_BACKOFF",
    "RELAY_LINGER",
    "RELAY_TIMEOUT",
    "Relay",
    "Uplink",
]

logger = logging.getLogger(__name__)

BATCH_MAX = 512
"""Messages per batch at most (a region's groups times a few kinds fit in one)."""
FORWARD_TIMEOUT = 20.0
"""Seconds a relay waits for the coordinator to take a batch."""
RELAY_BACKOFF = 5.0
"""Seconds a relay whose batch did not reach the coordinator refuses messages, and a
leader whose relay failed sends straight."""
RELAY_LINGER = 0.002
"""Seconds the first message of a burst waits at an idle relay for the rest of it (one
batch where there would have been a few; a step's commit may wait this once more)."""
RELAY_TIMEOUT = 1.0
"""Seconds a leader waits for its relay to take a message before it sends it straight
(the relay answers once the message is queued: only a dead or stalled relay is slow)."""


Item = GroupReport | GroupBeat


class Relay:
    """Forwards leaders' reports and beats to the coordinator in batches (module docstring).

    ``report`` and ``group_beat`` are casts: they return once the message is queued. A
    batch the coordinator does not take is logged and dropped, as a lost message is, and
    for :data:`RELAY_BACKOFF` seconds after it the relay refuses what it is given
    (:class:`ActorUnavailableError`), so that leaders send straight and learn whether
    the coordinator took their messages rather than count on a relay that cannot
    reach it.
    """

    def __init__(self, fabric: Fabric) -> None:
        self.fabric = fabric
        self.tasks = Tasks()
        self._queue: list[Item] = []
        self._flushing = False
        self._stopped = False
        self._refuse_until = 0.0
        self.batches = 0
        self.forwarded = 0
        self.down_batches = 0

    async def down(self, batch: LeaderBatch) -> None:
        """The coordinator's orders and decisions for leaders of this region: posted on
        to each leader at once (a cast; what is lost is re-sent, straight, by the
        coordinator)."""
        if self._stopped:
            raise ActorUnavailableError("relay: stopped")
        posts: list[tuple[str, Any]] = list(batch.orders)
        for decision, leaders in zip(batch.decisions, batch.leaders, strict=True):
            posts.extend((leader, decision) for leader in leaders)
        self.down_batches += 1
        self.fabric.post_leaders(posts)

    async def report(self, report: GroupReport) -> None:
        self.forward(report)

    async def group_beat(self, beat: GroupBeat) -> None:
        self.forward(beat)

    def stop(self) -> None:
        self._stopped = True
        self.tasks.cancel_all()
        self._queue = []
        self._flushing = False

    def forward(self, item: Item) -> None:
        """Queue ``item`` for the next batch (on the running loop); raise
        :class:`ActorUnavailableError` when stopped, or while backing off."""
        if self._stopped:
            raise ActorUnavailableError("relay: stopped")
        if asyncio.get_running_loop().time() < self._refuse_until:
            raise ActorUnavailableError("relay: its last batch did not reach the coordinator")
        self._queue.append(item)
        if not self._flushing:
            self._flushing = True
            self.tasks.spawn(self._flush(), "relay to the coordinator")

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(RELAY_LINGER)
            while self._queue and not self._stopped:
                batch, self._queue = self._queue[:BATCH_MAX], self._queue[BATCH_MAX:]
                msg = ReportBatch(
                    reports=tuple(i for i in batch if isinstance(i, GroupReport)),
                    beats=tuple(i for i in batch if isinstance(i, GroupBeat)),
                )
                try:
                    await asyncio.wait_for(self.fabric.coordinator().batch(msg), FORWARD_TIMEOUT)
                except (SnapstoreError, asyncio.TimeoutError) as e:
                    self._refuse_until = asyncio.get_running_loop().time() + RELAY_BACKOFF
                    logger.info(
                        "relay: the coordinator did not take %d messages: %s",
                        len(batch),
                        describe(e),
                    )
                self.batches += 1
                self.forwarded += len(batch)
        finally:
            self._flushing = False


class Uplink:
    """A leader's way to the coordinator: through its region's relay, else straight.

    After its relay failed it sends straight for :data:`RELAY_BACKOFF` seconds, so that
    a stalled relay costs one timeout, not one per message."""

    def __init__(self, fabric: Fabric, relay: RelayLink | None) -> None:
        self.fabric = fabric
        self.relay = relay
        self._straight_until = 0.0

    async def report(self, report: GroupReport, relay_timeout: float = RELAY_TIMEOUT) -> None:
        if self.relay is not None and await self._relayed(self.relay.report, report, relay_timeout):
            return
        await self.fabric.coordinator().report(report)

    async def group_beat(self, beat: GroupBeat, relay_timeout: float = RELAY_TIMEOUT) -> None:
        relay = self.relay
        if relay is not None and await self._relayed(relay.group_beat, beat, relay_timeout):
            return
        await self.fabric.coordinator().group_beat(beat)

    async def _relayed(
        self, send: Callable[[Any], Awaitable[None]], msg: Any, timeout: float
    ) -> bool:
        now = asyncio.get_running_loop().time()
        if now < self._straight_until:
            return False
        try:
            await asyncio.wait_for(send(msg), timeout)
            return True
        except (SnapstoreError, asyncio.TimeoutError) as e:
            self._straight_until = asyncio.get_running_loop().time() + RELAY_BACKOFF
            logger.info("relay failed (%s); to the coordinator straight", describe(e))
            return False
