"""One versioned msgpack encoding for every message that crosses a process boundary.

Messages are frozen dataclasses or msgspec Structs marked with :func:`message`
(the control plane's many small messages are Structs: they decode in a third
less time; both encode the same way). On the wire a
message is ``[WIRE_VERSION, tag, {field: value}]``; nested messages are maps
the same way, tuples are arrays, enums their values. Nothing is pickled.

Encoding and decoding are msgspec's, in C: decoding checks every field
against the dataclass's annotations and builds the message without running
Python per field. A field of the wrong type, a missing field, an unknown tag
or another wire version raises :class:`snapstore.errors.FormatError` naming
the message and the field (``GroupBeat.infos[0].counters``), so a malformed
or hostile message is refused before anything acts on it. The decoder
allocates nothing beyond what the encoded bytes hold.

Within one wire version a field may be added to a message with a default:
older encodings, which lack it, decode with the default; newer fields an
older decoder does not know are skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, TypeVar

import msgspec

from snapstore.errors import FormatError

__all__ = ["WIRE_VERSION", "decode", "decode_any", "encode", "message"]

WIRE_VERSION = 3
"""3: fields as maps (decoded by msgspec); 2 sent them as arrays."""
MAX_MESSAGE = 256 << 20
"""Largest encoded message accepted (a record of tens of thousands of ranks is a few MiB)."""

T = TypeVar("T")

_REGISTRY: dict[str, type] = {}


def message(cls: type[T]) -> type[T]:
    """Register a frozen dataclass or msgspec Struct as a wire message under its class name."""
    if not (dataclasses.is_dataclass(cls) or issubclass(cls, msgspec.Struct)):
        raise TypeError(f"{cls.__name__} must be a dataclass or a Struct to be a wire message")
    tag = cls.__name__
    if tag in _REGISTRY and _REGISTRY[tag] is not cls:
        raise TypeError(f"two wire messages are named {tag}")
    _REGISTRY[tag] = cls
    return cls


# -- encoding ---------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """What msgspec does not encode itself: numbers of other types (numpy's) as Python's."""
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"wire messages cannot carry a {type(value).__name__}")


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_plain)


def encode(msg: Any) -> bytes:
    """The wire bytes of a registered message."""
    tag = type(msg).__name__
    if _REGISTRY.get(tag) is not type(msg):
        raise TypeError(f"{tag} is not a registered wire message")
    try:
        return _ENCODER.encode((WIRE_VERSION, tag, msg))
    except (TypeError, msgspec.EncodeError) as e:
        raise TypeError(f"{tag} cannot be encoded: {e}") from None


# -- decoding ---------------------------------------------------------------------

_ENVELOPE = msgspec.msgpack.Decoder(tuple[int, str, msgspec.Raw])


@functools.cache
def _decoder(cls: type) -> msgspec.msgpack.Decoder[Any]:
    """The typed decoder of a message class, built at its first decode (messages refer to
    classes of other modules, which must all be defined by then)."""
    return msgspec.msgpack.Decoder(cls)


def decode(data: bytes, expect: type[T]) -> T:
    """The message encoded in ``data``, which must be an ``expect``; FormatError otherwise."""
    tag, fields = _envelope(data, expect.__name__)
    if tag != expect.__name__:
        raise FormatError(f"expected a {expect.__name__}, got {tag!r}")
    return _fields(expect, fields)


def decode_any(data: bytes, *expect: type) -> Any:
    """The message in ``data``, which must be one of ``expect`` (e.g. a reply or an error)."""
    names = " or ".join(t.__name__ for t in expect)
    tag, fields = _envelope(data, names)
    for t in expect:
        if t.__name__ == tag:
            return _fields(t, fields)
    raise FormatError(f"expected a {names}, got {tag!r}")


def _envelope(data: bytes, what: str) -> tuple[str, msgspec.Raw]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FormatError(f"a {what} must arrive as bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE:
        raise FormatError(f"a {what} of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        version, tag, fields = _ENVELOPE.decode(data)
    except msgspec.ValidationError:
        raise FormatError(f"a {what} must be [version, tag, fields]") from None
    except msgspec.DecodeError as e:
        raise FormatError(f"a {what} is not valid msgpack: {e}") from None
    if version != WIRE_VERSION:
        raise FormatError(f"wire version {version!r}, expected {WIRE_VERSION}")
    return tag, fields


def _fields(cls: type, fields: msgspec.Raw) -> Any:
    try:
        return _decoder(cls).decode(fields)
    except msgspec.ValidationError as e:
        # msgspec names the path from the root as ``$`` (and a wrong root not at all): the
        # message's name instead.
        said = str(e)
        named = said.replace("`$", f"`{cls.__name__}")
        raise FormatError(named if named != said else f"{said} - at `{cls.__name__}`") from None
    except msgspec.DecodeError as e:
        raise FormatError(f"a {cls.__name__} is not valid msgpack: {e}") from None
