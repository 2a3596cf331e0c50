"""One versioned msgpack encoding for every message that crosses a process boundary.

Messages are frozen dataclasses marked with :func:`message`. On the wire a
message is ``[WIRE_VERSION, tag, [field values in declaration order]]``;
nested messages, tuples, dicts, enums and optional fields are encoded the
same way, recursively. Nothing is pickled.

Decoding is checked against the dataclass's annotations: a field of the
wrong type, a missing field, an unknown tag or another wire version raises
:class:`snapstore.errors.FormatError` naming the message and the field, so
a malformed or hostile message is refused before anything acts on it. The
decoder allocates nothing beyond what the encoded bytes hold (msgpack
bounds every container by the input's length).

Within one wire version, a field may be added at the end of a message with
a default: older encodings (shorter lists) still decode.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar, Union

import msgpack

from snapstore.errors import FormatError

__all__ = [
    "WIRE_VERSION",
    "decode",
    "decode_any",
    "encode",
    "from_plain",
    "message",
    "to_plain",
]

WIRE_VERSION = 2
"""2: GroupReport lost its ``ranks`` field (a field removed: a new version)."""
MAX_MESSAGE = 256 << 20
"""Largest encoded message accepted (a record of tens of thousands of ranks is a few MiB)."""

T = TypeVar("T")

_REGISTRY: dict[str, type] = {}


def message(cls: type[T]) -> type[T]:
    """Register a frozen dataclass as a wire message under its class name."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass to be a wire message")
    tag = cls.__name__
    if tag in _REGISTRY and _REGISTRY[tag] is not cls:
        raise TypeError(f"two wire messages are named {tag}")
    _REGISTRY[tag] = cls
    return cls


# -- encoding ---------------------------------------------------------------------


_SCALARS = frozenset({int, float, str, bool, bytes, type(None)})
"""Types msgpack packs as they are: a container holding only these is copied, not walked."""
_FIELDS: dict[type, Callable[[Any], tuple[Any, ...]]] = {}
"""Of each dataclass met while encoding: its field values, in declaration order."""


