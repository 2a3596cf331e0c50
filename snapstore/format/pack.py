"""The snapshot format: a training state <-> one data buffer plus a msgpack manifest.

A state -- nested dicts, lists and tuples of tensors, numpy arrays and plain
values (``model.state_dict()``, ``optimizer.state_dict()``, RNG states, step
counters) -- becomes

* **data**: every tensor/array byte, one 64-byte-aligned region per storage,
  laid out by :func:`plan` (see :mod:`snapstore.format.layout`), and
* **manifest**: msgpack describing everything else (see
  :mod:`snapstore.format.manifest` for the wire format and version).

No pickle is involved anywhere, and :func:`unpack` treats both buffers as
untrusted: anything malformed raises :class:`~snapstore.errors.FormatError`
before a byte outside ``data`` is touched or an allocation larger than
``data`` is made.

Round trips are bitwise, and keep: dtypes, shapes, strides (views,
transposes, stride-0 expands), storage sharing (tied weights stay tied),
``requires_grad`` and ``nn.Parameter``, tuples vs lists, ``OrderedDict``
(with a state dict's ``_metadata``), ints of any size, float bit patterns,
numpy scalars, ``torch.dtype``/``torch.Size``/``torch.device`` values, and
object identity of a tensor that appears at several paths. Containers are
rebuilt per path (a list referenced twice comes back as two lists),
storage offsets are renumbered (only the used bytes of a storage are kept),
numpy scalar types are rebuilt from their dtype (``np.longlong`` comes back
as ``np.int64``), and tensors come back on the CPU unless ``into=`` holds
device tensors to copy into.

The format is split by concern: :mod:`snapstore.format.manifest` (wire format, no
torch), :mod:`snapstore.format.tree` (walking the state, encoding its values),
:mod:`snapstore.format.layout` (regions and the save-side copy),
:mod:`snapstore.format.bytecopy` (the memmove engine, no torch), and this module
(pack, unpack, the public names).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from snapstore.errors import FormatError
from snapstore.format.bytecopy import copy_many
from snapstore.format.layout import (
    TORCH_DTYPE,
    Binding,
    Layout,
    as_byte_tensor,
    bind,
    describe,
    plan,
    plan_flat,
)
from snapstore.format.manifest import (
    ALIGNMENT,
    FORMAT_VERSION,
    Header,
    Leaf,
    ManifestInfo,
    Region,
    numpy_dtype,
    open_manifest,
    read_manifest,
)
from snapstore.format.tree import TreeDecoder, flatten

__all__ = [
    "FORMAT_VERSION",
    "Binding",
    "Layout",
    "Leaf",
    "ManifestInfo",
    "Packed",
    "Region",
    "bind",
    "pack",
    "plan",
    "read_manifest",
    "unpack",
]


@dataclass(frozen=True)
class Packed:
    """A packed state: ``manifest`` + ``data`` (exactly ``layout.nbytes`` long)."""

    manifest: bytes
    data: Any
    """A view of the caller's ``out`` (same kind: tensor, ndarray, or a memoryview for
    other buffers -- release it before closing an mmap), or a new 64-byte-aligned
    numpy uint8 array."""
    layout: Layout


def pack(
    state: object, out: Any = None, layout: Layout | None = None, threads: int | None = None
) -> Packed:
    """Pack ``state`` into ``out`` (or a new buffer) and encode its manifest.

    ``layout`` is the previous step's layout: reused when ``state`` still has
    its structure, else a new one is planned (``packed.layout is layout``
    tells which). One walk of the state, one copy of its bytes, on up to
    ``threads`` threads (default ``torch.get_num_threads()``).
    """
    flat = flatten(state)
    chosen = plan_flat(flat, describe(flat), layout)
    bound = Binding(chosen, state, flat)
    data = _aligned_empty(chosen.nbytes) if out is None else _head(out, chosen.nbytes)
    bound.copy_into(data, threads)
    return Packed(bound.manifest(), data, chosen)


def _aligned_empty(nbytes: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    skip = -raw.ctypes.data % ALIGNMENT
    return raw[skip : skip + nbytes]


def _head(out: Any, nbytes: int) -> Any:
    size = as_byte_tensor(out, writable=True).numel()
    if size < nbytes:
        raise ValueError(f"out holds {size} bytes, the state needs {nbytes}")
    if isinstance(out, torch.Tensor | np.ndarray):
        return out.reshape(-1)[:nbytes]
    return memoryview(out).cast("B")[:nbytes]


_MISSING = object()


def unpack(
    manifest: bytes, data: Any, into: Any = None, copy: bool = True, threads: int | None = None
) -> Any:
    """Rebuild the state a manifest and its data describe.

    ``data``: bytes-like, a uint8 numpy array or a contiguous uint8 CPU tensor,
    at least the manifest's ``nbytes`` long.

    ``into``: a live state of the same structure (``model.state_dict()``,
    the current optimizer state). Each tensor/array found at the same path
    with the same dtype and shape (and no zero-stride overlap) is overwritten
    in place -- a host-to-device copy for CUDA tensors -- and returned; the
    others are new. Non-tensor values are always new.

    ``copy=False``: new tensors/arrays view ``data`` instead of owning a copy;
    keep ``data`` alive and unchanged while they live, and do not write to
    them if ``data`` is read-only. (A tensor whose dtype ``data``'s alignment
    cannot view is still copied.)

    ``threads``: host copies run on up to this many threads (default
    ``torch.get_num_threads()``).

    Raises FormatError for any malformed manifest or data.
    """
    decoder = TreeDecoder()
    header, read_tree = open_manifest(manifest, decoder)
    src = as_byte_tensor(data, writable=False)
    if src.device.type != "cpu":
        raise TypeError(f"data must be in CPU memory, got a {src.device} tensor")
    if src.numel() < header.nbytes:
        raise FormatError(
            f"data holds {src.numel()} bytes but the manifest describes {header.nbytes}: "
            "truncated data, or data of another snapshot"
        )
    threads = torch.get_num_threads() if threads is None else threads
    decoder.leaves = _restore_leaves(header, src, into, copy, threads)
    return read_tree()


def _restore_leaves(
    header: Header, src: torch.Tensor, into: Any, copy: bool, threads: int
) -> list[object]:
    out: list[object] = [None] * len(header.leaves)
    copies: list[tuple[int, int, int]] = []  # host memmoves, run together at the end
    for i, leaf in enumerate(header.leaves):
        if leaf.region < 0:
            target = _find(into, leaf.path) if into is not None else _MISSING
            out[i] = target if _fits(target, leaf) else _empty(leaf)
    for region in header.regions:
        pending = []
        for i in region.leaves:
            leaf = header.leaves[i]
            target = _find(into, leaf.path) if into is not None else _MISSING
            if _fits(target, leaf):
                out[i] = target
                plain = _contiguous(leaf.shape, leaf.byte_strides, leaf.itemsize)
                if plain and _dense_host(target):
                    # The common restore: straight bytes from data into the live tensor.
                    at = src.data_ptr() + region.offset + leaf.offset
                    copies.append((_address(target), at, _nbytes(target)))
                    continue
                view = _view(leaf, src, region.offset)
                if view is None:  # data too misaligned to view this dtype
                    view = _view(leaf, _copy_region(src, region), 0)
                _copy_to(target, view, copies)
            else:
                pending.append(i)
        if not pending:
            continue
        views = [] if copy else [_view(header.leaves[i], src, region.offset) for i in pending]
        if copy or any(v is None for v in views):  # None: too misaligned to view in place
            buf = torch.empty(region.nbytes, dtype=torch.uint8)
            if region.nbytes:
                copies.append((buf.data_ptr(), src.data_ptr() + region.offset, region.nbytes))
            views = [_view(header.leaves[i], buf, 0) for i in pending]
        for i, view in zip(pending, views, strict=True):
            out[i] = _finish(view, header.leaves[i])
    copy_many(copies, threads)
    return out


def _find(into: Any, path: tuple[str | int, ...]) -> Any:
    cur = into
    for key in path:
        if isinstance(cur, dict):
            cur = cur.get(key, _MISSING)
        elif isinstance(cur, list | tuple) and type(key) is int and 0 <= key < len(cur):
            cur = cur[key]
        else:
            return _MISSING
    return cur


def _fits(target: Any, leaf: Leaf) -> bool:
    t = type(target)
    if t is torch.Tensor or t is torch.nn.Parameter:
        return (
            target.dtype is TORCH_DTYPE.get(leaf.dtype)
            and tuple(target.shape) == leaf.shape
            and target.layout is torch.strided
            and not target.is_meta
            and _distinct(target.shape, target.stride())
        )
    if t is np.ndarray:
        return bool(
            target.dtype.str == leaf.dtype
            and target.shape == leaf.shape
            and target.flags.writeable
            and _distinct(target.shape, target.strides)
        )
    return False


def _distinct(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """No two items share memory through a zero stride (an expanded tensor is no target)."""
    return all(s != 0 or n <= 1 for n, s in zip(shape, strides, strict=True))


def _copy_to(target: Any, view: Any, copies: list[tuple[int, int, int]]) -> None:
    """Copy ``view``'s values into ``target`` (same dtype and shape), or queue the copy.

    Contiguous host pairs are queued in ``copies`` for
    :func:`snapstore.format.bytecopy.copy_many` (why not torch ``copy_``: see
    there); other host pairs copy now as a strided numpy copy of the raw
    items; device targets take a host-to-device ``copy_``.
    """
    if isinstance(target, np.ndarray):
        if target.flags.c_contiguous and view.flags.c_contiguous:
            copies.append((target.ctypes.data, view.ctypes.data, target.nbytes))
        else:
            np.copyto(target, view)
    elif not target.is_cpu:
        with torch.no_grad():
            target.copy_(view)
    elif target.is_contiguous() and view.is_contiguous():
        copies.append((target.data_ptr(), view.data_ptr(), view.nbytes))
    else:
        np.copyto(_raw_items(target), _raw_items(view))


def _dense_host(target: Any) -> bool:
    if isinstance(target, np.ndarray):
        return bool(target.flags.c_contiguous)
    return bool(target.is_cpu and target.is_contiguous())


def _address(target: Any) -> int:
    return int(target.ctypes.data) if isinstance(target, np.ndarray) else target.data_ptr()


def _nbytes(target: Any) -> int:
    return int(target.nbytes)


def _contiguous(shape: Sequence[int], byte_strides: Sequence[int], itemsize: int) -> bool:
    expect = itemsize
    for n, stride in zip(reversed(shape), reversed(byte_strides), strict=True):
        if n != 1 and stride != expect:
            return False
        expect *= n
    return True


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}


def _raw_items(t: torch.Tensor) -> np.ndarray[Any, Any]:
    """A numpy view of ``t``'s items as same-size plain numbers (bf16, float8: no numpy dtype)."""
    return t.detach().view(_BITS[t.element_size()]).numpy()


