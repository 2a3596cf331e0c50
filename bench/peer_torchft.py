"""torchft: a lost replica group recovers from a live one, with its lighthouse and torchrun.

Driver side (:func:`run`, in snapstore's environment) and replica side
(``python -m snapstore.bench.peer_torchft replica ...``, in torchft's own
environment, one torchrun per replica group), as torchft's README runs it:
``torchft_lighthouse --min_replicas 1 ...`` and, per replica group,
``TORCHFT_LIGHTHOUSE=... REPLICA_GROUP_ID=g torchrun --nproc_per_node 1 ...``.

torchft saves nothing: its protection is the other replica groups, which
hold the same state because they train the same model (data parallel). So
here both replica groups hold rank 0's state, and every step (quorum, a
one-element allreduce as DDP would make, ``should_commit``) changes every
tensor as the other peers' steps do. The quorum runs synchronously
(``use_async_quorum=False``), so a healing replica is healed when
``start_quorum`` returns: that call is the restore time, over torchft's
default checkpoint transport (HTTP, from the live replica's manager).

1. Crash: replica group 1 SIGKILLs itself after a few steps; its torchrun
   restarts it, and it heals from group 0 (timed, checked bitwise).
2. Node loss: the driver kills group 1's torchrun with everything below it
   and starts a new one (the replacement node); it heals from group 0.
3. Corruption: before that replacement heals, group 0 flips one byte of its
   live state (the only copy torchft has): the check shows whether the
   healed replica received it.
4. Memory: the anonymous memory of group 1's trainer (a whole replica, its
   state included), which is what torchft's protection costs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from snapstore.bench.peer_launch import Launched, free_port, peer_env, wait_results

__all__ = ["run"]

STEPS_BEFORE_CRASH = 4
TIMEOUT = timedelta(seconds=30)
"""torchft's timeouts (quorum, allreduce, checkpoint transfer)."""


def _replica(python: str, group: int, args: list[str], lighthouse: str, log: str) -> Launched:
    cmd = [
        python,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=1",
        "--max-restarts=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--monitor-interval=0.2",
        "-m",
        "snapstore.bench.peer_torchft",
        "replica",
        *args,
    ]
    env = peer_env(
        REPLICA_GROUP_ID=str(group),
        NUM_REPLICA_GROUPS="2",
        TORCHFT_LIGHTHOUSE=lighthouse,
        RUST_BACKTRACE="1",
    )
    return Launched(cmd, env, log)


