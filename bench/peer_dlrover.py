"""DLRover Flash Checkpoint under ``dlrover-run``: memory saves, storage, recovery, corruption.

Driver side (:func:`run`, in snapstore's environment) and rank side
(``python -m snapstore.bench.peer_dlrover rank ...``, in DLRover's own
environment, started by ``dlrover-run``).

How it runs, as DLRover's documentation says: a DLRover master (started
here as ``dlrover-run --standalone`` starts its local one, on 127.0.0.1) and
``dlrover-run --nproc-per-node=2``, an elastic agent that hosts the
checkpoint saver (it owns the shared memory, so it outlives a trainer) and
restarts failed trainers. Each rank holds a
different state (a shard: ``DdpCheckpointer(local_shard_num=2,
global_shard_num=2)``), as snapstore's ranks do.

1. Saves (restart count 0): ``save_checkpoint(step, state,
   storage_type=StorageType.MEMORY)`` timed until it returns: the copy into
   the agent's shared memory, which survives a trainer crash but not the
   node (no cross-node copy; ``replica_count`` backs shards up to other
   nodes' memory, and needs several nodes). Then ``StorageType.DISK``
   saves, timed until they return and until the agent's tracker file names
   the step (persisted to storage: protected against a node loss). Shared
   memory and anonymous memory of the agent's process tree are measured
   before the first save and after.
2. Crash: rank 1 SIGKILLs itself; the agent restarts both trainers, which
   ``load_checkpoint()`` from the agent's shared memory (timed, checked
   bitwise). Then rank 1 flips one byte of its shared-memory segment and
   both load again.
3. Node loss: the driver kills the whole ``dlrover-run`` (agent, master,
   trainers) and removes its shared memory; a new ``dlrover-run`` (the
   replacement node) loads from storage (timed, checked bitwise), then rank
   1 flips one byte of its checkpoint file and both load again. "Storage"
   is a local directory here, where a deployment uses shared storage.
"""

from __future__ import annotations

import argparse
import glob
import os
import signal
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Sequence
from typing import Any

from snapstore.bench.peer_launch import Launched, free_port, peer_env, wait_results

__all__ = ["run"]

WORLD = 2
WARMUP = 2
"""Memory saves before timing (the first allocates the shared memory)."""
TRACKER = "dlrover_latest.txt"
"""DLRover's tracker file in the checkpoint directory: the last step persisted."""


def _master(python: str, job: str, log: str) -> tuple[Launched, str]:
    """DLRover's master, started as ``dlrover-run --standalone`` would start it.

    (With torch 2.13, ``--standalone`` fails to start it itself: torch's
    ``SubprocessHandler`` gained an argument DLRover 0.6.1 does not pass.)
    """
    port = free_port()
    cmd = [
        python,
        "-u",
        "-m",
        "dlrover.python.master.main",
        f"--port={port}",
        "--node_num=1",
        f"--job_name={job}",
        "--platform=local",
    ]
    master = Launched(cmd, peer_env(), log)
    addr = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while master.alive() and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return master, addr
        except OSError:
            time.sleep(0.1)
    master.kill()
    raise RuntimeError(f"DLRover's master did not start on {addr} (see {log})")


def _launch(python: str, args: list[str], job: str, master: str, log: str) -> Launched:
    cmd = [
        python,
        "-m",
        "dlrover.trainer.torch.main",  # the `dlrover-run` entry point
        "--nnodes=1",
        f"--nproc-per-node={WORLD}",
        "--max-restarts=1",
        "--monitor-interval=0.2",
        "-m",
        "snapstore.bench.peer_dlrover",
        "rank",
        *args,
    ]
    return Launched(cmd, peer_env(ELASTIC_JOB_NAME=job, DLROVER_MASTER_ADDR=master), log)


def _drop_shm(job: str) -> None:
    """Remove the job's shared memory (a lost node's memory is gone with it)."""
    for path in glob.glob(f"/dev/shm/{job}_*"):
        os.unlink(path)


