"""The snapshot manifest on the wire: magic, version, header tables and ext codes.

A snapshot is two buffers: the *data* (every tensor and array byte, one
64-byte-aligned region per storage) and the *manifest* (everything else).
This module owns the manifest's bytes and is deliberately free of torch, so
that the store's node actors and command-line tools can read and check a
manifest without paying for importing torch. Turning manifests into tensors is
:mod:`snapstore.format.pack`'s job.

Wire format, version 1::

    MAGIC (8 bytes) | version (uint16 LE) | flags (uint16 LE, 0) | body

``body`` is one msgpack array of four items::

    [nbytes, regions, leaves, tree]

* ``nbytes``: length of the data buffer, a multiple of :data:`ALIGNMENT`.
* ``regions``: ``[[offset, nbytes], ...]`` in increasing, non-overlapping
  order; every offset is a multiple of :data:`ALIGNMENT`.
* ``leaves``: one entry per tensor or array,
  ``[kind, dtype, shape, strides, region, offset, flags, device, path]`` with
  ``kind`` 0 (torch tensor; dtype is a torch dtype name, strides count
  elements) or 1 (numpy array; dtype is ``numpy.dtype.str``, strides count
  bytes, may be negative); ``region`` -1 for a leaf without elements;
  ``offset`` the byte position of the leaf's first element inside its region;
  ``flags`` bit 0 requires_grad, bit 1 ``nn.Parameter``; ``device`` where the
  source lived; ``path`` the keys from the state's root to the leaf.
* ``tree``: the state itself with every leaf replaced by an ``EXT_LEAF``
  reference and the Python types msgpack lacks wrapped in the ext types below.

The header (the first three items) depends only on the layout, so a layout
encodes it once and every later manifest reuses those bytes.
"""

from __future__ import annotations

import re
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from snapstore.errors import FormatError

__all__ = [
    "ALIGNMENT",
    "EXT_BIGINT",
    "EXT_DEVICE",
    "EXT_DTYPE",
    "EXT_LEAF",
    "EXT_NPSCALAR",
    "EXT_ODICT",
    "EXT_SIZE",
    "EXT_TUPLE",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_DEPTH",
    "MAX_NDIM",
    "TORCH_DTYPES",
    "Decoder",
    "Header",
    "Leaf",
    "ManifestInfo",
    "Region",
    "bigint_bytes",
    "encode_header",
    "extent",
    "numpy_dtype",
    "open_manifest",
    "pack_value",
    "read_manifest",
]

MAGIC = b"\x89SNAPMF\n"
"""First 8 bytes of every manifest (the high bit and newline catch text-mode mangling)."""

FORMAT_VERSION = 1
ALIGNMENT = 64
"""Every region starts at a multiple of this many bytes in the data buffer."""

MAX_DEPTH = 100
"""Deepest nesting of containers a state may have (guards recursion on both sides)."""

MAX_NDIM = 64
_MAX_EXTENT = 1 << 62  # no count, stride or size may reach this (int64 math stays exact)

_PREFIX = struct.Struct("<8sHH")

# msgpack ext type codes. Append new codes; never renumber (that is a new FORMAT_VERSION).
EXT_LEAF = 1  # uint32 big-endian index into the leaf table
EXT_TUPLE = 2  # msgpack array of the items
EXT_BIGINT = 3  # an int outside msgpack's 64-bit range: signed big-endian two's complement
EXT_ODICT = 4  # msgpack [map] or [map, _metadata] for an OrderedDict
EXT_NPSCALAR = 5  # msgpack [numpy dtype str, raw bytes]
EXT_DTYPE = 6  # utf-8 torch dtype name ("float32")
EXT_SIZE = 7  # msgpack array of ints (torch.Size)
EXT_DEVICE = 8  # utf-8 torch device string ("cuda:0")

TORCH_DTYPES: dict[str, int] = {
    "float32": 4,
    "float64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "bool": 1,
}
"""Torch dtypes a snapshot may hold, by name, with their item sizes.

Quantized and sub-byte dtypes are absent on purpose: their bytes are not a
plain array of items. A name this torch build lacks is refused on restore.
"""

