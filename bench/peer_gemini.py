"""lm-resiliency's GEMINI under torchrun: saves, replication to a peer, recovery, corruption.

Driver side (:func:`run`, in snapstore's environment) and rank side
(``python -m snapstore.bench.peer_gemini rank ...``, in GEMINI's own
environment, started by torchrun).

How it runs. GEMINI's documented launcher is torchrun with its own
rendezvous backend (``--rdzv-backend=lm_resiliency``); with torch 2.13 that
plugin fails to register (a TypeError in torch's rendezvous registry), so
torchrun runs with its c10d rendezvous on 127.0.0.1 and GEMINI's
``InMemoryCheckpointManager`` is used as its API documents. Two ranks, each
one "node" with its own node-local folder; ``replication_jump=1`` pairs them,
so each holds the other's replica in memory.

1. Saves (restart count 0): ``save_tensors`` (tensor references, its fastest
   path) timed until it returns, and until ``finalize_replication`` says the
   peer holds the replica (protected against a node loss). Four buffer slots
   per rank are written in full before timing. Anonymous memory of the rank
   process before the first save and after the last is the memory GEMINI
   added (own and peer slots).
2. Loss: rank 1 deletes its node folder (its node-local disk) and SIGKILLs
   itself. torchrun SIGTERMs rank 0, whose GEMINI handler flushes its own
   slots and rank 1's replica to its node-local disk and mirrors them to the
   restart destination (rank 1's new folder: the replacement node), as
   ``set_restart_destination`` documents; then torchrun restarts both.
3. Recovery (restart count 1): ``load_tensors`` on both ranks, timed,
   checked bitwise. A crash of one trainer takes the same path (the killed
   process's own buffers are gone with it; its replica is on the peer).
4. Corruption: rank 1 flips one byte of its recovered shard file and both
   load again.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from snapstore.bench.peer_launch import Launched, free_port, peer_env, wait_results

__all__ = ["run"]

WORLD = 2
WARMUP = 6
"""Saves before timing: GEMINI cycles through 4 buffer slots, each written in full once."""
RUN_ID = "snapstore-bench-peers"


def run(python: str, nbytes: int, reps: int, workdir: str, log: str, timeout: float) -> dict:
    """Run GEMINI's two ranks under torchrun; return what they measured (see bench.peers)."""
    out = os.path.join(workdir, "out")
    work = os.path.join(workdir, "nodes")
    os.makedirs(out)
    os.makedirs(work)
    port = free_port()
    cmd = [
        python,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={WORLD}",
        "--max-restarts=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--monitor-interval=0.2",
        "-m",
        "snapstore.bench.peer_gemini",
        "rank",
        f"--out={out}",
        f"--work={work}",
        f"--nbytes={nbytes}",
        f"--reps={reps}",
    ]
    with Launched(cmd, peer_env(), log) as job:
        save = wait_results(out, "save", range(WORLD), timeout, job)
        restore = wait_results(out, "restore", range(WORLD), timeout, job)
        job.wait(60, "torchrun (GEMINI) after the restore")
    loss = restore[1]
    return {
        "returns": [x for r in save for x in r["returns"]],
        "protected": [x for r in save for x in r["protected"]],
        "memcpy": {r["rank"]: r["memcpy"] for r in save},
        "per_rank": {
            r["rank"]: {"returns": r["returns"], "protected": r["protected"]} for r in save
        },
        "memory": {
            "bytes": sum(r["memory_after"] - r["memory_before"] for r in save),
            "state": sum(r["state_bytes"] for r in save),
            "what": "own + peer buffer slots in the trainers' memory",
        },
        "crash": {
            "same_as_loss": True,
            "why": "same path as a node loss: the killed trainer's buffers die with it; "
            "its replica comes from the peer",
        },
        "loss": {
            "seconds": loss["seconds"],
            "ok": all(r["check"]["ok"] for r in restore),
            "step": loss["step"],
            "path": "the peer's replica, flushed to its disk at the restart and mirrored to "
            "the replacement's folder",
            "flush_seconds": restore[0].get("flush_seconds"),
        },
        "corruption": restore[1]["corruption"],
    }


# --- rank side (GEMINI's environment) ----------------------------------------------------


def _manager(node_dir: str) -> Any:
    from lm_resiliency import InMemoryCkptConfig
    from lm_resiliency.checkpointing import InMemoryCheckpointManager

    return InMemoryCheckpointManager(
        InMemoryCkptConfig(
            interval=1,
            replication_jump=1,
            disk_flush_interval=0,
            disk_folder=node_dir,
            pin_memory=False,
            run_id=RUN_ID,
        )
    )