def run(
    python: str, nbytes: int, reps: int, workdir: str, log: str, timeout: float, storage: str
) -> dict:
    """Run DLRover's ranks: saves and a crash, then a replacement node; see bench.peers."""
    out = os.path.join(workdir, "out")
    os.makedirs(out)
    ckpt = os.path.join(storage, "ckpt")
    common = [f"--out={out}", f"--ckpt={ckpt}", f"--nbytes={nbytes}", f"--reps={reps}"]
    jobs = [f"ssb-dlrover-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    try:
        master, addr = _master(python, jobs[0], log)
        with master, _launch(python, [*common, "--mode=run"], jobs[0], addr, log) as job:
            save = wait_results(out, "save", range(WORLD), timeout, job)
            crash = wait_results(out, "restore", range(WORLD), timeout, job)
            # The node is lost: agent, master and trainers, and its memory.
        _drop_shm(jobs[0])
        master, addr = _master(python, jobs[1], log)
        with master, _launch(python, [*common, "--mode=replacement"], jobs[1], addr, log) as job:
            loss = wait_results(out, "loss", range(WORLD), timeout, job)
    finally:
        for j in jobs:
            _drop_shm(j)
    return {
        "returns": [x for r in save for x in r["returns"]],
        "protected": None,
        "storage": {
            "returns": [x for r in save for x in r["storage_returns"]],
            "protected": [x for r in save for x in r["storage_protected"]],
        },
        "memcpy": {r["rank"]: r["memcpy"] for r in save},
        "memory": {
            "bytes": save[0]["shm_after"] - save[0]["shm_before"],
            "anon": save[0]["anon_after"] - save[0]["anon_before"],
            "state": sum(r["state_bytes"] for r in save),
            "what": "the node's shared memory (the agent's), one copy per rank; "
            "nothing on other nodes",
        },
        "crash": {
            "seconds": crash[1]["seconds"],
            "ok": all(r["check"]["ok"] for r in crash),
            "path": "the agent's shared memory (tensors are views of it, not copies)",
        },
        "loss": {
            "seconds": loss[1]["seconds"],
            "ok": all(r["check"]["ok"] for r in loss),
            "path": "the last checkpoint persisted to storage (torch.load)",
        },
        "corruption": {
            "outcome": f"shared memory: {crash[1]['corruption']}; storage: {loss[1]['corruption']}",
        },
    }


# --- rank side (DLRover's environment) ---------------------------------------------------


def _checkpointer(ckpt: str) -> Any:
    from dlrover.trainer.torch.flash_checkpoint.ddp import DdpCheckpointer

    return DdpCheckpointer(ckpt, local_shard_num=WORLD, global_shard_num=WORLD)


def _shm_paths() -> list[str]:
    return glob.glob(f"/dev/shm/{os.environ['ELASTIC_JOB_NAME']}_ckpt_shm_*")


def _wait_persisted(ckpt: str, step: int, timeout: float = 300) -> None:
    path = os.path.join(ckpt, TRACKER)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                if f.read().strip() == str(step):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"DLRover did not persist step {step} in {timeout} s")
        time.sleep(0.005)


def _saves(args: argparse.Namespace, rank: int) -> None:
    import torch.distributed as dist
    from dlrover.trainer.torch.flash_checkpoint.checkpointer import StorageType

    from snapstore.bench._common import tensors_of
    from snapstore.bench.peer_rank import (
        file_bytes,
        memcpy_median,
        pss_anon,
        rank_state,
        step_state,
        tree_pids,
        write_result,
    )

    checkpointer = _checkpointer(args.ckpt)
    state = rank_state(args.nbytes, rank)
    nbytes = sum(t.numel() * t.element_size() for t in tensors_of(state))
    agent = os.getppid()
    dist.barrier()
    res: dict[str, Any] = {"rank": rank, "returns": [], "state_bytes": nbytes}
    res["shm_before"], res["anon_before"] = file_bytes(_shm_paths()), pss_anon(tree_pids(agent))
    step = 0
    for step in range(1, WARMUP + args.reps + 1):
        step_state(state, step)
        dist.barrier()
        t0 = time.perf_counter()
        checkpointer.save_checkpoint(step, state, storage_type=StorageType.MEMORY)
        if step > WARMUP:
            res["returns"].append(time.perf_counter() - t0)
    dist.barrier()
    res["shm_after"], res["anon_after"] = file_bytes(_shm_paths()), pss_anon(tree_pids(agent))
    res["storage_returns"], res["storage_protected"] = [], []
    for _ in range(args.storage_reps):
        step += 1
        step_state(state, step)
        dist.barrier()
        t0 = time.perf_counter()
        checkpointer.save_checkpoint(step, state, storage_type=StorageType.DISK)
        t1 = time.perf_counter()
        _wait_persisted(args.ckpt, step)
        res["storage_returns"].append(t1 - t0)
        res["storage_protected"].append(time.perf_counter() - t0)
    res["memcpy"] = memcpy_median(nbytes)
    res["last_step"] = step
    write_result(args.out, "save", rank, res)
    dist.barrier()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # a trainer crash; the agent restarts both
    time.sleep(600)


