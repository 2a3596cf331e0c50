"""The wire encoding of messages: round trips, and every wrongly typed field refused by name.

Decoding is msgspec's, typed by each message's annotations: these tests pin that it
refuses what the annotations refuse (a bool for an int, a str key for an int key) and
that the error names the message and the field.
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


def _tamper(msg: Any, name: str, value: Any) -> bytes:
    """The message's wire bytes with field ``name`` replaced by ``value``."""
    version, tag, fields = msgpack.unpackb(encode(msg), raw=False, strict_map_key=False)
    fields[name] = value
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
    ("name", "value", "field"),
    [
        ("sessions", {0: "a", True: "b"}, "GroupReport.sessions"),  # a bool is not an int
        ("sessions", {0: "a", None: "b"}, "GroupReport.sessions"),
        ("sessions", {0: "a", 1.0: "b"}, "GroupReport.sessions"),
        ("sessions", {0: "a", 1: 5}, "GroupReport.sessions"),  # a value of the wrong type
        ("sessions", {0: "a", "1": "b"}, "GroupReport.sessions"),  # a key of the wrong type
        ("sessions", {0: "a", 1: None}, "GroupReport.sessions"),
        ("group", ["n0", 1], "GroupReport.group"),
        ("group", "n0", "GroupReport.group"),
    ],
)
def test_a_wrongly_typed_item_is_refused_naming_its_field(
    name: str, value: Any, field: str
) -> None:
    with pytest.raises(FormatError, match=field):
        decode(_tamper(_report(), name, value), GroupReport)


def test_a_wrong_item_deep_in_a_nested_message_is_named() -> None:
    info = NodeInfo("n0", "i0", PeerInfo("n0", "h", "/d", "127.0.0.1", 1), counters={"saves": 3})
    beat = GroupBeat(3, "n0", (info,), {})
    version, tag, fields = msgpack.unpackb(encode(beat), raw=False, strict_map_key=False)
    fields["infos"][0]["counters"] = {"saves": "three"}
    data = bytes(msgpack.packb([version, tag, fields], use_bin_type=True))
    with pytest.raises(FormatError, match=r"GroupBeat.infos\[0\].counters"):
        decode(data, GroupBeat)


def test_step_records_refuse_a_wrong_rank_field() -> None:
    ranks = {r: RankEntry(GROUP[r % 4], 100, (1, 2)) for r in range(8)}
    rec = StepRecord("j", 1, 0, 2, 2, 8, ranks, (GROUP,), ())
    assert StepRecord.from_bytes(rec.to_bytes()) == rec
    doc = msgpack.unpackb(rec.to_bytes(), raw=False, strict_map_key=False)
    for bad in (["n0", 100, [1, True]], ["n0", -1.0, [1, 2]], [5, 100, [1, 2]], ["n0", 100]):
        doc["ranks"][0] = bad
        with pytest.raises(FormatError):
            StepRecord.from_bytes(msgpack.packb(doc, use_bin_type=True))


def test_integers_take_the_whole_msgpack_range() -> None:
    for step in ((1 << 64) - 1, -(1 << 63)):
        assert decode(encode(_report(step=step)), GroupReport).step == step


def test_a_missing_field_an_unknown_tag_and_another_version_are_refused() -> None:
    version, tag, fields = msgpack.unpackb(encode(_report()), raw=False, strict_map_key=False)
    del fields["leader"]
    with pytest.raises(FormatError, match="leader"):
        decode(msgpack.packb([version, tag, fields]), GroupReport)
    with pytest.raises(FormatError, match="expected a GroupReport"):
        decode(encode(GroupBeat(3, "n0", ())), GroupReport)
    with pytest.raises(FormatError, match="wire version"):
        decode(msgpack.packb([version - 1, tag, fields]), GroupReport)
    with pytest.raises(FormatError, match="not valid msgpack"):
        decode(encode(_report())[:-3], GroupReport)
    with pytest.raises(FormatError, match=r"\[version, tag, fields\]"):
        decode(msgpack.packb({"v": version}), GroupReport)


def test_numbers_of_other_types_are_sent_as_python_numbers() -> None:
    import numpy as np

    msg = _report(stats={"parity_seconds": np.float64(0.25), "peer_bytes": np.int64(7)})
    got = decode(encode(msg), GroupReport)
    assert got.stats == {"parity_seconds": 0.25, "peer_bytes": 7}
    with pytest.raises(TypeError, match="GroupReport"):
        encode(_report(stats={"x": object()}))


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("step", "7", "GroupReport.step"),
        ("step", True, "GroupReport.step"),  # a bool is not an int
        ("step", 7.0, "GroupReport.step"),
        ("job", b"j", "GroupReport.job"),
        ("prepared", "slice", "GroupReport.prepared"),  # bytes or nothing
        ("applied", 1, "GroupReport.applied"),
    ],
)
def test_a_wrongly_typed_scalar_field_is_refused_by_name(name: str, value: Any, field: str) -> None:
    with pytest.raises(FormatError, match=field):
        decode(_tamper(_report(), name, value), GroupReport)


def test_an_older_encoding_decodes_with_the_defaults_and_a_newer_one_too() -> None:
    version, tag, fields = msgpack.unpackb(encode(_report()), raw=False, strict_map_key=False)
    for name in ("sessions", "prepared", "failed", "stats", "applied"):
        del fields[name]
    fields["a_field_of_a_newer_version"] = [1, 2]
    short = bytes(msgpack.packb([version, tag, fields], use_bin_type=True))
    msg = decode(short, GroupReport)
    assert msg == _report(sessions={}, stats={})
    assert msg.prepared is None and msg.applied is False and msg.failed == ""


def test_a_decoded_message_is_frozen_and_equal_to_the_one_built() -> None:
    msg = decode(encode(_report()), GroupReport)
    assert msg == _report() and type(msg) is GroupReport
    with pytest.raises(AttributeError):
        msg.step = 8  # type: ignore[misc]
    # An int where a float is declared is taken, as a float.
    beat = GroupBeat(3, "n0", (), {"n1": 2.5})
    version, tag, fields = msgpack.unpackb(encode(beat), raw=False, strict_map_key=False)
    fields["silent"] = {"n1": 2}
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
    with pytest.raises(FormatError, match=r"WireTestOne\.only"):
        decode(_tamper_any(WireTestOne(7), {"only": "7"}), WireTestOne)


def _tamper_any(msg: Any, fields: Any) -> bytes:
    version, tag, _ = msgpack.unpackb(encode(msg), raw=False, strict_map_key=False)
    return bytes(msgpack.packb([version, tag, fields], use_bin_type=True))
