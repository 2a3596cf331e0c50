"""Failure injection, shipped: kill nodes, SMPs and trainers, corrupt stored bytes.

Tests, benchmarks and the demo use these to cause real failures: a killed
node's raylet and every process on it die by SIGKILL and its shared memory is
removed (its memory is gone, as on a real machine); a killed SMP is a real
process killed, which Ray restarts; a corrupted chunk is a real byte flipped
in a segment file (or in a persisted step's file); a failing flush is the
SMP's real writer raising an I/O error mid-file.

Every function refuses to act on a store that ``snapstore up`` did not start
as an embedded cluster (``FaultInjectionError``): it never touches processes
or files that are not the store's own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from typing import Any

import psutil

from snapstore.control.handle import Store, connect
from snapstore.control.messages import NodeInfo
from snapstore.errors import FaultInjectionError
from snapstore.format.record import StepRecord, piece_bounds
from snapstore.format.wire import decode
from snapstore.node.segments import data_name, parity_name
from snapstore.node.store import node_dir, smp_name
from snapstore.ops.cluster import kill_tree
from snapstore.ops.lifecycle import add_embedded_node

__all__ = [
    "add_node",
    "corrupt_chunk",
    "corrupt_persisted",
    "fail_persist",
    "kill_node",
    "kill_nodes",
    "kill_smp",
    "kill_trainer",
    "stall_smp",
    "store_nodes",
]


def _embedded(store: Store | None) -> Store:
    store = store or connect()
    if not store.embedded:
        raise FaultInjectionError(
            "refusing to inject faults: this store is attached to a Ray cluster that "
            "`snapstore up` did not start (only embedded stores can be damaged on purpose)"
        )
    return store


def _our_pids(store: Store) -> set[int]:
    """Every live process of the embedded cluster: recorded pids and their descendants."""
    out: set[int] = set()
    for n in store.embedded_nodes():
        for pid in n.pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(pid)
                out.add(pid)
                out.update(c.pid for c in p.children(recursive=True))
    return out


def store_nodes(store: Store | None = None) -> list[str]:
    """Node ids of the embedded cluster's worker raylets still running, in start order."""
    store = _embedded(store)
    out = []
    for n in store.embedded_nodes():
        if n.head or n.to_dict().get("killed_at"):
            continue
        if any(psutil.pid_exists(p) for p in n.pids):
            out.append(n.node_id)
    return out


def kill_node(node_id: str, store: Store | None = None) -> dict[str, Any]:
    """Kill a worker raylet and everything on it (SIGKILL), and drop its shared memory."""
    return kill_nodes([node_id], store)[0]


def kill_nodes(node_ids: list[str], store: Store | None = None) -> list[dict[str, Any]]:
    """Kill several worker raylets at the same instant (one SIGKILL wave); drop their memory."""
    store = _embedded(store)
    entries = []
    for node_id in node_ids:
        entry = next((e for e in store.state["nodes"] if e["node_id"] == node_id), None)
        if entry is None:
            raise FaultInjectionError(f"node {node_id[:12]} is not a node of this embedded store")
        if entry.get("head"):
            raise FaultInjectionError("refusing to kill the head node: it runs the control plane")
        entries.append(entry)
    killed_at = time.time()
    count = kill_tree([int(p) for e in entries for p in e["pids"]])
    out = []
    for entry in entries:
        shutil.rmtree(
            node_dir(store.state["shm_dir"], store.store_id, entry["node_id"]), ignore_errors=True
        )
        entry["killed_at"] = killed_at
        out.append({"node_id": entry["node_id"], "killed_at": killed_at, "processes": count})
    store.save_state()
    return out


def add_node(store: Store | None = None, wait_smp: float = 60.0) -> str:
    """Start a replacement worker raylet; wait until its SMP heartbeats. Returns its node id."""
    store = _embedded(store)
    node = add_embedded_node(store)
    deadline = time.monotonic() + wait_smp
    while time.monotonic() < deadline:
        nodes = {n["node_id"]: n for n in store.nodes()}
        if nodes.get(node.node_id, {}).get("alive"):
            return node.node_id
        time.sleep(0.1)
    raise FaultInjectionError(
        f"the SMP of new node {node.node_id[:12]} did not start in {wait_smp} s"
    )


def kill_smp(node_id: str, wipe: bool = False, store: Store | None = None) -> dict[str, Any]:
    """SIGKILL the SMP process of a node (Ray restarts it).

    ``wipe=True`` also deletes the node's segments, as if the SMP had held
    them in its own memory: the restarted SMP must then rebuild them from
    the group instead of re-adopting them.
    """
    import ray

    store = _embedded(store)
    store.connect_ray()
    handle = ray.get_actor(smp_name(node_id), namespace=store.namespace)
    info = decode(ray.get(handle.info.remote(), timeout=30), NodeInfo)
    pid = info.pid
    if pid not in _our_pids(store):
        raise FaultInjectionError(f"SMP pid {pid} is not a process of this embedded store")
    killed_at = time.time()
    kill_tree([pid])
    if wipe:
        directory = node_dir(store.state["shm_dir"], store.store_id, node_id)
        with contextlib.suppress(FileNotFoundError):
            for f in os.listdir(directory):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, f))
    return {
        "node_id": node_id,
        "pid": pid,
        "killed_at": killed_at,
        "incarnation": info.incarnation,
    }


def kill_trainer(pid: int, store: Store | None = None) -> float:
    """SIGKILL a trainer process running on the embedded cluster; return when it was killed."""
    store = _embedded(store)
    if pid not in _our_pids(store):
        raise FaultInjectionError(
            f"pid {pid} is not a process of this embedded store's Ray cluster; refusing to kill it"
        )
    killed_at = time.time()
    kill_tree([pid])
    return killed_at


