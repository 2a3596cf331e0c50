"""Export a step as plain PyTorch files: a ``torch.save`` file per rank, or a DCP checkpoint.

Whatever was saved comes out readable with nothing but PyTorch, and no
running store:

- ``torch``: ``rank-<r>.pt`` per rank, loadable with
  ``torch.load(path, weights_only=True)``;
- ``dcp``: one ``torch.distributed.checkpoint`` directory (written with
  ``FileSystemWriter``, no process group) holding ``{"rank_<r>": state}``,
  loadable with ``dcp.load(template, storage_reader=FileSystemReader(dir))``.

``torch.load(weights_only=True)`` refuses numpy objects, so numpy arrays and
numpy scalars are written as tensors of the same dtype, shape and bytes (0-d
for scalars); ``export.json`` lists the paths converted, with the job, the
step, where it came from and the files.

Sources: a persisted step, read here from files alone
(:func:`persisted_step`, :func:`persisted_states`), or states the caller
read from a running store (the CLI uses ``snapstore.clients.Client.peek``).
"""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from snapstore import persist
from snapstore.errors import (
    ConfigError,
    FormatError,
    PersistedStepCorruptError,
    SnapshotNotFoundError,
)
from snapstore.format.frame import read_frame

__all__ = [
    "EXPORT_VERSION",
    "FORMATS",
    "export_states",
    "persisted_states",
    "persisted_step",
    "torch_safe",
]

EXPORT_VERSION = 1
FORMATS = ("torch", "dcp")
INFO_NAME = "export.json"


# -- reading a persisted step, no store needed ---------------------------------------


def persisted_step(
    root: str, job: str, step: int | None = None
) -> tuple[persist.PersistManifest, str, list[dict[str, Any]]]:
    """The newest complete persisted step of ``job`` (or ``step``) whose files all verify.

    Returns its manifest, its directory, and the newer steps skipped
    because they failed verification (``step``, ``reason``). With ``step``
    given, a step that fails is an error (PersistedStepCorruptError) rather
    than skipped.
    """
    skipped: list[dict[str, Any]] = []
    candidates = persist.newest_first(root, job, step)
    for s, path in candidates:
        try:
            man = persist.read_manifest(path)
            for r in sorted(man.ranks):
                persist.verify_rank(path, r, man)
        except PersistedStepCorruptError as e:
            if step is not None:
                raise
            skipped.append({"step": s, "reason": str(e)})
            continue
        return man, path, skipped
    where = persist.job_dir(root, job)
    if step is not None:
        have = [s for s, _ in persist.newest_first(root, job)]
        raise SnapshotNotFoundError(
            f"job {job!r} has no complete persisted step {step} in {where} "
            f"(complete steps: {sorted(have) or 'none'})"
        )
    detail = "; ".join(f"step {s['step']}: {s['reason']}" for s in skipped)
    raise SnapshotNotFoundError(
        f"no complete persisted step of job {job!r} in {where}"
        + (f" verifies ({detail})" if skipped else "")
    )


def persisted_states(path: str, manifest: persist.PersistManifest) -> Iterator[tuple[int, Any]]:
    """``(rank, state)`` of every rank of a persisted step, one at a time, verified."""
    from snapstore.format.pack import unpack

    for r in sorted(manifest.ranks):
        buf = persist.read_rank(path, r, manifest)
        framed = read_frame(buf, len(buf))
        if framed.step != manifest.step:
            raise FormatError(
                f"{path}: rank {r}'s buffer says step {framed.step}, the manifest {manifest.step}"
            )
        yield r, unpack(framed.manifest, framed.data, copy=True)


# -- writing --------------------------------------------------------------------------


def torch_safe(state: Any) -> tuple[Any, list[str]]:
    """``state`` with numpy arrays and scalars replaced by tensors; the paths replaced.

    Containers are rebuilt only where something inside them changed (a
    state dict's ``_metadata`` is kept); everything else is returned as is.
    """
    converted: list[str] = []
    return _safe(state, "", converted), converted


def _safe(obj: Any, path: str, converted: list[str]) -> Any:
    if isinstance(obj, np.ndarray | np.generic):
        converted.append(path or "<root>")
        arr = np.asarray(obj)
        if arr.dtype.kind not in "biufc":
            raise FormatError(f"{path}: numpy dtype {arr.dtype} has no torch equivalent")
        return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), order="C", copy=True))
    if isinstance(obj, dict):
        items = {k: _safe(v, f"{path}/{k}", converted) for k, v in obj.items()}
        if all(items[k] is obj[k] for k in obj):
            return obj
        out: Any = (
            collections.OrderedDict(items) if isinstance(obj, collections.OrderedDict) else items
        )
        meta = getattr(obj, "_metadata", None)
        if meta is not None:
            out._metadata = meta
        return out
    if isinstance(obj, list | tuple) and not hasattr(obj, "_fields"):
        seq = [_safe(v, f"{path}/{i}", converted) for i, v in enumerate(obj)]
        if all(a is b for a, b in zip(seq, obj, strict=True)):
            return obj
        return type(obj)(seq)
    return obj


def export_states(
    states: Iterable[tuple[int, Any]],
    to: str,
    fmt: str,
    info: dict[str, Any],
) -> dict[str, Any]:
    """Write ``(rank, state)`` pairs to the directory ``to`` as ``fmt``; return the summary.

    ``to`` must not exist or be empty. ``info`` (job, step, source...) goes
    into ``export.json`` with the files written and the paths converted.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"export format must be one of {FORMATS}, got {fmt!r}")
    if os.path.isdir(to) and os.listdir(to):
        raise ConfigError(f"export directory {to} is not empty; choose a new or empty one")
    os.makedirs(to, exist_ok=True)
    files: list[str] = []
    converted: dict[str, list[str]] = {}
    ranks: list[int] = []
    if fmt == "torch":
        for r, state in states:
            safe, conv = torch_safe(state)
            name = f"rank-{r}.pt"
            tmp = os.path.join(to, name + ".new")
            torch.save(safe, tmp)
            os.replace(tmp, os.path.join(to, name))
            files.append(name)
            ranks.append(r)
            if conv:
                converted[str(r)] = conv
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        whole: dict[str, Any] = {}
        for r, state in states:
            safe, conv = torch_safe(state)
            whole[f"rank_{r}"] = safe
            ranks.append(r)
            if conv:
                converted[str(r)] = conv
        dcp.save(whole, storage_writer=FileSystemWriter(to), no_dist=True)
        files = sorted(os.listdir(to))
    summary = {
        "version": EXPORT_VERSION,
        "format": fmt,
        "ranks": ranks,
        "files": files,
        "converted_numpy": converted,
        "exported_at": time.time(),
        **info,
    }
    with open(os.path.join(to, INFO_NAME), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    return summary