def _load_twice(args: argparse.Namespace, rank: int, flip: Any) -> dict[str, Any]:
    """Load (timed, checked), flip one byte with ``flip()`` on rank 1, load again."""
    import torch.distributed as dist

    from snapstore.bench.peer_rank import check, expected_state, flip_byte

    checkpointer = _checkpointer(args.ckpt)
    dist.barrier()
    t0 = time.perf_counter()
    state = checkpointer.load_checkpoint()
    seconds = time.perf_counter() - t0
    with open(os.path.join(args.ckpt, TRACKER)) as f:
        step = int(f.read().strip())
    expect = expected_state(args.nbytes, rank, step)
    res: dict[str, Any] = {"rank": rank, "seconds": seconds, "step": step}
    res["check"] = check(state, expect)
    del state
    if rank == 1:
        path = flip()
        res["flipped"] = flip_byte(path, os.path.getsize(path) // 2)
    dist.barrier()
    try:
        again = checkpointer.load_checkpoint()
    except Exception as e:
        outcome = f"raised {type(e).__name__}"
    else:
        if not again:
            outcome = "detected: nothing loaded"
        elif check(again, expect)["ok"]:
            outcome = "bitwise OK (the flipped byte was not read)"
        else:
            outcome = "wrong bytes returned silently"
    res["corruption"] = outcome
    return res


def _after_crash(args: argparse.Namespace, rank: int) -> None:
    from snapstore.bench.peer_rank import write_result

    def segment() -> str:
        return next(p for p in _shm_paths() if p.endswith(f"_ckpt_shm_{rank}"))

    write_result(args.out, "restore", rank, _load_twice(args, rank, segment))


def _replacement(args: argparse.Namespace, rank: int) -> None:
    from snapstore.bench.peer_rank import write_result

    def stored() -> str:
        with open(os.path.join(args.ckpt, TRACKER)) as f:
            step = f.read().strip()
        return os.path.join(args.ckpt, step, f"rank_{rank}.pt")

    write_result(args.out, "loss", rank, _load_twice(args, rank, stored))


def rank_main(argv: Sequence[str]) -> int:
    from snapstore.bench.peer_rank import init_gloo, write_result

    parser = argparse.ArgumentParser(prog="peer_dlrover rank")
    for name in ("--out", "--ckpt"):
        parser.add_argument(name, required=True)
    parser.add_argument("--nbytes", type=int, required=True)
    parser.add_argument("--reps", type=int, required=True)
    parser.add_argument("--storage-reps", type=int, default=2)
    parser.add_argument("--mode", choices=("run", "replacement"), required=True)
    args = parser.parse_args(argv)
    rank = int(os.environ["RANK"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if args.mode == "replacement":
        phase, fn = "loss", _replacement
    else:
        phase, fn = ("save", _saves) if restart == 0 else ("restore", _after_crash)
    try:
        init_gloo()
        fn(args, rank)
    except Exception:
        write_result(args.out, phase, rank, {"rank": rank, "error": traceback.format_exc()})
        raise
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "rank":
        sys.exit(rank_main(sys.argv[2:]))
    sys.exit("usage: python -m snapstore.bench.peer_dlrover rank --out DIR --ckpt DIR ...")