def corrupt_chunk(
    job: str,
    rank: int | None = None,
    piece: int = 0,
    parity: tuple[int, int, int] | None = None,
    offset: int = 0,
    store: Store | None = None,
) -> dict[str, Any]:
    """Flip one byte of the job's committed step where it is stored.

    Either a data piece (``rank``, ``piece``) on the rank's home node, or a
    parity chunk (``parity`` = (group, stripe, index)). ``offset`` is the
    byte within the piece or chunk. Returns what was hit.
    """
    store = _embedded(store)
    data = store.call("record", job)
    if data is None:
        raise FaultInjectionError(f"job {job!r} has no committed step to corrupt")
    rec = StepRecord.from_bytes(data)
    if parity is not None:
        g, s, i = parity
        pe = next((p for p in rec.parity if (p.group, p.stripe, p.index) == (g, s, i)), None)
        if pe is None:
            raise FaultInjectionError(f"job {job!r} has no parity chunk {parity}")
        node, name, at, length = (
            pe.node,
            parity_name(job, rec.step, rec.version),
            pe.offset,
            pe.length,
        )
    else:
        if rank is None or rank not in rec.ranks:
            raise FaultInjectionError(f"job {job!r} has no rank {rank}")
        e = rec.ranks[rank]
        at, length = piece_bounds(e.size, rec.k, piece)
        node, name = e.node, data_name(job, rank, rec.step)
    if not 0 <= offset < length:
        raise FaultInjectionError(f"offset {offset} outside the chunk of {length} bytes")
    path = os.path.join(node_dir(store.state["shm_dir"], store.store_id, node), name)
    with open(path, "r+b") as f:
        f.seek(at + offset)
        b = f.read(1)
        f.seek(at + offset)
        f.write(bytes([b[0] ^ 0xFF]))
    return {"node_id": node, "file": name, "offset": at + offset, "step": rec.step}


def fail_persist(
    node_id: str,
    after_bytes: int | None = None,
    stall: tuple[int, float] | None = None,
    store: Store | None = None,
) -> None:
    """Make the node's SMP fail or stall its next flushes to disk (None, None: clear both).

    ``after_bytes``: each rank file it writes fails with an I/O error once
    that many bytes are written. ``stall`` (bytes, seconds): it stops that
    long once that many bytes are written (or until the faults are cleared),
    so a test can act while a flush holds its slots, or kill it mid-flush.
    """
    import ray

    store = _embedded(store)
    store.connect_ray()
    handle = ray.get_actor(smp_name(node_id), namespace=store.namespace)
    ray.get(handle.set_fault.remote("persist_fail_after", after_bytes), timeout=30)
    ray.get(handle.set_fault.remote("persist_stall_after", stall), timeout=30)


def corrupt_persisted(
    job: str, step: int, rank: int, offset: int = 0, store: Store | None = None
) -> dict[str, Any]:
    """Flip one byte of rank ``rank``'s file of a complete persisted step of the store."""
    from snapstore.persist import is_url, rank_file, step_dir

    store = _embedded(store)
    path = os.path.join(step_dir(store.config.persist_dir, job, step), rank_file(rank))
    if is_url(path):
        _flip_object(path, offset)
        return {"path": path, "offset": offset, "step": step}
    if not os.path.isfile(path):
        raise FaultInjectionError(f"job {job!r} has no persisted file {path}")
    size = os.path.getsize(path)
    if not 0 <= offset < size:
        raise FaultInjectionError(f"offset {offset} outside {path} of {size} bytes")
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    return {"path": path, "offset": offset, "step": step}


def _flip_object(url: str, offset: int) -> None:
    """Flip one byte of an object (no in-place writes there: read, flip, write back)."""
    import fsspec

    fs, where = fsspec.core.url_to_fs(url)
    if not fs.isfile(where):
        raise FaultInjectionError(f"no persisted object {url}")
    data = bytearray(fs.cat_file(where))
    if not 0 <= offset < len(data):
        raise FaultInjectionError(f"offset {offset} outside {url} of {len(data)} bytes")
    data[offset] ^= 0xFF
    fs.pipe_file(where, bytes(data))


def stall_smp(node_id: str, seconds: float, store: Store | None = None) -> dict[str, Any]:
    """Freeze a node's SMP process (SIGSTOP) for ``seconds``, then let it run on (SIGCONT).

    A healthy node that stops answering for a while -- a CPU hog, a long GC or
    swap storm -- as opposed to one that died. Returns at once; the process is
    continued by a timer thread (``"resumed"``: a threading.Event set when it is).
    A stalled process that the store stops meanwhile (``down``) dies as usual.
    """
    import signal
    import threading

    import ray

    if not 0 < seconds <= 600:
        raise FaultInjectionError(f"stall seconds must be in (0, 600], got {seconds!r}")
    store = _embedded(store)
    store.connect_ray()
    handle = ray.get_actor(smp_name(node_id), namespace=store.namespace)
    pid = decode(ray.get(handle.info.remote(), timeout=30), NodeInfo).pid
    if pid not in _our_pids(store):
        raise FaultInjectionError(f"SMP pid {pid} is not a process of this embedded store")
    resumed = threading.Event()

    def _resume() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        resumed.set()

    stopped_at = time.time()
    os.kill(pid, signal.SIGSTOP)
    timer = threading.Timer(seconds, _resume)
    timer.daemon = True
    timer.start()
    return {"node_id": node_id, "pid": pid, "stopped_at": stopped_at, "resumed": resumed}