def _saves(args: argparse.Namespace, rank: int) -> None:
    import torch.distributed as dist

    from snapstore.bench._common import tensors_of
    from snapstore.bench.peer_rank import (
        memcpy_median,
        pss_anon,
        rank_state,
        step_state,
        write_result,
    )

    node_dir = os.path.join(args.work, f"node{rank}")
    os.makedirs(node_dir, exist_ok=True)
    manager = _manager(node_dir)
    if rank == 0:
        # The restart policy is the caller's (GEMINI copies where it is told):
        # mirror what this node flushes to the replacement of node 1.
        manager.set_restart_destination(lambda: os.path.join(args.work, "node1"))
    state = rank_state(args.nbytes, rank)
    tensors = tensors_of(state)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    before = pss_anon([os.getpid()])
    res: dict[str, Any] = {"rank": rank, "returns": [], "protected": [], "state_bytes": nbytes}
    for step in range(1, WARMUP + args.reps + 1):
        step_state(state, step)
        dist.barrier()
        t0 = time.perf_counter()
        manager.save_tensors(tensors, step)
        t1 = time.perf_counter()
        manager.maybe_wait()
        replicated = manager.finalize_replication()
        t2 = time.perf_counter()
        if step > WARMUP:
            if not replicated:
                raise RuntimeError(f"step {step}: GEMINI reports no complete replica")
            res["returns"].append(t1 - t0)
            res["protected"].append(t2 - t0)
    res["memory_before"], res["memory_after"] = before, pss_anon([os.getpid()])
    res["memcpy"] = memcpy_median(nbytes)
    write_result(args.out, "save", rank, res)
    dist.barrier()
    if rank == 1:
        # The node is lost: its memory (this process) and its node-local disk.
        shutil.rmtree(node_dir, ignore_errors=True)
        os.kill(os.getpid(), signal.SIGKILL)
    # Rank 0 waits for torchrun's SIGTERM: GEMINI's handler flushes and mirrors.
    gemini_handler = signal.getsignal(signal.SIGTERM)
    if not callable(gemini_handler):
        raise RuntimeError(
            f"GEMINI installed no SIGTERM handler to flush with (found {gemini_handler!r})"
        )

    def timed(signum: int, frame: Any) -> None:
        t0 = time.perf_counter()
        try:
            gemini_handler(signum, frame)
        finally:
            with open(os.path.join(args.out, "flush-rank0.txt"), "w") as f:
                f.write(str(time.perf_counter() - t0))

    signal.signal(signal.SIGTERM, timed)
    time.sleep(600)


def _shard_file(work: str, rank: int, step: int) -> str:
    pattern = os.path.join(work, f"node{rank}", "**", f"step-{step}", f"rank-{rank}.pt")
    found = glob.glob(pattern, recursive=True)
    if not found:
        raise FileNotFoundError(f"no shard file of rank {rank} at step {step} under {work}")
    return found[0]


def _restore(args: argparse.Namespace, rank: int) -> None:
    import torch.distributed as dist

    from snapstore.bench.peer_rank import check, expected_state, flip_byte, write_result

    manager = _manager(os.path.join(args.work, f"node{rank}"))
    dist.barrier()
    t0 = time.perf_counter()
    got = manager.load_tensors()
    seconds = time.perf_counter() - t0
    if got is None:
        raise RuntimeError("GEMINI found no checkpoint to recover (load_tensors returned None)")
    tensors, step, _ = got
    res: dict[str, Any] = {"rank": rank, "seconds": seconds, "step": step}
    res["check"] = check(list(tensors), expected_state(args.nbytes, rank, step))
    del tensors
    flush = os.path.join(args.out, "flush-rank0.txt")
    if rank == 0 and os.path.exists(flush):
        with open(flush) as f:
            res["flush_seconds"] = float(f.read())
    # Corruption: one byte in the middle of rank 1's recovered shard file.
    if rank == 1:
        path = _shard_file(args.work, 1, step)
        res["flipped"] = flip_byte(path, os.path.getsize(path) // 2)
    dist.barrier()
    try:
        again = manager.load_tensors()
    except Exception as e:
        outcome = f"raised {type(e).__name__}"
    else:
        if again is None:
            outcome = "detected: no checkpoint returned"
        else:
            t2, step2, _ = again
            ok = check(list(t2), expected_state(args.nbytes, rank, step2))["ok"]
            if step2 != step and ok:
                outcome = f"detected (checksum): fell back to step {step2}, bitwise OK"
            elif ok:
                outcome = "bitwise OK (the flipped byte was not read)"
            else:
                outcome = "wrong bytes returned silently"
    res["corruption"] = {"outcome": outcome}
    write_result(args.out, "restore", rank, res)
    manager.close()
    dist.destroy_process_group()


def rank_main(argv: Sequence[str]) -> int:
    from snapstore.bench.peer_rank import init_gloo, write_result

    parser = argparse.ArgumentParser(prog="peer_gemini rank")
    for name in ("--out", "--work"):
        parser.add_argument(name, required=True)
    parser.add_argument("--nbytes", type=int, required=True)
    parser.add_argument("--reps", type=int, required=True)
    args = parser.parse_args(argv)
    rank = int(os.environ["RANK"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    phase = "save" if restart == 0 else "restore"
    try:
        init_gloo()
        (_saves if restart == 0 else _restore)(args, rank)
    except Exception:
        write_result(args.out, phase, rank, {"rank": rank, "error": traceback.format_exc()})
        raise
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "rank":
        sys.exit(rank_main(sys.argv[2:]))
    sys.exit("usage: python -m snapstore.bench.peer_gemini rank --out DIR --work DIR ...")
