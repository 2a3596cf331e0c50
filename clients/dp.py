"""Data-parallel de-duplication: state replicated across DP ranks is stored once.

Under DDP every DP rank holds the same parameters and optimizer state. With
a :class:`DPGroup`, each DP rank stores only its share of the replicated
tensors (chosen by path globs; all of them by default): the tensors are
assigned to DP ranks by size, greedily, the same way on every rank, and a
rank's snapshot holds a small placeholder where another rank's tensor would
be. Restore reads the placeholders' owners' snapshots of the same step and
gives every rank the whole state. Tied tensors (one storage at several
paths) always go to one owner, so they stay tied.

FSDP / DTensor-sharded state is not replicated: store it per rank as it is
(DTensors are stored as their local shard; see :func:`localize`).

Elastic restores: a placeholder names the *global* rank that stored the
tensor, in the world that saved the step, and restore reads it from that
same step whatever the current world size. So a job that saved on N DP
ranks restores on fewer (an owner whose node is gone is rebuilt from
parity), and its next saves spread the replicated state over the new DP
group. Restoring on more ranks than saved is not supported (a rank past the
saved world size has no buffer of its own).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PLACEHOLDER", "DPGroup", "fill", "localize", "placeholders", "shard"]

PLACEHOLDER = "snapstore:dp-shard"
"""First element of the tuple standing in for a tensor stored by another DP rank."""


@dataclass(frozen=True)
class DPGroup:
    """This rank's data-parallel group: its index, the group's global ranks in DP order,
    and globs of ``/``-joined state paths that are replicated (``"*"``: everything)."""

    index: int
    ranks: tuple[int, ...]
    replicated: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        if not 0 <= self.index < len(self.ranks):
            raise ValueError(f"DP index {self.index} outside a group of {len(self.ranks)}")
        if len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"DP group ranks repeat: {self.ranks}")

    @classmethod
    def from_process_group(cls, pg: Any, replicated: Sequence[str] = ("*",)) -> DPGroup:
        """From a torch.distributed process group spanning the DP ranks."""
        import torch.distributed as dist

        ranks = tuple(int(r) for r in dist.get_process_group_ranks(pg))
        return cls(int(dist.get_rank(pg)), ranks, tuple(replicated))

    def is_replicated(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, g) for g in self.replicated)


def _walk(obj: Any, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, (*path, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, (*path, i))


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


def _owners(state: Any, group: DPGroup) -> dict[tuple[Any, ...], int]:
    """DP index owning each replicated tensor path; the same on every DP rank."""
    storages: dict[int, list[tuple[Any, ...]]] = {}
    sizes: dict[int, int] = {}
    order: list[int] = []
    for path, t in _walk(state, ()):
        if not group.is_replicated(_path_str(path)):
            continue
        ident = t.untyped_storage().data_ptr() if t.numel() else -len(order) - 1
        if ident not in storages:
            storages[ident] = []
            sizes[ident] = t.untyped_storage().nbytes()
            order.append(ident)
        storages[ident].append(path)
    # Largest first, ties by first path: deterministic across ranks whose
    # storages sit at different addresses.
    ranked = sorted(order, key=lambda s: (-sizes[s], _path_str(storages[s][0])))
    load = [0] * len(group.ranks)
    out: dict[tuple[Any, ...], int] = {}
    for s in ranked:
        owner = min(range(len(load)), key=lambda i: (load[i], i))
        load[owner] += sizes[s]
        for path in storages[s]:
            out[path] = owner
    return out


def _rebuild(obj: Any, path: tuple[Any, ...], fn: Callable[[tuple[Any, ...], Any], Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(path, obj)
    if isinstance(obj, dict):
        new = {k: _rebuild(v, (*path, k), fn) for k, v in obj.items()}
        if all(new[k] is obj[k] for k in obj):
            return obj
        out = type(obj)() if type(obj) is not dict else {}
        try:
            out.update(new)
        except TypeError:
            out = new
        meta = getattr(obj, "_metadata", None)
        if meta is not None:
            out._metadata = meta  # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple)):
        items = [_rebuild(v, (*path, i), fn) for i, v in enumerate(obj)]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            return obj
        return type(obj)(items) if type(obj) in (list, tuple) else items
    return obj


def shard(state: Any, group: DPGroup) -> Any:
    """The part of ``state`` this DP rank stores: others' replicated tensors become placeholders."""
    owners = _owners(state, group)

    def keep(path: tuple[Any, ...], t: torch.Tensor) -> Any:
        owner = owners.get(path)
        if owner is None or owner == group.index:
            return t
        return (PLACEHOLDER, group.ranks[owner])

    return _rebuild(state, (), keep)


def placeholders(state: Any) -> dict[tuple[Any, ...], int]:
    """Path -> global rank of every placeholder in an unpacked state."""
    out: dict[tuple[Any, ...], int] = {}

    def walk(obj: Any, path: tuple[Any, ...]) -> None:
        if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == PLACEHOLDER:
            out[path] = int(obj[1])
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, (*path, k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, (*path, i))

    walk(state, ())
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def fill(state: Any, values: dict[tuple[Any, ...], Any], into: Any = None) -> Any:
    """Replace placeholders at ``values``' paths; copy into ``into``'s tensors where they fit."""

    def walk(obj: Any, path: tuple[Any, ...]) -> Any:
        if path in values:
            new = values[path]
            if into is not None:
                try:
                    target = _get(into, path)
                except (KeyError, IndexError, TypeError):
                    target = None
                if (
                    isinstance(target, torch.Tensor)
                    and target.shape == new.shape
                    and target.dtype == new.dtype
                ):
                    with torch.no_grad():
                        target.copy_(new)
                    return target
            return new.clone()
        if isinstance(obj, dict):
            for k in list(obj):
                obj[k] = walk(obj[k], (*path, k))
            return obj
        if isinstance(obj, list):
            for i in range(len(obj)):
                obj[i] = walk(obj[i], (*path, i))
            return obj
        if isinstance(obj, tuple) and not (len(obj) == 2 and obj[0] == PLACEHOLDER):
            return type(obj)(walk(v, (*path, i)) for i, v in enumerate(obj))
        return obj

    return walk(state, ())


def localize(state: Any) -> Any:
    """Replace DTensors by their local shards (zero copy); other values unchanged."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return state

    def local(path: tuple[Any, ...], t: torch.Tensor) -> Any:
        return t.to_local() if isinstance(t, DTensor) else t

    return _rebuild(state, (), local)
