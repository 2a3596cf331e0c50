"""Per-step deltas: a frozen backbone with 10% of its tensors changing moves few bytes.

Run: ``python -m bench.delta``; ``--quick`` for a smoke run on small
states; ``--json FILE`` writes every sample. Prints markdown tables
(docs/performance-store.md quotes them).

Four ranks, one client each in this process pinned to its own node of an
embedded 4-node store (k = 3, m = 1). Each rank's state is a LoRA-like
one: ``--tensors`` equal-sized tensors (default 200 of 256 KiB: 50 MiB)
of which the same 10% change every step (written in place, as an optimizer
step writes adapters and their moments) and 90% never change (the frozen
backbone), plus a step counter. Per step and rank the client reports the
bytes it copied (``stats["bytes_copied"]``); the commit reports the parity
bytes that crossed nodes (``stats["peer_bytes"]``: parity holders reading
data or XOR deltas from other nodes) and whether parity was updated from
deltas (``stats["delta"]``).

The same states and the same changes are saved by a second job whose
clients have ``deltas=False``: what a full snapshot moves (every byte
staged, and m x the data bytes read by parity holders), measured in the
same run. The fraction is (copied + peer bytes) with deltas over the same
sum without. After the delta steps a node is killed and its rank restored
on another node from the parity built from deltas, bitwise.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from snapstore.bench._common import (
    Table,
    bench_header,
    bench_parser,
    human,
    median,
    private_store,
    state_digest,
    write_json,
)

WORLD = 4
CHANGING = 0.10


def make_state(rank: int, tensors: int, tensor_bytes: int) -> dict[str, Any]:
    """A frozen backbone and adapters: equal-sized fp32 tensors, values a function of rank."""
    import torch

    g = torch.Generator().manual_seed(rank)
    n = tensor_bytes // 4
    return {
        "layers": {f"t{i:03d}": torch.randn(n, generator=g) for i in range(tensors)},
        "step": 0,
    }


def changing(tensors: int, rank: int) -> list[str]:
    """The tensors that change every step: the same 10% each step, spread over the state."""
    count = max(1, round(tensors * CHANGING))
    stride = tensors // count
    return [f"t{(rank + i * stride) % tensors:03d}" for i in range(count)]


def step_states(states: list[dict[str, Any]], names: list[list[str]], step: int) -> None:
    import torch

    with torch.no_grad():
        for st, ns in zip(states, names, strict=True):
            for n in ns:
                st["layers"][n].add_(1.0)
            st["step"] = step


def run_job(
    store: Any, nodes: list[str], job: str, deltas: bool, steps: int, tensors: int, tbytes: int
) -> tuple[list[dict[str, Any]], list[Any], list[dict[str, Any]]]:
    """Save ``steps`` steps of every rank; per-step stats. Returns (rows, clients, states)."""
    from snapstore.clients import Client

    states = [make_state(r, tensors, tbytes) for r in range(WORLD)]
    names = [changing(tensors, r) for r in range(WORLD)]
    clients = [
        Client(job, r, WORLD, store=store, node_id=nodes[r], timeout=300, deltas=deltas)
        for r in range(WORLD)
    ]
    rows = []
    for step in range(steps):
        if step:
            step_states(states, names, step)
        futs = [c.save(step, st) for c, st in zip(clients, states, strict=True)]
        for f in futs:
            f.result()
        rows.append(
            {
                "step": step,
                "bytes_total": sum(f.stats["bytes_total"] for f in futs),
                "bytes_copied": sum(f.stats["bytes_copied"] for f in futs),
                # Per step, from the commit: the same for every rank's future.
                "peer_bytes": int(futs[0].stats.get("peer_bytes", 0)),
                "delta": bool(futs[0].stats.get("delta")),
                "delta_bytes": futs[0].stats.get("delta_bytes"),
                "commit_seconds": max(f.stats.get("commit_seconds", 0.0) for f in futs),
            }
        )
    return rows, clients, states


def verify_after_loss(
    store: Any, nodes: list[str], job: str, states: list[dict[str, Any]], step: int
) -> dict[str, Any]:
    """Kill the node of rank 1; once the store noticed, restore rank 1 on rank 2's node
    (as a restarted trainer would); compare bitwise."""
    import time

    from snapstore.bench._common import wait_node_dead
    from snapstore.clients import Client
    from snapstore.ops import faults

    t_kill = faults.kill_node(nodes[1], store)["killed_at"]
    wait_node_dead(store, nodes[1], t_kill, 60, "the store to see the killed node dead")
    client = Client(job, 1, WORLD, store=store, node_id=nodes[2], timeout=300)
    try:
        t0 = time.perf_counter()
        got_step, got = client.restore()
        seconds = time.perf_counter() - t0
        ok = got_step == step and state_digest(got) == state_digest(states[1])
    finally:
        client.close()
    return {"ok": ok, "step": got_step, "expected_step": step, "seconds": seconds}


def tables(full: list[dict[str, Any]], delta: list[dict[str, Any]], steady: int) -> list[Table]:
    per_step = Table(
        "Per step, all 4 ranks together (step 0 is the first, full snapshot of each job):",
        [
            "step",
            "full: copied",
            "full: peer bytes",
            "deltas: copied",
            "deltas: peer bytes",
            "parity from deltas",
            "deltas / full",
        ],
    )
    for f, d in zip(full, delta, strict=True):
        moved_full = f["bytes_copied"] + f["peer_bytes"]
        moved = d["bytes_copied"] + d["peer_bytes"]
        per_step.add(
            d["step"],
            human(f["bytes_copied"]),
            human(f["peer_bytes"]),
            human(d["bytes_copied"]),
            human(d["peer_bytes"]),
            "yes" if d["delta"] else "no",
            f"{moved / moved_full * 100:.1f}%",
        )
    s_full = full[steady:]
    s_delta = delta[steady:]
    moved_full = median([f["bytes_copied"] + f["peer_bytes"] for f in s_full])
    moved = median([d["bytes_copied"] + d["peer_bytes"] for d in s_delta])
    summary = Table(
        f"Steady state (steps {steady}-{len(delta) - 1}, medians, 4 ranks together):",
        ["", "copied by clients", "peer bytes (parity)", "moved", "fraction of full"],
    )
    summary.add(
        "full snapshot (deltas=False)",
        human(median([f["bytes_copied"] for f in s_full])),
        human(median([f["peer_bytes"] for f in s_full])),
        human(moved_full),
        "100%",
    )
    summary.add(
        "with deltas",
        human(median([d["bytes_copied"] for d in s_delta])),
        human(median([d["peer_bytes"] for d in s_delta])),
        human(moved),
        f"{moved / moved_full * 100:.1f}%",
    )
    return [summary, per_step]


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("delta", __doc__, "small states, few steps")
    parser.add_argument("--tensors", type=int, default=200, help="tensors per rank (200)")
    parser.add_argument("--tensor-kib", type=int, default=256, help="KiB per tensor (256)")
    parser.add_argument("--steps", type=int, default=10, help="steps per job (10)")
    args = parser.parse_args(argv)
    tensors = 40 if args.quick else max(10, args.tensors)
    tbytes = (16 if args.quick else args.tensor_kib) << 10
    steps = 5 if args.quick else max(5, args.steps)
    steady = 3
    per_rank = tensors * tbytes
    info = bench_header(
        "snapstore.bench.delta",
        f"{WORLD} ranks x {tensors} tensors of {human(tbytes)} ({human(per_rank)} per rank), "
        f"{round(tensors * CHANGING)} change per step; store: 4 nodes, k=3, m=1",
    )
    budget = 6 * per_rank + (64 << 20)
    # A longer failure timeout keeps late heartbeats on a loaded machine from
    # aborting saves (detection is bench.restore's business).
    with private_store(nodes=WORLD, k=3, m=1, memory_per_node=budget, failure_timeout=5.0) as store:
        from snapstore.ops import faults

        nodes = faults.store_nodes(store)[:WORLD]
        full, fclients, _ = run_job(store, nodes, "full", False, steps, tensors, tbytes)
        for c in fclients:
            c.close()
        store.call("drop_job", "full", timeout=60)
        delta, clients, states = run_job(store, nodes, "delta", True, steps, tensors, tbytes)
        for c in clients:
            c.close()
        check = verify_after_loss(store, nodes, "delta", states, steps - 1)
    out = tables(full, delta, steady)
    for t in out:
        t.print()
    print(
        f"After the delta steps, node of rank 1 killed, rank 1 restored on another node in "
        f"{check['seconds']:.3f} s: step {check['step']}, bitwise "
        f"{'OK' if check['ok'] else 'MISMATCH'}"
    )
    write_json(
        args.json,
        {
            "info": info,
            "full": full,
            "delta": delta,
            "restore_after_loss": check,
            "tables": [t.as_dict() for t in out],
        },
    )
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