_NP_DTYPES: dict[str, np.dtype[Any]] = {
    dt.str: dt for dt in (np.dtype(code) for code in np.typecodes["All"]) if dt.kind in "biufc"
}
"""Native-order numeric dtypes by their string: the common case skips parsing."""
_DEVICES = frozenset({"cpu", "cuda", "cuda:0"})  # common names skip the regex
_NP_DTYPE_RE = re.compile(r"[<>|][biufc][0-9]{1,2}")
_DEVICE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}(:[0-9]{1,6})?")


def numpy_dtype(text: object) -> np.dtype[Any]:
    """The numeric numpy dtype named by ``text`` (``"<f4"``), or FormatError."""
    if type(text) is str and text in _NP_DTYPES:
        return _NP_DTYPES[text]
    if not isinstance(text, str) or _NP_DTYPE_RE.fullmatch(text) is None:
        raise FormatError(f"bad numpy dtype {text!r}: expected a numeric dtype string like '<f4'")
    try:
        dt = np.dtype(text)
    except TypeError as exc:
        raise FormatError(f"bad numpy dtype {text!r}: {exc}") from None
    if dt.str != text or dt.kind not in "biufc":
        raise FormatError(f"bad numpy dtype {text!r}")
    return dt


def extent(shape: Sequence[int], strides: Sequence[int], itemsize: int) -> tuple[int, int]:
    """Byte range ``[lo, hi)`` an array touches, relative to its first element.

    ``strides`` are in bytes and may be negative. Empty arrays touch nothing
    and return ``(0, 0)``.
    """
    lo = hi = 0
    for n, s in zip(shape, strides, strict=True):
        if n == 0:
            return 0, 0
        if s < 0:
            lo += (n - 1) * s
        else:
            hi += (n - 1) * s
    return lo, hi + itemsize


@dataclass(frozen=True)
class Region:
    """One contiguous byte range of the data buffer: the used bytes of one storage."""

    offset: int
    """Start in the data buffer, a multiple of :data:`ALIGNMENT`."""
    nbytes: int
    leaves: tuple[int, ...]
    """Indices into the leaf table of the tensors/arrays whose bytes live here."""
    device: str
    """Device of the source storage ("cpu", "cuda:0")."""


@dataclass(frozen=True)
class Leaf:
    """One tensor or array of the state: where it sits and how to view its bytes."""

    path: tuple[str | int, ...]
    kind: str
    """``"tensor"`` (torch) or ``"ndarray"`` (numpy)."""
    dtype: str
    """Torch dtype name (``"bfloat16"``) or numpy dtype string (``"<f4"``)."""
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    """Elements for tensors, bytes (possibly negative) for arrays."""
    region: int
    """Index of the region holding the bytes, -1 when the leaf has no elements."""
    offset: int
    """Byte position of the first element inside the region."""
    requires_grad: bool
    parameter: bool
    """The source was an ``nn.Parameter`` (restored as one)."""
    device: str

    @property
    def itemsize(self) -> int:
        if self.kind == "tensor":
            return TORCH_DTYPES[self.dtype]
        return numpy_dtype(self.dtype).itemsize

    @property
    def byte_strides(self) -> tuple[int, ...]:
        if self.kind == "tensor":
            size = TORCH_DTYPES[self.dtype]
            return tuple(s * size for s in self.strides)
        return self.strides


@dataclass(frozen=True)
class Header:
    """The layout part of a manifest, validated."""

    version: int
    nbytes: int
    regions: tuple[Region, ...]
    leaves: tuple[Leaf, ...]


@dataclass(frozen=True)
class ManifestInfo:
    """What tools print about a manifest without restoring it."""

    version: int
    nbytes: int
    """Length of the data buffer the manifest describes."""
    num_tensors: int
    num_arrays: int
    num_regions: int
    manifest_nbytes: int


_KINDS = ("tensor", "ndarray")
_FLAG_REQUIRES_GRAD = 1
_FLAG_PARAMETER = 2


def _pack_int_default(obj: object) -> object:
    if type(obj) is int:
        return msgpack.ExtType(EXT_BIGINT, bigint_bytes(obj))
    raise TypeError(f"cannot encode {type(obj).__qualname__}")


def bigint_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)


def pack_value(obj: object) -> bytes:
    """msgpack of plain header values (ints of any size, str, lists)."""
    return msgpack.packb(obj, default=_pack_int_default, use_bin_type=True)


