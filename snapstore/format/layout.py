"""Where each tensor's bytes go in a snapshot's data buffer, and the copy that puts them there.

:func:`plan` turns a state into a :class:`Layout`: one region per storage
(tensors sharing storage -- tied weights, views of one base -- share a region
and are stored once), holding only the byte range the state's views of that
storage use, each region 64-byte aligned. The layout is computed once per
structure: its :attr:`Layout.key` captures paths, dtypes, shapes, strides,
offsets, devices and storage sharing, and ``plan(state, previous=layout)``
returns ``layout`` itself while the key is unchanged.

Call protocol for a save (all on the trainer's thread):

1. ``layout = plan(state, previous=layout)`` -- one walk of the state.
2. ``bound = layout.bind(state)`` -- one more walk; checks the state still
   fits the layout (FormatError if not) and resolves the live tensors.
3. ``bound.copy_into(slot)`` (or copy ``bound.sources`` yourself, e.g. on a
   side CUDA stream, skipping regions whose ``bound.members`` are unchanged).
4. ``bound.manifest()`` -- the manifest for the state's current non-tensor
   values; encode it after the copy, while the state is still unchanged.

``Layout.copy_into/sources/manifest(state)`` are one-call shorthands for the
same (each walks the state once).
"""

from __future__ import annotations

import ctypes
import warnings
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch

from snapstore.errors import FormatError
from snapstore.format.bytecopy import copy_many
from snapstore.format.manifest import (
    ALIGNMENT,
    EXT_LEAF,
    TORCH_DTYPES,
    Leaf,
    Region,
    encode_header,
    extent,
)
from snapstore.format.tree import Flat, encode_tree, flatten, path_str, unsupported

__all__ = ["Binding", "Layout", "as_byte_tensor", "bind", "plan"]

TORCH_DTYPE: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in TORCH_DTYPES if hasattr(torch, name)
}
_DTYPE_NAME: dict[torch.dtype, str] = {dt: name for name, dt in TORCH_DTYPE.items()}
_COMPLEX = frozenset(dt for dt in TORCH_DTYPE.values() if dt.is_complex)
_TORCH_GROUP_ALIGN = 16  # largest torch itemsize: keeps every element offset exact
_ZERO_BYTES = (ctypes.c_char * ALIGNMENT)()  # padding is copied from here (every gap < 64)
_ZEROS = ctypes.addressof(_ZERO_BYTES)


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class Layout:
    """The data-buffer layout of one state structure. Immutable; reuse it across steps."""

    nbytes: int
    """Data buffer length, a multiple of 64."""
    regions: tuple[Region, ...]
    leaves: tuple[Leaf, ...]
    """Every tensor/array of the state, in walk order (the manifest's leaf table)."""
    key: tuple[Any, ...] = field(repr=False)
    """What a state must match to use this layout (see :func:`plan`)."""
    _header: bytes = field(repr=False, compare=False)
    _refs: tuple[msgpack.ExtType, ...] = field(repr=False, compare=False)
    _gaps: tuple[tuple[int, int], ...] = field(repr=False, compare=False)
    """``(start, size)`` of the padding, zeroed on every copy so the data is deterministic."""

    @property
    def gaps(self) -> tuple[tuple[int, int], ...]:
        """``(start, size)`` of the padding between regions (zero in every packed buffer)."""
        return self._gaps

    def bind(self, state: object) -> Binding:
        """Resolve ``state``'s live tensors (FormatError if it no longer fits this layout)."""
        flat = flatten(state)
        key = describe(flat)
        if key != self.key:
            raise FormatError(_mismatch(self.key, key))
        return Binding(self, state, flat)

    def sources(self, state: object) -> list[torch.Tensor]:
        """Per region, a flat uint8 view of its source bytes (on the source's device)."""
        return self.bind(state).sources

    def copy_into(self, state: object, out: Any, threads: int | None = None) -> None:
        """Copy every region of ``state`` into ``out`` (writable, at least :attr:`nbytes` long)."""
        self.bind(state).copy_into(out, threads)

    def manifest(self, state: object) -> bytes:
        """The manifest for ``state``'s current values, referencing this layout's regions."""
        return self.bind(state).manifest()


