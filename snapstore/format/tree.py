"""The state tree: walking it, and encoding and decoding its non-tensor values.

A training state is a tree of dicts, lists and tuples whose leaves are
tensors, numpy arrays and plain values. :func:`flatten` walks it once, checks
every type (naming the exact path of anything it cannot store) and lists the
tensor/array leaves with their paths. :func:`encode_tree` then writes the tree
as msgpack with each leaf replaced by a reference into the layout's leaf
table; :class:`TreeDecoder` reads it back.

The walk runs every step, so it is written for speed: scalars inside
containers are skipped without a call, and the msgpack C encoder does the rest
of the traversal, calling back into Python only for leaves and the few types
msgpack lacks (tuple, big int, OrderedDict, numpy scalar, dtype, Size, device).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch

from snapstore.errors import FormatError, UnsupportedTypeError
from snapstore.format.manifest import (
    EXT_BIGINT,
    EXT_DEVICE,
    EXT_DTYPE,
    EXT_LEAF,
    EXT_NPSCALAR,
    EXT_ODICT,
    EXT_SIZE,
    EXT_TUPLE,
    MAX_DEPTH,
    Decoder,
    bigint_bytes,
)

__all__ = [
    "LEAF_TYPES",
    "Flat",
    "TreeDecoder",
    "encode_tree",
    "flatten",
    "path_str",
    "unsupported",
]

Key = str | int

LEAF_TYPES: frozenset[type] = frozenset({torch.Tensor, torch.nn.Parameter, np.ndarray})

_NP_SCALARS: frozenset[type] = frozenset(
    np.dtype(code).type for code in np.typecodes["All"] if np.dtype(code).kind in "biufc"
)
# Values stored inline in the manifest. torch.Size is a tuple of ints, so it is a scalar here.
_SCALARS: frozenset[type] = frozenset(
    {type(None), bool, int, float, str, bytes, torch.dtype, torch.device, torch.Size} | _NP_SCALARS
)
_CONTAINERS: frozenset[type] = frozenset({dict, OrderedDict, list, tuple})


def path_str(path: Sequence[Key]) -> str:
    """``state['optim']['state'][3]`` for the path ``("optim", "state", 3)``."""
    return "state" + "".join(f"[{k!r}]" for k in path)


def unsupported(path: str, value_type: type, reason: str | None = None) -> UnsupportedTypeError:
    """An UnsupportedTypeError for ``path``; ``reason`` replaces the generic message."""
    exc = UnsupportedTypeError(path, value_type)
    if reason is not None:
        exc.args = (f"{path}: {reason}",)
    return exc


@dataclass
class Flat:
    """The leaves of one state, in walk order, each object once."""

    leaves: list[Any]
    paths: list[tuple[Key, ...]]
    index: dict[int, int]
    """``id(leaf) -> position`` (the state keeps every leaf alive while this lives)."""
    aliases: list[tuple[tuple[Key, ...], int]]
    """Later paths at which an already listed leaf object appears again."""


def flatten(state: object) -> Flat:
    """Walk ``state``; raise UnsupportedTypeError (with its path) for anything not storable."""
    leaves: list[Any] = []
    paths: list[tuple[Key, ...]] = []
    index: dict[int, int] = {}
    aliases: list[tuple[tuple[Key, ...], int]] = []
    stack: list[Key] = []
    scalars = _SCALARS

    def leaf(obj: Any) -> None:
        j = index.get(id(obj))
        if j is None:
            index[id(obj)] = len(leaves)
            leaves.append(obj)
            paths.append(tuple(stack))
        else:
            aliases.append((tuple(stack), j))

    def visit(obj: Any, depth: int) -> None:
        t = type(obj)
        if depth >= MAX_DEPTH:
            raise FormatError(
                f"{path_str(stack)}: state nested deeper than {MAX_DEPTH} levels "
                "(or a container holds itself)"
            )
        if t is dict or t is OrderedDict:
            if t is OrderedDict:
                meta = getattr(obj, "_metadata", None)
                if meta is not None:
                    _check_plain(meta, f"{path_str(stack)}._metadata", depth + 1)
            for k, v in obj.items():
                tk = type(k)
                if tk is not str and tk is not int:
                    raise unsupported(
                        path_str(stack),
                        tk,
                        f"dict key {k!r:.60} has unsupported type {tk.__qualname__} "
                        "(keys must be str or int)",
                    )
                tv = type(v)
                if tv in scalars:
                    continue
                stack.append(k)
                if tv in LEAF_TYPES:
                    leaf(v)
                else:
                    visit(v, depth + 1)
                stack.pop()
        elif t is list or t is tuple:
            for i, v in enumerate(obj):
                tv = type(v)
                if tv in scalars:
                    continue
                stack.append(i)
                if tv in LEAF_TYPES:
                    leaf(v)
                else:
                    visit(v, depth + 1)
                stack.pop()
        elif t in LEAF_TYPES:
            leaf(obj)
        elif t not in scalars:
            raise unsupported(path_str(stack), t)

    visit(state, 0)
    return Flat(leaves, paths, index, aliases)


def _check_plain(obj: Any, where: str, depth: int) -> None:
    """Check a value that may hold containers and scalars but no tensors (``_metadata``)."""
    t = type(obj)
    if depth >= MAX_DEPTH:
        raise FormatError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if t is dict or t is OrderedDict:
        for k, v in obj.items():
            if type(k) is not str and type(k) is not int:
                raise unsupported(where, type(k), f"dict key {k!r:.60} is not str or int")
            _check_plain(v, f"{where}[{k!r}]", depth + 1)
    elif t is list or t is tuple:
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]", depth + 1)
    elif t not in _SCALARS:
        raise unsupported(where, t)


def encode_tree(state: object, index: dict[int, int], refs: Sequence[msgpack.ExtType]) -> bytes:
    """msgpack of ``state`` with leaf ``id(x) -> index[id(x)]`` written as ``refs[i]``.

    ``state`` must have passed :func:`flatten` (which built ``index``).
    """

    def default(obj: Any) -> msgpack.ExtType:
        t = type(obj)
        if t in LEAF_TYPES:
            return refs[index[id(obj)]]
        if t is tuple:
            return msgpack.ExtType(EXT_TUPLE, pack(list(obj)))
        if t is int:  # only ints outside msgpack's 64-bit range get here
            return msgpack.ExtType(EXT_BIGINT, bigint_bytes(obj))
        if t is OrderedDict:
            meta = getattr(obj, "_metadata", None)
            items = [dict(obj)] if meta is None else [dict(obj), meta]
            return msgpack.ExtType(EXT_ODICT, pack(items))
        if t is torch.dtype:
            return msgpack.ExtType(EXT_DTYPE, str(obj).removeprefix("torch.").encode())
        if t is torch.Size:
            return msgpack.ExtType(EXT_SIZE, pack(list(obj)))
        if t is torch.device:
            return msgpack.ExtType(EXT_DEVICE, str(obj).encode())
        if t in _NP_SCALARS:
            return msgpack.ExtType(EXT_NPSCALAR, pack([obj.dtype.str, obj.tobytes()]))
        raise unsupported("state", t)

    def pack(obj: object) -> bytes:
        # strict_types: tuples, OrderedDicts and float/int subclasses (np.float64)
        # reach `default` instead of silently becoming lists, dicts and floats.
        return msgpack.packb(
            obj,
            default=default,
            strict_types=True,
            use_bin_type=True,
            unicode_errors="surrogatepass",
        )

    return pack(state)


class TreeDecoder(Decoder):
    """Decodes a manifest's tree: leaf references and the torch ext types."""

    def __init__(self) -> None:
        super().__init__()
        self.leaves: Sequence[object] | None = None

    def decode_extra(self, code: int, data: Any) -> object:
        if code == EXT_LEAF:
            if self.leaves is None:
                raise FormatError("leaf reference inside the manifest header")
            if len(data) != 4:
                raise FormatError("leaf reference must be 4 bytes")
            i = int.from_bytes(data, "big")
            if i >= len(self.leaves):
                raise FormatError(f"leaf reference {i} but the table has {len(self.leaves)}")
            return self.leaves[i]
        if code == EXT_DTYPE:
            name = _text(data, "dtype")
            dtype = getattr(torch, name, None) if name.isidentifier() else None
            if not isinstance(dtype, torch.dtype):
                raise FormatError(f"unknown torch dtype {name!r:.40}")
            return dtype
        if code == EXT_SIZE:
            if not all(type(n) is int for n in data):
                raise FormatError("torch.Size ext must hold ints")
            try:
                return torch.Size(data)
            except (RuntimeError, OverflowError, TypeError) as exc:
                raise FormatError(f"bad torch.Size: {exc}") from None
        if code == EXT_DEVICE:
            text = _text(data, "device")
            try:
                return torch.device(text)
            except (RuntimeError, ValueError) as exc:
                raise FormatError(f"bad torch device {text!r:.40}: {exc}") from None
        return super().decode_extra(code, data)


def _text(data: bytes, what: str) -> str:
    if len(data) > 64:
        raise FormatError(f"{what} name of {len(data)} bytes is too long")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise FormatError(f"{what} name is not utf-8") from None
