"""The staging copy: a state's bytes into its shared-memory slot, once, skipping unchanged ones.

Three jobs:

- Map slots once. A slot is a file under /dev/shm owned by the node's SMP;
  the client maps it with ``MAP_POPULATE`` the first time it sees it (by
  inode: the SMP renames slots as steps move on) and keeps the mapping, so
  every later copy runs at warm-memory speed.
- Skip unchanged regions. A region's key is, for each tensor it holds, the
  address of its storage and its ``_version`` (bumped by every in-place
  op). The client keeps, per slot, the keys it wrote at its last write, and
  a strong reference to those tensors so their memory cannot be reused by
  another tensor with an equal key. A region whose key is unchanged since
  the slot's last write is not copied; numpy arrays have no version and are
  always copied. A tensor changed through ``.data`` bypasses its version
  counter: use ``deltas=False`` for such code. Optimizer steps are counted
  as changes of every parameter with a gradient and of its optimizer state
  (:func:`count_optimizer_steps`): fused and custom-kernel optimizers write
  them without bumping their counters.
- Copy: host tensors with ``memmove`` on a few threads (the GIL is released,
  so a lazy copy runs beside forward and backward); CUDA tensors with
  ``copy_(non_blocking=True)`` on a side stream into the slot, registered as
  pinned host memory, completed by an event.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from snapstore.format.bytecopy import copy_many
from snapstore.node.segments import MappingCache, Segment

__all__ = ["CopyPlan", "SlotMaps", "Stager", "count_optimizer_steps", "region_keys"]

_ZERO = (ctypes.c_char * (1 << 16))()

_step_hook: Any = None


def count_optimizer_steps() -> None:
    """Make every ``optimizer.step()`` in this process bump the version counters of what it
    may have written: each parameter that has a gradient, and that parameter's state tensors.

    Fused and custom-kernel optimizers -- torch's ``AdamW(fused=True)``, the default of the
    Hugging Face Trainer; bitsandbytes; apex -- update parameters and moments in place
    without bumping their version counters, so the skip-unchanged rule would keep the
    previous bytes of a slot: a stale snapshot. A global post-step hook (installed once;
    the first Stager with deltas does it) bumps them after every step, as
    ``torch.autograd.graph.increment_version`` is documented for. Parameters without a
    gradient (frozen ones) are not bumped and still skip their copy. DTensors are bumped
    together with their local shard, which is what gets stored.
    """
    global _step_hook
    if _step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook = register_optimizer_step_post_hook(_stepped)


def _stepped(optimizer: Any, args: Any, kwargs: Any) -> None:
    from torch.autograd.graph import increment_version

    written: list[torch.Tensor] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            written.append(p)
            written.extend(v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v))
    local = [t._local_tensor for t in written if hasattr(t, "_local_tensor")]
    if written:
        increment_version(written + local)


def region_keys(members: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...] | None]:
    """Per region, ``((storage address, version), ...)`` of its tensors; None for an array."""
    out: list[tuple[Any, ...] | None] = []
    for leaves in members:
        key: list[tuple[int, int]] = []
        for obj in leaves:
            if not isinstance(obj, torch.Tensor):
                key = []
                break
            key.append((obj.untyped_storage().data_ptr(), obj._version))
        out.append(tuple(key) if key else None)
    return out


@dataclass
class SlotState:
    """What the client last wrote into one slot."""

    step: int
    layout: Any
    keys: list[tuple[Any, ...] | None]
    refs: list[tuple[Any, ...]] = field(repr=False)


@dataclass
class CopyPlan:
    """Which regions to copy into the slot, and which byte ranges changed since ``base_step``."""

    regions: list[int]
    full: bool
    keys: list[tuple[Any, ...] | None]
    refs: list[tuple[Any, ...]]
    copy_bytes: int
    changed: list[list[int]] | None = None
    base_step: int | None = None


class SlotMaps:
    """Mappings of this rank's slots, keyed by inode; at most a few at a time."""

    def __init__(self, keep: int = 4) -> None:
        self._cache = MappingCache(keep, on_close=self._unpin)
        self._pinned: set[tuple[int, int]] = set()

    def get(self, path: str, writable: bool) -> tuple[Segment, tuple[int, int]]:
        return self._cache.get(path, writable)

    def register_pinned(self, key: tuple[int, int], seg: Segment) -> None:
        """Page-lock a mapped slot for asynchronous device-to-host copies (CUDA only)."""
        if key in self._pinned or not torch.cuda.is_available():
            return
        err = torch.cuda.cudart().cudaHostRegister(seg.array.ctypes.data, seg.size, 0)
        if int(err) == 0:
            self._pinned.add(key)

    def _unpin(self, key: tuple[int, int], seg: Segment) -> None:
        if key in self._pinned:
            self._pinned.discard(key)
            with contextlib.suppress(Exception):
                torch.cuda.cudart().cudaHostUnregister(seg.array.ctypes.data)

    def close(self) -> None:
        self._cache.close()