class Binding:
    """A layout applied to one live state; valid while the state is not restructured."""

    def __init__(self, layout: Layout, state: object, flat: Flat) -> None:
        self.layout = layout
        self.state = state
        self._flat = flat
        self._sources: list[torch.Tensor] | None = None

    @property
    def members(self) -> list[tuple[Any, ...]]:
        """Per region, the live tensors/arrays whose bytes it holds.

        A client skipping unchanged regions compares their ``_version`` and
        ``untyped_storage().data_ptr()`` with the previous save's.
        """
        leaves = self._flat.leaves
        return [tuple(leaves[i] for i in r.leaves) for r in self.layout.regions]

    @property
    def sources(self) -> list[torch.Tensor]:
        """Per region, a flat uint8 tensor viewing the bytes to copy (not a copy)."""
        if self._sources is None:
            self._sources = [self._source(r) for r in self.layout.regions]
        return self._sources

    def _source(self, region: Region) -> torch.Tensor:
        leaves, specs = self._flat.leaves, self.layout.leaves
        for i in region.leaves:
            obj = leaves[i]
            if len(region.leaves) == 1 or type(obj) is np.ndarray:
                return _source(obj, specs[i], region)
            # Distinct storage objects may share memory (torch.from_numpy twice on
            # one array); view through one whose storage holds the whole region.
            start = obj.storage_offset() * obj.element_size() - specs[i].offset
            if start + region.nbytes <= obj.untyped_storage().nbytes():
                return _source(obj, specs[i], region)
        first = region.leaves[0]
        return _source(leaves[first], specs[first], region)

    def copy_into(self, out: Any, threads: int | None = None) -> None:
        """Copy all regions into ``out`` (host memory) and zero the padding between them.

        Host sources are copied by :func:`snapstore.format.bytecopy.copy_many` on up
        to ``threads`` threads (default: ``torch.get_num_threads()``); device
        sources with torch ``copy_``, a synchronous device-to-host copy.
        """
        layout = self.layout
        dst = as_byte_tensor(out, writable=True)
        if dst.device.type != "cpu":
            raise TypeError(f"out must be host memory, got a {dst.device} tensor")
        if dst.numel() < layout.nbytes:
            raise ValueError(f"out holds {dst.numel()} bytes, the layout needs {layout.nbytes}")
        base = dst.data_ptr()
        leaves, specs = self._flat.leaves, layout.leaves
        copies = [(base + start, _ZEROS, size) for start, size in layout._gaps]
        for r in layout.regions:
            i = r.leaves[0]
            obj = leaves[i]
            if type(obj) is np.ndarray:
                src = obj.__array_interface__["data"][0]
            elif obj.is_cpu:
                src = obj.data_ptr()
            else:
                dst[r.offset : r.offset + r.nbytes].copy_(self._source(r))
                continue
            # The region lies inside the source's memory: the key matched, so
            # every view of it is where plan() saw it, and the region is their hull.
            copies.append((base + r.offset, src - specs[i].offset, r.nbytes))
        copy_many(copies, torch.get_num_threads() if threads is None else threads)

    def manifest(self) -> bytes:
        """Manifest bytes for the state's current non-tensor values."""
        return self.layout._header + encode_tree(self.state, self._flat.index, self.layout._refs)


def bind(state: object, previous: Layout | None = None) -> Binding:
    """Plan (or reuse ``previous``) and bind in one walk of the state: the per-step entry point."""
    flat = flatten(state)
    layout = plan_flat(flat, describe(flat), previous)
    return Binding(layout, state, flat)


def plan(state: object, previous: Layout | None = None) -> Layout:
    """The layout of ``state``; ``previous`` itself if ``state`` still has its structure.

    Raises UnsupportedTypeError naming the path of anything the format cannot
    store (sparse, meta, quantized or subclassed tensors, object arrays,
    unknown Python objects).
    """
    flat = flatten(state)
    return plan_flat(flat, describe(flat), previous)


def plan_flat(flat: Flat, key: tuple[Any, ...], previous: Layout | None) -> Layout:
    if previous is not None and previous.key == key:
        return previous
    return _build(flat, key)