def encode_header(nbytes: int, regions: Sequence[Region], leaves: Sequence[Leaf]) -> bytes:
    """Manifest bytes up to the tree: prefix, array header and the three tables."""
    region_rows = [[r.offset, r.nbytes] for r in regions]
    leaf_rows = [
        [
            _KINDS.index(leaf.kind),
            leaf.dtype,
            list(leaf.shape),
            list(leaf.strides),
            leaf.region,
            leaf.offset,
            (_FLAG_REQUIRES_GRAD if leaf.requires_grad else 0)
            | (_FLAG_PARAMETER if leaf.parameter else 0),
            leaf.device,
            list(leaf.path),
        ]
        for leaf in leaves
    ]
    return (
        _PREFIX.pack(MAGIC, FORMAT_VERSION, 0)
        + b"\x94"  # fixarray of 4: nbytes, regions, leaves, tree
        + pack_value(nbytes)
        + pack_value(region_rows)
        + pack_value(leaf_rows)
    )


class Decoder:
    """msgpack hooks that decode the torch-free ext types, with depth and size limits.

    :mod:`snapstore.format.pack` subclasses it to decode leaves and torch values
    (:meth:`decode_extra`). Every failure surfaces as :class:`FormatError`.
    """

    def __init__(self) -> None:
        self.depth = 0

    def unpacker(self, size: int) -> msgpack.Unpacker:
        # Every length msgpack accepts is bounded by the input's own size, so a
        # forged header cannot make it preallocate more than the input holds.
        # timestamp=2 turns msgpack's built-in timestamp ext into a plain int.
        return msgpack.Unpacker(
            None,
            max_buffer_size=max(size, 1),
            ext_hook=self.ext_hook,
            object_hook=self.object_hook,
            strict_map_key=False,
            raw=False,
            timestamp=2,
            unicode_errors="surrogatepass",
        )

    def unpackb(self, data: bytes) -> Any:
        unpacker = self.unpacker(len(data))
        unpacker.feed(data)
        try:
            value = unpacker.unpack()
        except msgpack.OutOfData:
            raise FormatError("truncated msgpack value in manifest") from None
        if unpacker.tell() != len(data):
            raise FormatError("trailing bytes after a msgpack value in manifest")
        return value

    @staticmethod
    def object_hook(obj: dict[Any, Any]) -> dict[Any, Any]:
        for key in obj:
            if type(key) is not str and type(key) is not int:
                raise FormatError(f"map key of type {type(key).__qualname__}: only str and int")
        return obj

    def ext_hook(self, code: int, data: bytes) -> object:
        if code == EXT_BIGINT:
            if not data:
                raise FormatError("empty big-int ext")
            return int.from_bytes(data, "big", signed=True)
        if code in (EXT_TUPLE, EXT_ODICT, EXT_NPSCALAR, EXT_SIZE):
            if self.depth >= MAX_DEPTH:
                raise FormatError(f"manifest nested deeper than {MAX_DEPTH} ext levels")
            self.depth += 1
            try:
                inner = self.unpackb(data)
            finally:
                self.depth -= 1
            if type(inner) is not list:
                raise FormatError(f"ext {code} must hold an array")
            if code == EXT_TUPLE:
                return tuple(inner)
            if code == EXT_ODICT:
                return _odict(inner)
            if code == EXT_NPSCALAR:
                return _npscalar(inner)
            return self.decode_extra(code, inner)
        return self.decode_extra(code, data)

    def decode_extra(self, code: int, data: Any) -> object:
        """Decode an ext code this class does not know (``data``: decoded array or raw bytes)."""
        raise FormatError(f"unexpected ext type {code} in this part of the manifest")


def _odict(inner: list[Any]) -> OrderedDict[Any, Any]:
    if len(inner) not in (1, 2) or type(inner[0]) is not dict:
        raise FormatError("OrderedDict ext must hold [map] or [map, metadata]")
    out: OrderedDict[Any, Any] = OrderedDict(inner[0])
    if len(inner) == 2:
        if not isinstance(inner[1], dict):
            raise FormatError("OrderedDict _metadata must be a map")
        out._metadata = inner[1]  # type: ignore[attr-defined]
    return out


