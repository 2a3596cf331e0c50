"""The wire encoding of messages: round trips, and every wrongly typed field refused by name.

Containers of plain ints and strings are checked in bulk (at C speed) and fall
back to item-by-item conversion when any item is wrong: these tests pin that
the fast path accepts exactly what the slow one does.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from snapstore.control.messages import (
    Decision,
    GroupBeat,
    GroupReport,
    LeaderBatch,
    NodeInfo,
    OutcomeStatus,
    PrepareOrder,
)
from snapstore.errors import FormatError
from snapstore.format.record import RankEntry, StepRecord
from snapstore.format.wire import decode, encode
from snapstore.format.work import PeerInfo

GROUP = ("n0", "n1", "n2", "n3")


def _report(**changes: Any) -> GroupReport:
    base: dict[str, Any] = {
        "job": "j",
        "step": 7,
        "version": -1,
        "epoch": 3,
        "leader": "n0",
        "group": GROUP,
        "world_size": 64,
        "sessions": {r: f"s{r}/7" for r in range(8)},
        "stats": {"client": {"waits": 2}, "parity_seconds": 0.5},
    }
    base.update(changes)
    return GroupReport(**base)


def _tamper(msg: Any, index: int, value: Any) -> bytes:
    """The message's wire bytes with field ``index`` replaced by ``value``."""
    version, tag, fields = msgpack.unpackb(encode(msg), raw=False, strict_map_key=False)
    fields[index] = value
    return bytes(msgpack.packb([version, tag, fields], use_bin_type=True))


def test_messages_round_trip() -> None:
    info = NodeInfo("n0", "i0", PeerInfo("n0", "h", "/d", "127.0.0.1", 1), counters={"saves": 3})
    for msg in (
        _report(),
        _report(version=2, prepared=b"\x00slice", applied=True, sessions={}),
        GroupBeat(3, "n0", (info, info), {"n1": 2.5}),
        PrepareOrder("j", 7, 2, 3, 64, {0: "s0/7", 63: "s63/7"}),
        Decision("j", 7, 2, OutcomeStatus.FAILED, reason="x", sessions=("s0/7",)),
    ):
        assert decode(encode(msg), type(msg)) == msg


@pytest.mark.parametrize(
    ("index", "value", "field"),
    [
        (7, {0: "a", True: "b"}, "GroupReport.sessions"),  # a bool is not an int
        (7, {0: "a", None: "b"}, "GroupReport.sessions"),
        (7, {0: "a", 1.0: "b"}, "GroupReport.sessions"),
        (7, {0: "a", 1: 5}, "GroupReport.sessions"),  # a value of the wrong type
        (7, {0: "a", "1": "b"}, "GroupReport.sessions"),  # a key of the wrong type
        (7, {0: "a", 1: None}, "GroupReport.sessions"),
        (5, ["n0", 1], "GroupReport.group"),
        (5, "n0", "GroupReport.group"),
    ],
)
def test_a_wrongly_typed_item_is_refused_naming_its_field(
    index: int, value: Any, field: str
) -> None:
    with pytest.raises(FormatError, match=field):
        decode(_tamper(_report(), index, value), GroupReport)


def test_a_wrong_item_deep_in_a_nested_message_is_named() -> None:
    info = NodeInfo("n0", "i0", PeerInfo("n0", "h", "/d", "127.0.0.1", 1), counters={"saves": 3})
    beat = GroupBeat(3, "n0", (info,), {})
    version, tag, fields = msgpack.unpackb(encode(beat), raw=False, strict_map_key=False)
    fields[2][0][-1] = {"saves": "three"}
    data = bytes(msgpack.packb([version, tag, fields], use_bin_type=True))
    with pytest.raises(FormatError, match=r"GroupBeat.infos: NodeInfo.counters"):
        decode(data, GroupBeat)