def to_plain(value: Any) -> Any:
    """A message (or anything inside one) as msgpack-able lists, dicts and scalars
    (containers of scalars are given to msgpack as they are: it only reads them)."""
    t = type(value)
    fields = _FIELDS.get(t)
    if fields is not None:
        scalars = _SCALARS
        return [v if type(v) in scalars else to_plain(v) for v in fields(value)]
    if t in _SCALARS:
        return value
    if t is list or t is tuple:
        if set(map(type, value)) <= _SCALARS:
            return value
        return [to_plain(v) for v in value]
    if t is dict:
        if set(map(type, value)) <= _SCALARS and set(map(type, value.values())) <= _SCALARS:
            return value
        return {to_plain(k): to_plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = [f.name for f in dataclasses.fields(value)]
        if len(names) > 1:
            _FIELDS[t] = operator.attrgetter(*names)
        elif names:
            one = operator.attrgetter(names[0])
            _FIELDS[t] = lambda v: (one(v),)
        else:
            _FIELDS[t] = lambda v: ()
        return to_plain(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {to_plain(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(to_plain(v) for v in value)
    return value


def encode(msg: Any) -> bytes:
    """The wire bytes of a registered message."""
    tag = type(msg).__name__
    if _REGISTRY.get(tag) is not type(msg):
        raise TypeError(f"{tag} is not a registered wire message")
    return bytes(msgpack.packb([WIRE_VERSION, tag, to_plain(msg)], use_bin_type=True))


# -- decoding ---------------------------------------------------------------------


def decode(data: bytes, expect: type[T]) -> T:
    """The message encoded in ``data``, which must be an ``expect``; FormatError otherwise."""
    tag, fields = _envelope(data, expect.__name__)
    if tag != expect.__name__:
        raise FormatError(f"expected a {expect.__name__}, got {tag!r}")
    message: T = from_plain(expect, fields)
    return message


def decode_any(data: bytes, *expect: type) -> Any:
    """The message in ``data``, which must be one of ``expect`` (e.g. a reply or an error)."""
    names = " or ".join(t.__name__ for t in expect)
    tag, fields = _envelope(data, names)
    for t in expect:
        if t.__name__ == tag:
            return from_plain(t, fields)
    raise FormatError(f"expected a {names}, got {tag!r}")


def _envelope(data: bytes, what: str) -> tuple[Any, Any]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FormatError(f"a {what} must arrive as bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE:
        raise FormatError(f"a {what} of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as e:
        raise FormatError(f"a {what} is not valid msgpack: {e}") from None
    if not isinstance(doc, list) or len(doc) != 3:
        raise FormatError(f"a {what} must be [version, tag, fields]")
    version, tag, fields = doc
    if version != WIRE_VERSION:
        raise FormatError(f"wire version {version!r}, expected {WIRE_VERSION}")
    return tag, fields


def from_plain(tp: Any, value: Any, where: str = "") -> Any:
    """Convert a decoded msgpack value to type ``tp``, checking it; FormatError if it is not."""
    return _converter(tp)(value) if not where else _checked(tp, value, where)


def _checked(tp: Any, value: Any, where: str) -> Any:
    try:
        return _converter(tp)(value)
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None


_CONVERTERS: dict[Any, Callable[[Any], Any]] = {}


def _converter(tp: Any) -> Callable[[Any], Any]:
    conv = _CONVERTERS.get(tp)
    if conv is None:
        conv = _CONVERTERS[tp] = _make_converter(tp)
    return conv


def _fail(what: str, value: Any) -> FormatError:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return FormatError(f"expected {what}, found {shown}")


_I64 = 1 << 63
_U64 = (1 << 64) - 1


def _int(v: Any) -> int:
    if type(v) is not int or not -_I64 <= v <= _U64:
        raise _fail("an integer", v)
    return v


def _float(v: Any) -> float:
    if type(v) is float:
        return v
    if type(v) is int:
        return float(v)
    raise _fail("a number", v)


def _str(v: Any) -> str:
    if type(v) is not str:
        raise _fail("a string", v)
    return v


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise _fail("a boolean", v)
    return v


def _bytes(v: Any) -> bytes:
    if not isinstance(v, (bytes, bytearray)):
        raise _fail("bytes", v)
    return bytes(v)


def _any(v: Any) -> Any:
    return v


def _all_ints(v: Any) -> bool:
    """Every item of ``v`` (a list, or a map's keys or values) is an int in range."""
    return set(map(type, v)) <= {int} and (not v or (min(v) >= -_I64 and max(v) <= _U64))


def _all_strs(v: Any) -> bool:
    return set(map(type, v)) <= {str}


_BULK: dict[Callable[[Any], Any], Callable[[Any], bool]] = {_int: _all_ints, _str: _all_strs}
"""Item checks done over a whole container at C speed; an item that fails one is then
converted one by one, which raises the precise error."""


def _make_converter(tp: Any) -> Callable[[Any], Any]:
    if tp is int:
        return _int
    if tp is float:
        return _float
    if tp is str:
        return _str
    if tp is bool:
        return _bool
    if tp is bytes:
        return _bytes
    if tp is Any or tp is object:
        return _any
    if tp is type(None):

        def none(v: Any) -> None:
            if v is not None:
                raise _fail("nothing (nil)", v)

        return none
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        members = {m.value: m for m in tp}

        def enum_conv(v: Any) -> Any:
            try:
                return members[v]
            except (KeyError, TypeError):
                raise _fail(f"one of {sorted(map(str, members))}", v) from None

        return enum_conv
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass_converter(tp)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        convs = [_converter(a) for a in args]
        optional = type(None) in args

        def union(v: Any) -> Any:
            if v is None and optional:
                return None
            errors = []
            for c in convs:
                try:
                    return c(v)
                except FormatError as e:
                    errors.append(str(e))
            raise FormatError(" or ".join(errors))

        return union
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item = _converter(args[0])
            bulk = _BULK.get(item)

            def var_tuple(v: Any) -> tuple[Any, ...]:
                if not isinstance(v, list):
                    raise _fail("a list", v)
                if bulk is not None and bulk(v):
                    return tuple(v)
                return tuple(item(x) for x in v)

            return var_tuple
        items = [_converter(a) for a in args]

        def fixed_tuple(v: Any) -> tuple[Any, ...]:
            if not isinstance(v, list) or len(v) != len(items):
                raise _fail(f"a list of {len(items)}", v)
            return tuple(c(x) for c, x in zip(items, v, strict=True))

        return fixed_tuple
    if origin in (list, frozenset, set):
        item = _converter(args[0])
        kind: Callable[[Any], Any] = {list: list, frozenset: frozenset, set: set}[origin]

        def seq(v: Any) -> Any:
            if not isinstance(v, list):
                raise _fail("a list", v)
            return kind(item(x) for x in v)

        return seq
    if origin is dict:
        kc, vc = _converter(args[0]), _converter(args[1])
        kbulk, vbulk = _BULK.get(kc), _BULK.get(vc)

        def mapping(v: Any) -> dict[Any, Any]:
            if not isinstance(v, dict):
                raise _fail("a map", v)
            if (
                kbulk is not None
                and (vbulk is not None or vc is _any)
                and kbulk(v.keys())
                and (vbulk is None or vbulk(v.values()))
            ):
                return v  # msgpack's own fresh map: nothing else holds it
            return {kc(k): vc(x) for k, x in v.items()}

        return mapping
    raise TypeError(f"wire messages cannot carry {tp!r}")


def _dataclass_converter(cls: type) -> Callable[[Any], Any]:
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    required = sum(
        1
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    name = cls.__name__
    # The fields' converters, resolved at the first decode (messages may refer to each
    # other, so not while this one is being made).
    convs: list[Callable[[Any], Any]] = []

    def general(v: Any) -> Any:
        """Any list a version of this message may send (fields left off the end take
        their defaults); a field of the wrong type is named."""
        if not isinstance(v, list) or not required <= len(v) <= len(fields):
            raise _fail(f"a {name} ({required}-{len(fields)} fields)", v)
        if not convs:
            convs.extend(_converter(hints[f.name]) for f in fields)
        try:
            return cls(*[c(x) for c, x in zip(convs, v, strict=False)])
        except FormatError:
            pass
        for f, conv, x in zip(fields, convs, v, strict=False):
            try:
                conv(x)
            except FormatError as e:
                raise FormatError(f"{name}.{f.name}: {e}") from None
        raise AssertionError("unreachable: a field failed once and then passed")

    fast: list[Callable[[Any], Any]] = []

    def convert(v: Any) -> Any:
        if not fast:
            fast.append(_fast_converter(cls, [hints[f.name] for f in fields], general))
        return fast[0](v)

    return convert


_INLINE = {
    int: "(type({v}) is int and {lo} <= {v} <= {hi})",
    str: "type({v}) is str",
    bool: "type({v}) is bool",
    float: "type({v}) is float",
    bytes: "type({v}) is bytes",
}
"""A field of these types is checked inline by a generated converter; ``float`` and
``bytes`` also accept ints and bytearrays, which the general path converts."""


def _fast_converter(
    cls: type, types_: list[Any], general: Callable[[Any], Any]
) -> Callable[[Any], Any]:
    """A converter generated for ``cls``: the common case (every field sent, each of its
    type) checked with inline type tests and built without ``__init__``'s per-field
    ``object.__setattr__`` of a frozen dataclass; anything else goes to ``general``,
    which converts what older versions send and names the field that is wrong.

    Fields are what ``cls`` declares, so the generated source holds only its field names
    and type tests: nothing of the decoded message."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    if not names:
        return general  # nothing to check inline
    direct = (
        not hasattr(cls, "__post_init__")
        and hasattr(cls, "__dict__")
        and all(f.init for f in dataclasses.fields(cls))
    )
    env: dict[str, Any] = {
        "general": general,
        "cls": cls,
        "new": object.__new__,
        "FormatError": FormatError,
    }
    checks: list[str] = []
    converts: list[str] = []
    for i, tp in enumerate(types_):
        var = f"f{i}"
        args = typing.get_args(tp)
        inline = _INLINE.get(tp)
        if inline is None and typing.get_origin(tp) in (Union, types.UnionType):
            rest = [a for a in args if a is not type(None)]
            if len(rest) == 1 and rest[0] in _INLINE and len(args) == 2:
                inline = f"({{v}} is None or {_INLINE[rest[0]]})"
        if inline is not None:
            checks.append(inline.format(v=var, lo=-_I64, hi=_U64))
        else:
            env[f"c{i}"] = _converter(tp)
            converts.append(f"        {var} = c{i}({var})")
    unpack = ", ".join(f"f{i}" for i in range(len(names))) + ("," if len(names) == 1 else "")
    lines = [
        "def convert(v):",
        f"    if type(v) is not list or len(v) != {len(names)}:",
        "        return general(v)",
        f"    {unpack} = v",
    ]
    if checks:
        lines += [f"    if not ({' and '.join(checks)}):", "        return general(v)"]
    if converts:
        lines += ["    try:", *converts, "    except FormatError:", "        return general(v)"]
    if direct:
        body = ", ".join(f"{n!r}: f{i}" for i, n in enumerate(names))
        lines += ["    o = new(cls)", f"    o.__dict__.update({{{body}}})", "    return o"]
    else:
        lines.append(f"    return cls({', '.join(f'f{i}' for i in range(len(names)))})")
    namespace: dict[str, Any] = {}
    exec(compile("\n".join(lines), f"<wire converter of {cls.__name__}>", "exec"), env, namespace)
    convert: Callable[[Any], Any] = namespace["convert"]
    return convert