def run(python: str, nbytes: int, workdir: str, log: str, timeout: float) -> dict:
    """Start a lighthouse and two replica groups; crash and replace group 1 (see bench.peers)."""
    out = os.path.join(workdir, "out")
    os.makedirs(out)
    port = free_port()
    lighthouse_bin = os.path.join(os.path.dirname(python), "torchft_lighthouse")
    lighthouse = [
        lighthouse_bin,
        "--min_replicas=1",
        "--quorum_tick_ms=100",
        "--join_timeout_ms=1000",
        "--heartbeat_timeout_ms=1000",
        f"--bind=127.0.0.1:{port}",
    ]
    addr = f"http://127.0.0.1:{port}"
    common = [f"--out={out}", f"--nbytes={nbytes}"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(Launched(lighthouse, peer_env(), log))
        g0 = stack.enter_context(_replica(python, 0, [*common, "--mode=live"], addr, log))
        g1 = stack.enter_context(_replica(python, 1, [*common, "--mode=crash"], addr, log))
        crash = wait_results(out, "crash", [1], timeout, g1)[0]
        g1.kill()  # the node is lost: its torchrun, its trainer, its memory
        with open(os.path.join(out, "flip"), "w"):
            pass
        flipped = wait_results(out, "flipped", [0], timeout, g0)[0]
        g1 = stack.enter_context(_replica(python, 1, [*common, "--mode=replacement"], addr, log))
        loss = wait_results(out, "loss", [1], timeout, g1)[0]
        with open(os.path.join(out, "stop"), "w"):
            pass
        live = wait_results(out, "live", [0], 60, g0)[0]
    wrong = loss["check"]["wrong"]
    aliases = flipped["paths"]
    passed_on = set(wrong) == set(aliases) and loss["check"]["wrong_bytes"] == len(aliases)
    return {
        "returns": None,
        "protected": None,
        "memcpy": {0: live["memcpy"], 1: crash["memcpy"]},
        "memory": {
            "bytes": crash["replica_anon"],
            "state": crash["state_bytes"],
            "what": "a whole replica group (its trainer's memory, the state included)",
        },
        "crash": {
            "seconds": crash["seconds"],
            "ok": crash["check"]["ok"],
            "step": crash["step"],
            "path": "healed from the live replica over HTTP (torchrun restarted the trainer)",
        },
        "loss": {
            "seconds": loss["seconds"],
            "ok": passed_on or loss["check"]["ok"],
            "step": loss["step"],
            "path": "healed from the live replica over HTTP (a new torchrun)",
        },
        "corruption": {
            "outcome": "wrong bytes passed on silently"
            if passed_on
            else ("bitwise OK" if loss["check"]["ok"] else f"other: {loss['check']}")
        },
        "steps": live["steps"],
    }


# --- replica side (torchft's environment) ------------------------------------------------


def _copy_into(state: Any, got: Any) -> None:
    """Copy a received state into the trainer's own tensors (as load_state_dict does)."""
    from snapstore.bench.peer_rank import leaves

    mine = leaves(state)
    for path, t in leaves(got).items():
        if path in mine:
            mine[path].copy_(t)


def _replica_main(args: argparse.Namespace) -> None:
    import torch
    from torchft import Manager, ProcessGroupGloo

    from snapstore.bench._common import tensors_of
    from snapstore.bench.peer_rank import (
        check,
        expected_state,
        memcpy_median,
        pss_anon,
        rank_state,
        step_state,
        write_result,
    )

    group = int(os.environ["REPLICA_GROUP_ID"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    state = rank_state(args.nbytes, 0)  # replicas of one data-parallel model
    nbytes = sum(t.numel() * t.element_size() for t in tensors_of(state))
    manager = Manager(
        pg=ProcessGroupGloo(timeout=TIMEOUT),
        load_state_dict=lambda sd: _copy_into(state, sd["state"]),
        state_dict=lambda: {"state": state},
        min_replica_size=1,
        replica_id=f"replica{group}",
        hostname="127.0.0.1",
        use_async_quorum=False,
        timeout=TIMEOUT,
        quorum_timeout=TIMEOUT,
        connect_timeout=TIMEOUT,
    )
    healing = group == 1 and (args.mode == "replacement" or restart > 0)
    phase = "loss" if args.mode == "replacement" else "crash"
    grad = torch.zeros(1)
    steps = 0
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        manager.start_quorum()
        healed = time.perf_counter() - t0
        if healing:
            step = manager.current_step()
            res = {
                "rank": 1,
                "seconds": healed,
                "step": step,
                "check": check(state, expected_state(args.nbytes, 0, step)),
                "state_bytes": nbytes,
                "replica_anon": pss_anon([os.getpid()]),
                "memcpy": memcpy_median(nbytes),
            }
            write_result(args.out, phase, 1, res)
            healing = False
        manager.allreduce(grad).wait()
        if manager.should_commit():
            step_state(state, manager.current_step())
            steps += 1
        if group == 1 and args.mode == "crash" and restart == 0 and steps >= STEPS_BEFORE_CRASH:
            os.kill(os.getpid(), signal.SIGKILL)  # a trainer crash; torchrun restarts it
        if group == 0:
            _live_controls(args, state, steps)
            if os.path.exists(os.path.join(args.out, "stop")):
                break
        time.sleep(0.05)  # the step's compute
    if group == 0:
        write_result(
            args.out, "live", 0, {"rank": 0, "steps": steps, "memcpy": memcpy_median(nbytes)}
        )
    manager.shutdown(wait=False)


def _live_controls(args: argparse.Namespace, state: Any, steps: int) -> None:
    """Group 0: flip one byte of the live state once the driver asks (``flip`` file)."""
    from snapstore.bench.peer_rank import leaves, write_result

    done = os.path.join(args.out, "flipped-rank0.json")
    if os.path.exists(done) or not os.path.exists(os.path.join(args.out, "flip")):
        return
    import torch

    every = leaves(state)
    t = max(every.values(), key=lambda x: x.numel())
    flat = t.view(-1).view(torch.uint8)
    at = flat.numel() // 2
    flat[at] = flat[at] ^ 0xFF
    # Tied tensors (the embedding and the head) are one storage under two paths.
    aliases = sorted(p for p, x in every.items() if x.data_ptr() == t.data_ptr())
    write_result(args.out, "flipped", 0, {"rank": 0, "paths": aliases, "byte": at, "steps": steps})


def replica_main(argv: Sequence[str]) -> int:
    from snapstore.bench.peer_rank import write_result

    parser = argparse.ArgumentParser(prog="peer_torchft replica")
    parser.add_argument("--out", required=True)
    parser.add_argument("--nbytes", type=int, required=True)
    parser.add_argument("--mode", choices=("live", "crash", "replacement"), required=True)
    args = parser.parse_args(argv)
    phase = {"live": "live", "crash": "crash", "replacement": "loss"}[args.mode]
    rank = 0 if args.mode == "live" else 1
    try:
        _replica_main(args)
    except Exception:
        write_result(args.out, phase, rank, {"rank": rank, "error": traceback.format_exc()})
        raise
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "replica":
        sys.exit(replica_main(sys.argv[2:]))
    sys.exit("usage: python -m snapstore.bench.peer_torchft replica --out DIR ...")
