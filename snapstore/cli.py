"""The ``snapstore`` command: up, down, status, nodes, demo, bench.

The CLI is the one face of the project that may import every layer (it
starts the REST server and runs the demo from ``bench``); the rest of
``snapstore`` stays free of HTTP, clients and benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from snapstore.config import format_size, parse_size
from snapstore.errors import SnapstoreError

__all__ = ["main"]


def _cmd_up(args: argparse.Namespace) -> int:
    from snapstore.lifecycle import up

    store = up(
        nodes=args.nodes,
        k=args.k,
        m=args.m,
        memory_per_node=parse_size(args.memory_per_node) if args.memory_per_node else None,
        address=None if args.address in (None, "") else args.address,
        rundir=args.runtime_dir,
    )
    cfg = store.config
    where = "embedded cluster on 127.0.0.1" if store.embedded else f"Ray cluster {store.address}"
    print(f"snapstore {store.store_id} is up on the {where}")
    print(f"  Ray address:  {store.address}  (namespace {store.namespace})")
    print(f"  redundancy:   k={cfg.k} data + m={cfg.m} parity chunks per stripe")
    print(f"  state file:   {store.path}")
    print("  clients:      clients.Client(job, rank, world_size) finds it through the state file")
    server = store.state.get("server")
    if server:
        print(f"  REST/dashboard: {server['url']}")
        if server.get("token_generated"):
            print(f"  REST token:   {server['token']}  (shown once; also in the state file)")
    print("  stop it with: snapstore down")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    from snapstore.lifecycle import down

    report = down(rundir=args.runtime_dir)
    print(
        f"snapstore stopped: {report['actors']} actors removed, "
        f"{report['processes']} processes stopped"
    )
    return 0


def _cmd_nodes(args: argparse.Namespace) -> int:
    from snapstore.lifecycle import connect

    rows = connect(args.runtime_dir).nodes()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(
        f"{'node':14} {'address':15} {'status':8} {'beat':>6} {'group':>5} "
        f"{'used':>10} {'budget':>10}"
    )
    for n in rows:
        print(
            f"{n['node_id'][:12]:14} {n['address'] or '-':15} {n['status']:8} "
            f"{n['heartbeat_age']:6.2f} {n['group'] if n['group'] is not None else '-':>5} "
            f"{format_size(n['used']):>10} {format_size(n['budget']):>10}"
        )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from snapstore.lifecycle import connect

    store = connect(args.runtime_dir)
    snap = store.status(events=args.events)
    if args.json:
        snap["rest_url"] = (store.state.get("server") or {}).get("url")
        print(json.dumps(snap, indent=1, default=str))
        return 0
    print(f"store {snap['store_id']}  k={snap['config']['k']} m={snap['config']['m']}")
    _cmd_nodes(args)
    print()
    for j in snap["jobs"]:
        print(
            f"job {j['job']}: world size {j['world_size']}, latest step {j['latest_step']}, "
            f"{j['status']} {j['status_detail']}"
        )
    print()
    for e in snap["events"][-args.events :]:
        print(f"  {e['kind']:14} {e['message']}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snapstore", description=__doc__.splitlines()[0])
    p.add_argument("--runtime-dir", default=None, help="where the store's state file lives")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a store (embedded cluster, or attach with --address)")
    up.add_argument("--nodes", type=int, default=None, help="worker raylets to start [4]")
    up.add_argument("--k", type=int, default=None, help="data chunks per stripe [3]")
    up.add_argument("--m", type=int, default=None, help="parity chunks per stripe [1]")
    up.add_argument("--memory-per-node", default=None, help="SMP budget, e.g. 4GiB [auto]")
    up.add_argument("--address", default=None, help="attach to a Ray cluster: auto or HOST:PORT")
    up.set_defaults(func=_cmd_up)

    down = sub.add_parser("down", help="stop what `up` started")
    down.set_defaults(func=_cmd_down)

    nodes = sub.add_parser("nodes", help="list the store's nodes")
    nodes.add_argument("--json", action="store_true")
    nodes.set_defaults(func=_cmd_nodes)

    status = sub.add_parser("status", help="nodes, jobs, redundancy and recent events")
    status.add_argument("--json", action="store_true")
    status.add_argument("--events", type=int, default=10)
    status.set_defaults(func=_cmd_status)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    args = _parser().parse_args(argv)
    try:
        rc: Any = args.func(args)
    except SnapstoreError as e:
        print(f"snapstore: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("snapstore: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