def test_step_records_refuse_a_wrong_rank_field() -> None:
    ranks = {r: RankEntry(GROUP[r % 4], 100, (1, 2)) for r in range(8)}
    rec = StepRecord("j", 1, 0, 2, 2, 8, ranks, (GROUP,), ())
    assert StepRecord.from_bytes(rec.to_bytes()) == rec
    doc = msgpack.unpackb(rec.to_bytes(), raw=False)
    for bad in ([0, "n0", 100, [1, True]], [0, "n0", -1.0, [1, 2]], [0, 5, 100, [1, 2]]):
        doc["ranks"][0] = bad
        with pytest.raises(FormatError):
            StepRecord.from_bytes(msgpack.packb(doc, use_bin_type=True))


def test_integers_out_of_range_are_refused() -> None:
    from snapstore.format.wire import from_plain

    assert from_plain(tuple[int, ...], [0, (1 << 64) - 1]) == (0, (1 << 64) - 1)
    with pytest.raises(FormatError, match="an integer"):
        from_plain(tuple[int, ...], [0, 1 << 64])
    with pytest.raises(FormatError, match="an integer"):
        from_plain(dict[int, str], {-(1 << 63) - 1: "a"})


@pytest.mark.parametrize(
    ("index", "value", "field"),
    [
        (1, "7", "GroupReport.step"),
        (1, True, "GroupReport.step"),  # a bool is not an int
        (1, 7.0, "GroupReport.step"),
        (0, b"j", "GroupReport.job"),
        (8, "slice", "GroupReport.prepared"),  # bytes or nothing
        (11, 1, "GroupReport.applied"),
    ],
)
def test_a_wrongly_typed_scalar_field_is_refused_by_name(
    index: int, value: Any, field: str
) -> None:
    """The converter generated per message checks scalar fields inline; a failing check
    goes to the general path, which names the field."""
    with pytest.raises(FormatError, match=field):
        decode(_tamper(_report(), index, value), GroupReport)


def test_an_older_shorter_encoding_decodes_with_the_defaults() -> None:
    version, tag, fields = msgpack.unpackb(encode(_report()), raw=False, strict_map_key=False)
    short = bytes(msgpack.packb([version, tag, fields[:7]], use_bin_type=True))
    msg = decode(short, GroupReport)
    assert msg == _report(sessions={}, stats={})
    assert msg.prepared is None and msg.applied is False and msg.failed == ""


def test_a_decoded_message_is_a_frozen_dataclass_equal_to_the_one_built() -> None:
    import dataclasses

    msg = decode(encode(_report()), GroupReport)
    assert msg == _report() and type(msg) is GroupReport
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.step = 8  # type: ignore[misc]
    # An int where a float is declared is taken (the general path converts it).
    beat = GroupBeat(3, "n0", (), {"n1": 2.5})
    version, tag, fields = msgpack.unpackb(encode(beat), raw=False, strict_map_key=False)
    fields[3] = {"n1": 2}
    got = decode(bytes(msgpack.packb([version, tag, fields], use_bin_type=True)), GroupBeat)
    assert got.silent == {"n1": 2.0} and type(got.silent["n1"]) is float


def test_a_leader_batch_round_trips() -> None:
    order = PrepareOrder("j", 7, 2, 3, 64, {0: "s0/7"})
    decision = Decision("j", 6, 1, OutcomeStatus.COMMITTED)
    batch = LeaderBatch((("n0", order),), (decision,), (("n0", "n4"),))
    assert decode(encode(batch), LeaderBatch) == batch


def test_messages_of_no_field_and_of_one_field_round_trip() -> None:
    import dataclasses

    from snapstore.format.wire import message

    @message
    @dataclasses.dataclass(frozen=True)
    class WireTestNothing:
        pass

    @message
    @dataclasses.dataclass(frozen=True)
    class WireTestOne:
        only: int

    assert decode(encode(WireTestNothing()), WireTestNothing) == WireTestNothing()
    assert decode(encode(WireTestOne(7)), WireTestOne) == WireTestOne(7)
    with pytest.raises(FormatError, match="WireTestNothing"):
        decode(_tamper_any(WireTestNothing(), [1]), WireTestNothing)


def _tamper_any(msg: Any, fields: Any) -> bytes:
    version, tag, _ = msgpack.unpackb(encode(msg), raw=False, strict_map_key=False)
    return bytes(msgpack.packb([version, tag, fields], use_bin_type=True))