def describe(flat: Flat) -> tuple[Any, ...]:
    """The structure key of a flattened state (see :attr:`Layout.key`).

    One tuple per leaf: ``(path, kind, dtype, shape, strides, offset, group,
    device, flags)`` where ``group`` numbers storages in order of first use;
    then ``(path, leaf)`` for each repeated leaf object.
    """
    entries: list[tuple[Any, ...]] = []
    groups: dict[Any, int] = {}
    dtype_name = _DTYPE_NAME
    strided = torch.strided
    parameter = torch.nn.Parameter
    # Runs every step for every tensor: cheapest attribute reads first, and
    # the costly checks only where they can be true (conj bits on complex).
    for obj, path in zip(flat.leaves, flat.paths, strict=True):
        if type(obj) is np.ndarray:
            entries.append(_describe_array(obj, path, groups))
            continue
        dtype = obj.dtype
        name = dtype_name.get(dtype)
        if (
            name is None
            or obj.layout is not strided
            or obj.is_nested
            or obj.is_meta
            or obj.is_neg()
            or (dtype in _COMPLEX and obj.is_conj())
        ):
            raise _bad_tensor(obj, path)
        offset = obj.storage_offset()
        device = obj.device
        group = -1
        if obj.numel():
            base = (obj.data_ptr() - offset * TORCH_DTYPES[name], device)
            group = groups.setdefault(base, len(groups))
        flags = obj.requires_grad | (2 if type(obj) is parameter else 0)
        entries.append((path, 0, name, obj.shape, obj.stride(), offset, group, device, flags))
    entries.extend(flat.aliases)
    return tuple(entries)


def _describe_array(
    arr: np.ndarray[Any, Any], path: tuple[Any, ...], groups: dict[Any, int]
) -> tuple[Any, ...]:
    dt = arr.dtype
    if dt.kind not in "biufc":
        raise unsupported(
            path_str(path),
            np.ndarray,
            f"numpy array of dtype {dt} is not supported (only bool, int, uint, float and "
            "complex arrays)",
        )
    root = arr
    while isinstance(root.base, np.ndarray):
        root = root.base
    ptr = arr.__array_interface__["data"][0]
    group = -1
    if arr.size:
        group = groups.setdefault(("numpy", id(root)), len(groups))
    rel = ptr - root.__array_interface__["data"][0]
    return (path, 1, dt.str, arr.shape, arr.strides, rel, group, "cpu", 0)


def _bad_tensor(t: torch.Tensor, path: tuple[Any, ...]) -> Exception:
    where = path_str(path)
    if t.layout is not torch.strided:
        what = f"{t.layout} tensor (convert it with .to_dense())"
    elif t.is_nested:
        what = "nested tensor"
    elif t.is_quantized:
        what = f"quantized tensor of dtype {t.dtype} (dequantize it)"
    elif t.device.type == "meta":
        what = "meta tensor (it has no data to store)"
    elif t.is_conj() or t.is_neg():
        what = "tensor with a lazy conj/neg bit (call .resolve_conj()/.resolve_neg())"
    else:
        what = f"tensor of dtype {t.dtype}"
    return unsupported(where, type(t), f"unsupported {what}")


def _build(flat: Flat, key: tuple[Any, ...]) -> Layout:
    n_leaves = len(flat.leaves)
    members: dict[int, list[int]] = {}
    for i in range(n_leaves):
        group = key[i][6]
        if group >= 0:
            members.setdefault(group, []).append(i)
    offsets = [0] * n_leaves
    region_of = [-1] * n_leaves
    regions: list[Region] = []
    gaps: list[tuple[int, int]] = []
    cursor = 0
    for idx in members.values():  # dicts keep insertion order: first use of each storage
        spans = []
        for i in idx:
            _, kind, dtype, shape, strides, offset, _, _, _ = key[i]
            if kind == 0:
                size = TORCH_DTYPES[dtype]
                lo = offset * size
                spans.append((lo, lo + extent(shape, [s * size for s in strides], size)[1]))
            else:
                e_lo, e_hi = extent(shape, strides, np.dtype(dtype).itemsize)
                spans.append((offset + e_lo, offset + e_hi))
        start = min(lo for lo, _ in spans)
        if key[idx[0]][1] == 0:
            start -= start % _TORCH_GROUP_ALIGN
        stop = max(hi for _, hi in spans)
        at = _align(cursor)
        if at > cursor:
            gaps.append((cursor, at - cursor))
        for i in idx:
            offsets[i] = key[i][5] * (TORCH_DTYPES[key[i][2]] if key[i][1] == 0 else 1) - start
            region_of[i] = len(regions)
        regions.append(Region(at, stop - start, tuple(idx), str(key[idx[0]][7])))
        cursor = at + stop - start
    nbytes = _align(cursor)
    if nbytes > cursor:
        gaps.append((cursor, nbytes - cursor))
    leaves = tuple(
        Leaf(
            path=flat.paths[i],
            kind="tensor" if key[i][1] == 0 else "ndarray",
            dtype=key[i][2],
            shape=tuple(key[i][3]),
            strides=tuple(key[i][4]),
            region=region_of[i],
            offset=offsets[i],
            requires_grad=bool(key[i][8] & 1),
            parameter=bool(key[i][8] & 2),
            device=str(key[i][7]),
        )
        for i in range(n_leaves)
    )
    refs = tuple(msgpack.ExtType(EXT_LEAF, i.to_bytes(4, "big")) for i in range(n_leaves))
    return Layout(
        nbytes=nbytes,
        regions=tuple(regions),
        leaves=leaves,
        key=key,
        _header=encode_header(nbytes, regions, leaves),
        _refs=refs,
        _gaps=tuple(gaps),
    )