def _npscalar(inner: list[Any]) -> object:
    if len(inner) != 2 or type(inner[1]) is not bytes:
        raise FormatError("numpy scalar ext must hold [dtype, bytes]")
    dt = numpy_dtype(inner[0])
    if len(inner[1]) != dt.itemsize:
        raise FormatError(
            f"numpy scalar of {dt.str} needs {dt.itemsize} bytes, got {len(inner[1])}"
        )
    return np.frombuffer(inner[1], dtype=dt)[0]


def _int(value: object, what: str, lo: int = 0, hi: int = _MAX_EXTENT, index: int = -1) -> int:
    # ``what`` and ``index`` are joined only on failure: this runs for every field of every leaf.
    if type(value) is not int or not lo <= value < hi:
        where = what if index < 0 else what.format(index)
        raise FormatError(f"{where} must be an int in [{lo}, {hi}), got {value!r:.80}")
    return value


def _int_list(value: object, what: str, index: int, lo: int) -> tuple[int, ...]:
    if type(value) is not list or len(value) > MAX_NDIM:
        raise FormatError(f"{what.format(index)} must be a list of at most {MAX_NDIM} ints")
    for v in value:
        if type(v) is not int or not lo <= v < _MAX_EXTENT:
            raise FormatError(
                f"{what.format(index)} must hold ints in [{lo}, {_MAX_EXTENT}), got {v!r:.80}"
            )
    return tuple(value)


def _read_regions(rows: object, nbytes: int) -> list[tuple[int, int]]:
    if type(rows) is not list:
        raise FormatError("region table must be a list")
    out: list[tuple[int, int]] = []
    end = 0
    for i, row in enumerate(rows):
        if type(row) is not list or len(row) != 2:
            raise FormatError(f"region {i} must be [offset, nbytes]")
        offset = _int(row[0], "region {} offset", index=i)
        size = _int(row[1], "region {} nbytes", index=i)
        # Increasing and disjoint: restoring copies each region once, so a
        # forged table cannot multiply the memory a restore allocates.
        if offset % ALIGNMENT or offset < end or offset + size > nbytes:
            raise FormatError(
                f"region {i} [{offset}, {offset + size}) is misaligned, overlaps the previous "
                f"region (ends at {end}) or lies outside the {nbytes}-byte data"
            )
        end = offset + size
        out.append((offset, size))
    return out


def _read_leaf(i: int, row: object, regions: Sequence[tuple[int, int]]) -> Leaf:
    if type(row) is not list or len(row) != 9:
        raise FormatError(f"leaf {i} must be a 9-item array")
    kind_code, dtype, shape_v, strides_v, region_v, offset_v, flags_v, device, path_v = row
    kind = _KINDS[_int(kind_code, "leaf {} kind", 0, len(_KINDS), i)]
    if kind == "tensor":
        if dtype not in TORCH_DTYPES:
            raise FormatError(f"leaf {i}: unknown torch dtype {dtype!r:.40}")
        itemsize = TORCH_DTYPES[dtype]
    else:
        itemsize = numpy_dtype(dtype).itemsize
    shape = _int_list(shape_v, "leaf {} shape", i, 0)
    strides = _int_list(strides_v, "leaf {} strides", i, 0 if kind == "tensor" else -_MAX_EXTENT)
    if len(shape) != len(strides):
        raise FormatError(f"leaf {i}: {len(shape)} dims but {len(strides)} strides")
    count = itemsize
    for n in shape:
        count *= n if n else 1
        if count >= _MAX_EXTENT:
            raise FormatError(f"leaf {i}: shape {shape} is too large")
    region = _int(region_v, "leaf {} region", -1, len(regions), i)
    offset = _int(offset_v, "leaf {} offset", index=i)
    byte_strides = strides if kind == "ndarray" else tuple(s * itemsize for s in strides)
    lo, hi = extent(shape, byte_strides, itemsize)
    if (region == -1) != (hi == 0):
        raise FormatError(f"leaf {i}: region {region} does not fit a leaf of shape {shape}")
    if region >= 0:
        size = regions[region][1]
        if offset + lo < 0 or offset + hi > size:
            raise FormatError(
                f"leaf {i}: bytes [{offset + lo}, {offset + hi}) lie outside its "
                f"{size}-byte region {region}"
            )
        if kind == "tensor" and offset % itemsize:
            raise FormatError(f"leaf {i}: offset {offset} is not a multiple of {itemsize}")
    flags = _int(flags_v, "leaf {} flags", 0, 4, i)
    if device not in _DEVICES and (type(device) is not str or not _DEVICE_RE.fullmatch(device)):
        raise FormatError(f"leaf {i}: bad device {device!r:.40}")
    if type(path_v) is not list or len(path_v) > MAX_DEPTH:
        raise FormatError(f"leaf {i}: path must be a list of at most {MAX_DEPTH} keys")
    for key in path_v:
        if type(key) is not str and type(key) is not int:
            raise FormatError(f"leaf {i}: path key {key!r:.40} is not str or int")
    return Leaf(
        path=tuple(path_v),
        kind=kind,
        dtype=dtype,
        shape=shape,
        strides=strides,
        region=region,
        offset=offset,
        requires_grad=bool(flags & _FLAG_REQUIRES_GRAD),
        parameter=bool(flags & _FLAG_PARAMETER),
        device=device,
    )