class Stager:
    """Plans and runs staging copies for one rank. Not thread-safe: one copy at a time."""

    def __init__(self, deltas: bool = True, threads: int | None = None) -> None:
        if deltas:
            count_optimizer_steps()
        self.deltas = deltas
        self.threads = threads
        self.maps = SlotMaps()
        self._slots: dict[tuple[int, int], SlotState] = {}
        self._steps: dict[int, SlotState] = {}  # the last few staged steps
        self._stream: Any = None

    def plan(
        self,
        binding: Any,
        slot: tuple[int, int],
        holds: int | None,
        base_step: int | None,
    ) -> CopyPlan:
        """What to copy for this save into ``slot`` (which holds step ``holds``)."""
        layout = binding.layout
        members = binding.members
        keys: list[tuple[Any, ...] | None] = (
            region_keys(members) if self.deltas else [None] * len(members)
        )
        refs = [tuple(m) for m in members] if self.deltas else []
        prior = self._slots.get(slot)
        n = len(layout.regions)
        if (
            self.deltas
            and prior is not None
            and holds is not None
            and prior.step == holds
            and prior.layout is layout
        ):
            regions = [i for i in range(n) if keys[i] is None or keys[i] != prior.keys[i]]
            full = False
        else:
            regions = list(range(n))
            full = True
        plan = CopyPlan(
            regions=regions,
            full=full,
            keys=keys,
            refs=refs,
            copy_bytes=sum(layout.regions[i].nbytes for i in regions),
        )
        base = self._steps.get(base_step) if base_step is not None else None
        if self.deltas and base is not None and base.layout is layout:
            changed = [
                [layout.regions[i].offset, layout.regions[i].nbytes]
                for i in range(n)
                if keys[i] is None or keys[i] != base.keys[i]
            ]
            plan.changed = _coalesce(changed)
            plan.base_step = base_step
        return plan

    def copy(self, binding: Any, plan: CopyPlan, seg: Segment, slot: tuple[int, int]) -> None:
        """Copy the planned regions into the slot (and zero the padding on a full copy)."""
        layout = binding.layout
        sources = binding.sources
        base = seg.array.ctypes.data
        host: list[tuple[int, int, int]] = []
        device: list[int] = []
        if plan.full:
            for start, size in layout.gaps:
                for at in range(0, size, len(_ZERO)):
                    n = min(len(_ZERO), size - at)
                    host.append((base + start + at, ctypes.addressof(_ZERO), n))
        for i in plan.regions:
            src = sources[i]
            r = layout.regions[i]
            if src.is_cpu:
                host.append((base + r.offset, src.data_ptr(), r.nbytes))
            else:
                device.append(i)
        threads = torch.get_num_threads() if self.threads is None else self.threads
        event = self._copy_device(binding, device, seg, slot) if device else None
        copy_many(host, threads)
        if event is not None:
            event.synchronize()

    def _copy_device(self, binding: Any, regions: list[int], seg: Segment, slot: Any) -> Any:
        """Device regions: non-blocking copies on a side stream into pinned shared memory."""
        self.maps.register_pinned(slot, seg)
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        dst = torch.from_numpy(seg.array)
        layout = binding.layout
        current = torch.cuda.current_stream()
        with torch.cuda.stream(self._stream):
            self._stream.wait_stream(current)  # the values the trainer computed so far
            for i in regions:
                r = layout.regions[i]
                dst[r.offset : r.offset + r.nbytes].copy_(binding.sources[i], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return event

    def wrote(self, step: int, binding: Any, plan: CopyPlan, slot: tuple[int, int]) -> None:
        """Remember what the slot now holds (after a successful copy)."""
        state = SlotState(step, binding.layout, plan.keys, plan.refs)
        self._slots[slot] = state
        self._steps[step] = state
        for old in sorted(self._steps)[:-3]:
            del self._steps[old]

    def forget(self) -> None:
        """Drop delta bookkeeping (after a restore: slots may hold anything)."""
        self._slots.clear()
        self._steps.clear()

    def close(self) -> None:
        self.forget()
        self.maps.close()


def _coalesce(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for off, ln in sorted(ranges):
        if out and out[-1][0] + out[-1][1] >= off:
            out[-1][1] = max(out[-1][1], off + ln - out[-1][0])
        else:
            out.append([off, ln])
    return out
