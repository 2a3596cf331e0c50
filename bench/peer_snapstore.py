"""snapstore's rows of ``bench.peers``: saves (sync and lazy), a crash, corruption, a node loss.

Runs in snapstore's own environment: an embedded store of 4 nodes (k = 3,
m = 1), two rank processes, each with a ``Client`` pinned to its own node
and the same state as the peers' ranks (``peer_rank.rank_state``).

1. Saves: ``client.save(step, state)`` timed until it returns (the staging
   copy) and until ``result()`` (data and parity stored on other nodes:
   protected against a node loss); then ``save(..., lazy=True)``, timed the
   same way (it returns before the copy). Segment bytes of the job on every
   node (data slots on the rank's node, parity on the others) are measured
   after the saves.
2. Crash: the driver SIGKILLs both rank processes; a new process for rank 1
   restores from its node's memory (timed, checked bitwise).
3. Corruption: one byte of rank 1's stored data is flipped
   (``faults.corrupt_chunk``); a new process restores rank 1 again.
4. Node loss: rank 1's node is killed (``faults.kill_node``: raylet,
   processes, shared memory); once the store notices, a process on a
   surviving node restores rank 1, decoded from the other nodes.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from snapstore.bench._common import private_store, tensors_of, wait_node_dead

__all__ = ["run"]

WORLD = 2
WARMUP = 3
JOB = "peers"


def _ranks_main(
    rank: int, rundir: str, node: str, nbytes: int, reps: int, start: Any, queue: Any
) -> None:
    """One rank: sync saves, then lazy ones; report; wait to be killed (the crash)."""
    out: dict[str, Any] = {"rank": rank}
    try:
        from snapstore.bench.peer_rank import memcpy_median, rank_state, step_state
        from snapstore.clients import Client

        client = Client(JOB, rank, WORLD, rundir=rundir, node_id=node, timeout=300)
        state = rank_state(nbytes, rank)
        nb = sum(t.numel() * t.element_size() for t in tensors_of(state))
        step = 0
        for mode in ("sync", "lazy"):
            returns, protected = [], []
            for i in range(WARMUP + reps):
                step += 1
                step_state(state, step)
                start.wait(timeout=300)  # both ranks save together
                t0 = time.perf_counter()
                fut = client.save(step, state, lazy=mode == "lazy")
                t1 = time.perf_counter()
                fut.result(timeout=300)
                t2 = time.perf_counter()
                if i >= WARMUP:
                    returns.append(t1 - t0)
                    protected.append(t2 - t0)
                time.sleep(0.1)  # the step's compute: the next lease is taken meanwhile
            out[mode] = {"returns": returns, "protected": protected}
        out["last_step"], out["state_bytes"] = step, nb
        start.wait(timeout=300)
        out["memcpy"] = memcpy_median(nb)
    except BaseException as e:
        out["error"] = repr(e)
    queue.put(out)
    time.sleep(600)  # the driver SIGKILLs this process: a trainer crash


def _restore_main(rundir: str, node: str, rank: int, nbytes: int, queue: Any) -> None:
    """A new trainer process for ``rank`` on ``node``: restore, timed, checked."""
    out: dict[str, Any] = {"rank": rank}
    try:
        from snapstore.bench.peer_rank import check, expected_state
        from snapstore.clients import Client

        client = Client(JOB, rank, WORLD, rundir=rundir, node_id=node, timeout=300)
        client.latest_step()  # what a restarted trainer asks first (connects)
        t0 = time.perf_counter()
        try:
            step, state = client.restore()
        except Exception as e:
            out["raised"] = f"{type(e).__name__}: {str(e)[:200]}"
        else:
            out["seconds"] = time.perf_counter() - t0
            out["step"] = step
            out["check"] = check(state, expected_state(nbytes, rank, step))
        client.close()
    except BaseException as e:
        out["error"] = repr(e)
    queue.put(out)


def _spawn(ctx: Any, target: Any, args: tuple[Any, ...]) -> Any:
    p = ctx.Process(target=target, args=args)
    p.start()
    return p


def _collect(ctx_queue: Any, procs: list[Any], n: int, what: str) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        got = ctx_queue.get(timeout=600)
        if "error" in got:
            raise RuntimeError(f"snapstore {what}, rank {got['rank']}: {got['error']}")
        out.append(got)
    return sorted(out, key=lambda r: r["rank"])


def _stop(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(timeout=30)


def _restore(ctx: Any, rundir: str, node: str, rank: int, nbytes: int) -> dict[str, Any]:
    queue = ctx.Queue()
    p = _spawn(ctx, _restore_main, (rundir, node, rank, nbytes, queue))
    try:
        return _collect(queue, [p], 1, "restore")[0]
    finally:
        _stop([p])


def _segment_bytes(store: Any) -> dict[str, int]:
    """Bytes of the job's segments in every node's memory, by kind: data, parity, deltas,
    spares (retired slots kept for reuse) and leased (slots a trainer stages into)."""
    from snapstore.bench.peer_rank import file_bytes
    from snapstore.node.store import node_dir

    root = os.path.dirname(node_dir(store.state["shm_dir"], store.store_id, "x"))
    kinds = {"d": "data", "p": "parity", "z": "deltas", "x": "spare", "w": "leased"}
    out = dict.fromkeys(kinds.values(), 0)
    for d, _, names in os.walk(root):
        for name in names:
            kind = kinds.get(name.split(".", 1)[0])
            if kind and f".{JOB}." in name:
                out[kind] += file_bytes([os.path.join(d, name)])
    return out


def _outcome(res: dict[str, Any]) -> str:
    if "raised" in res:
        return f"raised {res['raised'].split(':', 1)[0]}"
    return "repaired: bitwise OK" if res["check"]["ok"] else "wrong bytes returned silently"


def run(nbytes: int, reps: int) -> dict[str, Any]:
    """Every snapstore measurement of bench.peers; see the module docstring."""
    import multiprocessing as mp

    from snapstore.ops import faults

    budget = max(256 << 20, 6 * nbytes + (64 << 20))
    # Silence only makes a node suspect (nothing is aborted); a node is dead
    # when Ray says its SMP died, so the failure timeout plays no part here.
    with private_store(nodes=4, k=3, m=1, memory_per_node=budget) as store:
        nodes = faults.store_nodes(store)
        ctx = mp.get_context("spawn")
        queue, start = ctx.Queue(), ctx.Barrier(WORLD)
        procs = [
            _spawn(ctx, _ranks_main, (r, store.rundir, nodes[r], nbytes, reps, start, queue))
            for r in range(WORLD)
        ]
        try:
            saves = _collect(queue, procs, WORLD, "saves")
            segments = _segment_bytes(store)
        finally:
            _stop(procs)  # SIGKILL: the trainers crash
        crash = _restore(ctx, store.rundir, nodes[1], 1, nbytes)
        hit = faults.corrupt_chunk(JOB, rank=1, piece=0, offset=1000, store=store)
        corrupt = _restore(ctx, store.rundir, nodes[1], 1, nbytes)
        killed = faults.kill_node(nodes[1], store)["killed_at"]
        wait_node_dead(store, nodes[1], killed, 60, "the store to see the killed node dead")
        loss = _restore(ctx, store.rundir, nodes[2], 1, nbytes)
        with contextlib.suppress(Exception):
            store.call("drop_job", JOB, timeout=60)
    state_bytes = sum(r["state_bytes"] for r in saves)
    for what, res in (("crash", crash), ("node loss", loss)):
        if "raised" in res:
            raise RuntimeError(f"snapstore restore after a {what} raised {res['raised']}")
    return {
        "sync": {
            "returns": [x for r in saves for x in r["sync"]["returns"]],
            "protected": [x for r in saves for x in r["sync"]["protected"]],
        },
        "lazy": {
            "returns": [x for r in saves for x in r["lazy"]["returns"]],
            "protected": [x for r in saves for x in r["lazy"]["protected"]],
        },
        "memcpy": {r["rank"]: r["memcpy"] for r in saves},
        "memory": {
            "bytes": segments["parity"],
            "local": segments["data"] + segments["deltas"],
            "segments": segments,
            "state": state_bytes,
            "what": "RS parity on other nodes",
        },
        "crash": {
            "seconds": crash["seconds"],
            "ok": crash["check"]["ok"],
            "path": "its node's shared memory, every piece checked",
        },
        "loss": {
            "seconds": loss["seconds"],
            "ok": loss["check"]["ok"],
            "path": "decoded from the surviving nodes' data and parity",
        },
        "corruption": {"outcome": _outcome(corrupt), "hit": hit},
    }