@contextmanager
def _malformed(what: str) -> Iterator[None]:
    """Turn whatever msgpack or a hook raises on bad input into FormatError."""
    try:
        yield
    except FormatError:
        raise
    except msgpack.OutOfData:
        raise FormatError(f"manifest is truncated in its {what}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise FormatError(f"manifest {what} is malformed: {exc}") from None


def open_manifest(manifest: bytes, decoder: Decoder) -> tuple[Header, Callable[[], Any]]:
    """Check and decode a manifest's header; return it and a function decoding the tree.

    Raises :class:`FormatError` for anything malformed: wrong magic or
    version, truncation, tables out of range. The tree function (call it at
    most once, after setting up ``decoder`` for leaves) raises it too, also
    for trailing bytes.
    """
    body_offset = _PREFIX.size
    if len(manifest) < body_offset:
        raise FormatError(f"manifest of {len(manifest)} bytes is too short for its header")
    magic, version, flags = _PREFIX.unpack_from(manifest)
    if magic != MAGIC:
        raise FormatError(f"not a snapstore manifest (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"manifest format version {version}, this snapstore reads version "
            f"{FORMAT_VERSION}: restore with the snapstore release that wrote it"
        )
    if flags != 0:
        raise FormatError(f"manifest flags {flags:#x} are not understood by this version")
    body = memoryview(manifest)[body_offset:]
    unpacker = decoder.unpacker(len(body))
    unpacker.feed(body)
    with _malformed("header"):
        if unpacker.read_array_header() != 4:
            raise FormatError("manifest body must be a 4-item array")
        nbytes = _int(unpacker.unpack(), "data nbytes")
        if nbytes % ALIGNMENT:
            raise FormatError(f"data nbytes {nbytes} is not a multiple of {ALIGNMENT}")
        spans = _read_regions(unpacker.unpack(), nbytes)
        rows = unpacker.unpack()
        if type(rows) is not list:
            raise FormatError("leaf table must be a list")
        leaves = tuple(_read_leaf(i, row, spans) for i, row in enumerate(rows))
    members: list[list[int]] = [[] for _ in spans]
    for i, leaf in enumerate(leaves):
        if leaf.region >= 0:
            members[leaf.region].append(i)
    regions = []
    for r, ((offset, size), idx) in enumerate(zip(spans, members, strict=True)):
        if not idx:
            raise FormatError(f"region {r} holds no leaf")
        regions.append(Region(offset, size, tuple(idx), leaves[idx[0]].device))

    def read_tree() -> Any:
        with _malformed("state tree"):
            tree = unpacker.unpack()
        if unpacker.tell() != len(body):
            raise FormatError("trailing bytes after the manifest's state tree")
        return tree

    return Header(version, nbytes, tuple(regions), leaves), read_tree


def read_manifest(manifest: bytes) -> ManifestInfo:
    """Summarize a manifest (version, data size, counts) without decoding its tree."""
    header, _ = open_manifest(manifest, Decoder())
    tensors = sum(1 for leaf in header.leaves if leaf.kind == "tensor")
    return ManifestInfo(
        version=header.version,
        nbytes=header.nbytes,
        num_tensors=tensors,
        num_arrays=len(header.leaves) - tensors,
        num_regions=len(header.regions),
        manifest_nbytes=len(manifest),
    )