def _mismatch(expected: tuple[Any, ...], found: tuple[Any, ...]) -> str:
    fix = "plan a new layout with plan(state, previous=layout)"
    for old, new in zip(expected, found, strict=False):
        if old != new:
            return (
                f"state no longer matches the layout at {path_str(new[0])} "
                f"(layout: {old[1:]}, state: {new[1:]}); {fix}"
            )
    return (
        f"state no longer matches the layout: {len(found)} leaves and aliases, "
        f"the layout has {len(expected)}; {fix}"
    )


class _Memory:
    """Raw memory exposed to numpy; holding it keeps the memory's owner alive."""

    def __init__(self, ptr: int, nbytes: int, readonly: bool, owner: object) -> None:
        self.__array_interface__ = {
            "data": (ptr, readonly),
            "shape": (nbytes,),
            "typestr": "|u1",
            "version": 3,
        }
        self.owner = owner


def _source(obj: Any, leaf: Leaf, region: Region) -> torch.Tensor:
    if type(obj) is np.ndarray:
        ptr = obj.__array_interface__["data"][0] - leaf.offset
        root = obj
        while isinstance(root.base, np.ndarray):
            root = root.base
        view = np.asarray(_Memory(ptr, region.nbytes, not obj.flags.writeable, root))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only arrays: we only read
            return torch.from_numpy(view)
    start = obj.storage_offset() * obj.element_size() - leaf.offset
    out = torch.empty(0, dtype=torch.uint8, device=obj.device)
    return out.set_(obj.untyped_storage(), start, (region.nbytes,), (1,))


def as_byte_tensor(buf: Any, writable: bool) -> torch.Tensor:
    """A flat uint8 CPU tensor sharing memory with ``buf``.

    ``buf``: a uint8 torch tensor or numpy array (contiguous), or any object
    with the buffer protocol (bytes, bytearray, memoryview, mmap).
    """
    if isinstance(buf, torch.Tensor):
        if buf.dtype != torch.uint8 or not buf.is_contiguous():
            raise TypeError(f"buffer tensor must be contiguous uint8, got {buf.dtype}")
        return buf.view(-1)
    if isinstance(buf, np.ndarray):
        if buf.dtype != np.uint8 or not buf.flags.c_contiguous:
            raise TypeError(f"buffer array must be C-contiguous uint8, got {buf.dtype}")
        if writable and not buf.flags.writeable:
            raise TypeError("buffer array is read-only")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only data is only read
            return torch.from_numpy(buf.reshape(-1))
    try:
        view = memoryview(buf)
    except TypeError:
        raise TypeError(
            f"expected a uint8 tensor, numpy array or buffer, got {type(buf).__qualname__}"
        ) from None
    if writable and view.readonly:
        raise TypeError(f"buffer {type(buf).__qualname__} is read-only")
    if not view.c_contiguous:
        raise TypeError("buffer must be contiguous")
    if view.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only data is only read
        return torch.frombuffer(view, dtype=torch.uint8)