def _copy_region(src: torch.Tensor, region: Region) -> torch.Tensor:
    out = torch.empty(region.nbytes, dtype=torch.uint8)
    copy_many([(out.data_ptr(), src.data_ptr() + region.offset, region.nbytes)])
    return out


def _torch_dtype(leaf: Leaf) -> torch.dtype:
    dt = TORCH_DTYPE.get(leaf.dtype)
    if dt is None:
        raise FormatError(f"dtype {leaf.dtype} of {leaf.path} is not in this torch build")
    return dt


def _view(leaf: Leaf, buf: torch.Tensor, at: int) -> Any:
    """Leaf viewing ``buf`` whose region starts at byte ``at``; None if misaligned."""
    start = at + leaf.offset
    if leaf.kind == "ndarray":
        arr = buf.numpy()
        return np.ndarray(
            leaf.shape, numpy_dtype(leaf.dtype), buffer=arr, offset=start, strides=leaf.strides
        )
    dt = _torch_dtype(leaf)
    start += int(buf.storage_offset())
    if start % dt.itemsize:
        return None
    view = torch.empty(0, dtype=dt)
    return view.set_(buf.untyped_storage(), start // dt.itemsize, leaf.shape, leaf.strides)


def _empty(leaf: Leaf) -> object:
    if leaf.kind == "ndarray":
        base = np.empty(0, dtype=numpy_dtype(leaf.dtype))
        return np.lib.stride_tricks.as_strided(base, leaf.shape, leaf.strides)
    return _finish(torch.empty_strided(leaf.shape, leaf.strides, dtype=_torch_dtype(leaf)), leaf)


def _finish(value: Any, leaf: Leaf) -> object:
    if leaf.kind == "ndarray" or not (leaf.parameter or leaf.requires_grad):
        return value
    try:
        if leaf.parameter:
            return torch.nn.Parameter(value, requires_grad=leaf.requires_grad)
        return value.requires_grad_(True)
    except RuntimeError as exc:
        raise FormatError(f"leaf at {leaf.path}: {exc}") from None
