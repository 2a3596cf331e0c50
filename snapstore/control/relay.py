"""Relays: a region's leaders reach the coordinator through one node, in batches.

Every group's leader sends the coordinator a few messages per step (staged,
prepared, applied) and a beat a second. The coordinator's cost is mostly
per *message*: a Ray actor call, a decode, a task. So groups are put in
*regions* of ``StoreConfig.relay_groups`` (the membership names one node of
each region its relay: :attr:`snapstore.control.messages.NodeConfig.relay`),
and a leader sends through its region's relay:

- :class:`Relay` (on every node) forwards what it is given to the coordinator
  as one :class:`ReportBatch`; while a batch is on its way, what arrives
  waits and goes with the next one. Nothing waits on a timer: an idle relay
  forwards a report at once, a busy one batches exactly as much as the
  coordinator is behind. Sending to a relay is a cast, as sending to the
  coordinator is: it returns once the relay has the message.
- :class:`Uplink` (a leader's way up) sends through the relay, and straight
  to the coordinator when the relay does not answer within
  :data:`RELAY_TIMEOUT` or refuses: a dead or stalled relay delays a report,
  never loses it for good.

A relay keeps no state and decides nothing: it is part of the network. What
it may do to a message -- delay it, lose it (its node dies), deliver it after
a later one, deliver it twice (the leader timed out and sent it straight) --
the network may do too, and the protocol already repairs it: leaders re-send
staged reports, the coordinator re-sends prepare orders and decisions, and
every report is idempotent. The simulation runs schedules with relays on
(``tests/sim``), crashing and stalling relay nodes among the rest.

The way down (prepare orders, decisions) is one post per step already
(:meth:`snapstore.control.links.Fabric.post_leaders`).
"""

from __future__ import annotations

import asyncio
import logging

from snapstore.control.links import Fabric, RelayLink
from snapstore.control.messages import GroupBeat, GroupReport, ReportBatch
from snapstore.control.runtime import Tasks
from snapstore.errors import SnapstoreError
from snapstore.rpc import describe

__all__ = ["BATCH_MAX", "FORWARD_TIMEOUT", "RELAY_TIMEOUT", "Relay", "Uplink"]

logger = logging.getLogger(__name__)

BATCH_MAX = 512
"""Messages per batch at most (a region's groups times a few kinds fit in one)."""
FORWARD_TIMEOUT = 20.0
"""Seconds a relay waits for the coordinator to take a batch."""
RELAY_TIMEOUT = 1.0
"""Seconds a leader waits for its relay to take a message before it sends it straight
(the relay answers once the message is queued: only a dead or stalled relay is slow)."""


Item = GroupReport | GroupBeat


class Relay:
    """Forwards leaders' reports and beats to the coordinator in batches (module docstring).

    ``report`` and ``group_beat`` are casts: they return once the message is queued. A
    batch the coordinator does not take is logged and dropped, as a lost message is
    (the senders' re-sends repair it).
    """

    def __init__(self, fabric: Fabric) -> None:
        self.fabric = fabric
        self.tasks = Tasks()
        self._queue: list[Item] = []
        self._flushing = False
        self.batches = 0
        self.forwarded = 0

    async def report(self, report: GroupReport) -> None:
        self.forward(report)

    async def group_beat(self, beat: GroupBeat) -> None:
        self.forward(beat)

    def stop(self) -> None:
        self.tasks.cancel_all()
        self._queue = []

    def forward(self, item: Item) -> None:
        """Queue ``item`` for the next batch (on the running loop)."""
        self._queue.append(item)
        if not self._flushing:
            self._flushing = True
            self.tasks.spawn(self._flush(), "relay to the coordinator")

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:BATCH_MAX], self._queue[BATCH_MAX:]
                msg = ReportBatch(
                    reports=tuple(i for i in batch if isinstance(i, GroupReport)),
                    beats=tuple(i for i in batch if isinstance(i, GroupBeat)),
                )
                try:
                    await asyncio.wait_for(self.fabric.coordinator().batch(msg), FORWARD_TIMEOUT)
                except (SnapstoreError, asyncio.TimeoutError) as e:
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
    """A leader's way to the coordinator: through its region's relay, else straight."""

    def __init__(self, fabric: Fabric, relay: RelayLink | None) -> None:
        self.fabric = fabric
        self.relay = relay

    async def report(self, report: GroupReport) -> None:
        if self.relay is not None and await self._relayed(self.relay.report(report)):
            return
        await self.fabric.coordinator().report(report)

    async def group_beat(self, beat: GroupBeat) -> None:
        if self.relay is not None and await self._relayed(self.relay.group_beat(beat)):
            return
        await self.fabric.coordinator().group_beat(beat)

    @staticmethod
    async def _relayed(send: object) -> bool:
        try:
            await asyncio.wait_for(send, RELAY_TIMEOUT)  # type: ignore[arg-type]
            return True
        except (SnapstoreError, asyncio.TimeoutError) as e:
            logger.info("relay failed (%s); to the coordinator straight", describe(e))
            return False
