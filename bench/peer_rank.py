"""What the peers' rank processes share: states, checks, results, memory, faults.

These run inside each peer's own environment (``bench.peer_envs``), which has
torch and numpy but none of snapstore's other dependencies: this module
imports only the standard library, numpy, torch and ``snapstore.bench._common``.

Conventions every peer's rank follows:

- The state of rank ``r`` after step ``s`` is ``expected_state(nbytes, r, s)``:
  ``rank_state`` (``training_state``, seeded) with ``mark_step(s)`` (every tensor changes at every
  step), so a process that never saw it can check a restore bitwise.
- A rank writes what it measured as JSON with :func:`write_result`; the
  driver reads ``<outdir>/<phase>-rank<r>.json``.
- Extra memory is measured, not assumed: anonymous memory (PSS) of the
  peer's processes from ``/proc/<pid>/smaps_rollup``, plus the blocks of the
  shared-memory or disk files it writes, before the first save and after.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from typing import Any

from snapstore.bench._common import mark_step, memcpy_seconds, tensors_of, training_state

__all__ = [
    "check",
    "expected_state",
    "file_bytes",
    "flip_byte",
    "init_gloo",
    "leaves",
    "memcpy_median",
    "pss_anon",
    "rank_state",
    "step_state",
    "tree_pids",
    "wait_for",
    "write_result",
]


def rank_state(nbytes: int, rank: int) -> dict[str, Any]:
    """Rank ``rank``'s state before its first step, the same in every process.

    (``training_state`` stores torch's global RNG state: seeded here first.)
    """
    import torch

    torch.manual_seed(1000 + rank)
    return training_state(nbytes, seed=rank)


def expected_state(nbytes: int, rank: int, step: int) -> dict[str, Any]:
    """Rank ``rank``'s state as it is after step ``step``."""
    state = rank_state(nbytes, rank)
    step_state(state, step)
    return state


def step_state(state: dict[str, Any], step: int) -> None:
    """Change every tensor of ``state`` as step ``step`` does (deterministically).

    (The first element of each tensor becomes ``step % 256``: uint8 tensors too.)
    """
    mark_step(tensors_of(state), step % 256)
    state["step"] = step


def leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every tensor of a nested state by its path (tied tensors under each of their paths)."""
    import torch

    out: dict[str, Any] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(leaves(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(leaves(v, f"{prefix}/{i}"))
    return out


def check(got: Any, expect: dict[str, Any]) -> dict[str, Any]:
    """Compare a restored state with the expected one, bitwise.

    ``got`` is a nested state (compared path by path) or a flat list of
    tensors (compared with ``tensors_of(expect)`` in order, as
    ``save_tensors`` stores them). Returns ``{"ok": bool, "tensors": n,
    "wrong": [paths], "missing": [paths], "wrong_bytes": n}``.
    """
    import torch

    if isinstance(got, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in got):
        want = {f"/{i}": t for i, t in enumerate(tensors_of(expect))}
        have = {f"/{i}": t for i, t in enumerate(got)}
    else:
        want, have = leaves(expect), leaves(got)
    wrong, missing, wrong_bytes = [], [], 0
    for path, w in want.items():
        h = have.get(path)
        if h is None or h.shape != w.shape or h.dtype != w.dtype:
            missing.append(path)
            continue
        a = h.detach().contiguous().view(-1).view(torch.uint8)
        b = w.detach().contiguous().view(-1).view(torch.uint8)
        if not torch.equal(a, b):
            wrong.append(path)
            wrong_bytes += int((a != b).sum())
    return {
        "ok": not wrong and not missing,
        "tensors": len(want),
        "wrong": wrong[:5],
        "missing": missing[:5],
        "wrong_bytes": wrong_bytes,
    }


def memcpy_median(nbytes: int, reps: int = 5) -> list[float]:
    """One ``np.copyto`` of ``nbytes``, timed ``reps`` times in this process."""
    return memcpy_seconds(nbytes, reps)["np"]


def write_result(outdir: str, phase: str, rank: int, payload: dict[str, Any]) -> None:
    """Write ``payload`` as ``<outdir>/<phase>-rank<rank>.json`` (atomically)."""
    path = os.path.join(outdir, f"{phase}-rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, default=str)
    os.replace(path + ".tmp", path)


def wait_for(path: str, timeout: float, what: str) -> None:
    """Block until ``path`` exists; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what} ({path})")
        time.sleep(0.02)


def tree_pids(root: int) -> list[int]:
    """``root`` and every process below it, from /proc (no psutil in peer environments)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def pss_anon(pids: Iterable[int]) -> int:
    """Proportional anonymous memory of ``pids``, in bytes (shared memory files excluded)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss_Anon:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def file_bytes(paths: Iterable[str]) -> int:
    """Allocated bytes of files (or of every file under directories), by their blocks."""
    total = 0
    for path in paths:
        if os.path.isdir(path):
            for d, _, names in os.walk(path):
                total += file_bytes(os.path.join(d, n) for n in names)
            continue
        try:
            total += os.stat(path).st_blocks * 512
        except OSError:
            continue
    return total


def flip_byte(path: str, offset: int) -> dict[str, Any]:
    """XOR one byte of a file (a shared-memory segment under /dev/shm, or on disk) with 0xFF."""
    size = os.path.getsize(path)
    if not 0 <= offset < size:
        raise ValueError(f"offset {offset} outside {path} of {size} bytes")
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    return {"path": path, "offset": offset, "size": size}


def init_gloo(timeout: float = 120.0) -> tuple[int, int, int]:
    """Join the launcher's process group over gloo; returns (rank, world size, restart count).

    The store keys are prefixed by the launcher's restart count: after a
    restart the launcher's store still holds the dead incarnation's
    addresses, and a group that read them would connect to dead ranks.
    """
    from datetime import timedelta

    import torch.distributed as dist

    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=rank == 0 and not agent_store,
        timeout=timedelta(seconds=timeout),
    )
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(f"snapstore-bench/{restart}/", store),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout),
    )
    return rank, world, restart
