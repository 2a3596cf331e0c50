"""The ``snapstore`` command: up, down, status, nodes, export, demo, bench, plan.

The CLI is the one face of the project that may import every layer (it
starts the REST server and runs the demo from ``snapstore.bench``); the rest of
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
    from snapstore.ops.lifecycle import up

    store = up(
        nodes=args.nodes,
        k=args.k,
        m=args.m,
        memory_per_node=parse_size(args.memory_per_node) if args.memory_per_node else None,
        address=None if args.address in (None, "") else args.address,
        rundir=args.runtime_dir,
        rest=not args.no_rest,
        rest_host=args.host,
        rest_port=args.port,
        rest_token=args.token or os.environ.get("SNAPSTORE_REST_TOKEN") or None,
        rest_allow_hosts=args.allow_host,
        allow_unauthenticated_ray=args.allow_unauthenticated_ray,
        persist_dir=args.persist_dir,
        persist_every=args.persist_every,
        persist_keep=args.persist_keep,
        persist_bandwidth=args.persist_bandwidth,
    )
    cfg = store.config
    where = "embedded cluster on 127.0.0.1" if store.embedded else f"Ray cluster {store.address}"
    print(f"snapstore {store.store_id} is up on the {where}")
    print(f"  Ray address:  {store.address}  (namespace {store.namespace})")
    print(f"  redundancy:   k={cfg.k} data + m={cfg.m} parity chunks per stripe")
    every = f"every {cfg.persist_every} steps" if cfg.persist_every else "on demand only"
    print(f"  persisted to: {cfg.persist_dir}  ({every}, last {cfg.persist_keep} kept)")
    print(f"  state file:   {store.path}")
    if store.ray_token_file:
        print(f"  Ray token:    {store.ray_token_file}  (token authentication on)")
    else:
        print("  WARNING:      the Ray cluster has no token authentication: anyone who reaches")
        print("                its ports can drive this store and read its snapshots")
    print("  clients:      clients.Client(job, rank, world_size) finds it through the state file")
    server = store.state.get("server")
    if server:
        print(f"  REST/dashboard: {server['url']}")
        if server.get("token_generated"):
            print(f"  REST token:   {server['token']}  (shown once; also in the state file)")
    print("  stop it with: snapstore down")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    from snapstore.ops.lifecycle import down

    report = down(rundir=args.runtime_dir)
    print(
        f"snapstore stopped: {report['actors']} actors removed, "
        f"{report['processes']} processes stopped"
    )
    if report["not_ours"]:
        pids = ", ".join(map(str, report["not_ours"]))
        print(f"  left alone: pids {pids} now belong to other processes than the ones recorded")
    return 0


def _cmd_nodes(args: argparse.Namespace) -> int:
    from snapstore.control.handle import connect
    from snapstore.server.views import build_view

    view = build_view(connect(args.runtime_dir).status(events=0))
    if args.json:
        print(json.dumps([n.model_dump(mode="json") for n in view.nodes], indent=1))
        return 0
    _print_nodes(view)
    return 0


def _print_nodes(view: Any) -> None:
    print(
        f"{'node':14} {'address':15} {'status':8} {'beat s':>6} {'group':>5} "
        f"{'used':>10} {'budget':>10} {'data':>10} {'parity':>10}"
    )
    for n in view.nodes:
        print(
            f"{n.node_id[:12]:14} {n.address or '-':15} {n.status:8} {n.heartbeat_age:6.2f} "
            f"{'-' if n.group is None else n.group:>5} {format_size(n.used_bytes):>10} "
            f"{format_size(n.budget_bytes):>10} {format_size(n.data_bytes):>10} "
            f"{format_size(n.parity_bytes):>10}"
        )


def _cmd_status(args: argparse.Namespace) -> int:
    """Nodes, jobs with their redundancy, recent events: what the REST API serves.

    The coordinator's snapshot goes through the REST server's own derivation
    (:func:`snapstore.server.views.build_view`), so this table and the API agree.
    """
    import time

    from snapstore.control.handle import connect
    from snapstore.server.views import build_view

    store = connect(args.runtime_dir)
    view = build_view(store.status(events=max(0, args.events)))
    server = store.state.get("server") or {}
    if args.json:
        out = {
            "store_id": view.store_id,
            "time": view.time,
            "config": dict(view.snapshot.get("config") or {}),
            "rest_url": server.get("url"),
            "rest_token_required": bool(server.get("token")),
            "nodes": [n.model_dump(mode="json") for n in view.nodes],
            "groups": view.groups,
            "jobs": [
                dict(
                    jv.job.model_dump(mode="json"),
                    snapshot=None if jv.committed is None else _jsonable(jv.committed),
                )
                for _, jv in sorted(view.jobs.items())
            ],
            "events": [e.model_dump(mode="json", exclude_none=True) for e in view.events],
        }
        print(json.dumps(out, indent=1))
        return 0
    cfg = view.snapshot.get("config") or {}
    print(
        f"store {view.store_id}  k={cfg.get('k')} m={cfg.get('m')}  "
        f"{len(view.alive)}/{len(view.nodes)} nodes alive  "
        f"REST {server.get('url') or 'not running'}"
    )
    print()
    _print_nodes(view)
    print()
    if not view.jobs:
        print("no jobs yet")
    else:
        print(
            f"{'job':20} {'world':>5} {'step':>8} {'status':12} {'can lose':>8} "
            f"{'stripes h/d/l':>13} {'pending':10} detail"
        )
    for name, jv in sorted(view.jobs.items()):
        j, r = jv.job, jv.job.redundancy
        print(
            f"{name[:20]:20} {j.world_size:>5} "
            f"{'-' if j.latest_step is None else j.latest_step:>8} {j.status:12} "
            f"{'-' if r is None else r.can_lose:>8} "
            f"{'-' if r is None else f'{r.healthy}/{r.degraded}/{r.lost}':>13} "
            f"{','.join(map(str, j.pending_steps)) or '-':10} {j.status_detail}"
        )
    if args.events > 0:
        print()
        print("recent events:")
        for e in view.events[-args.events :]:
            when = time.strftime("%H:%M:%S", time.localtime(e.time))
            print(f"  {when} {e.kind:16} {e.message}")
    return 0


def _jsonable(detail: dict[str, Any]) -> dict[str, Any]:
    from snapstore.server.models import SnapshotDetail

    env: dict[str, Any] = {
        "store_id": "",
        "snapshot_time": 0.0,
        "snapshot_age": 0.0,
        "stale": False,
    }
    full = SnapshotDetail(**env, **detail).model_dump(mode="json")
    return {k: v for k, v in full.items() if k not in env}


def _cmd_demo(args: argparse.Namespace) -> int:
    from snapstore.bench.demo import run_demo

    result = run_demo(args)
    return 0 if result["bitwise_equal"] else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from snapstore.bench.failures import run_cli

    return run_cli(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    from snapstore.ops.plan import format_plan, plan

    given = {
        "bandwidth_gbps": args.bandwidth,
        "horizon_hours": args.horizon,
        "weibull_shape": args.weibull_shape,
        "delta_fraction": args.delta_fraction,
        "memcpy_gbps": args.memcpy_rate,
        "tolerance": args.tolerance,
    }
    p = plan(
        args.nodes,
        args.gpus_per_node,
        args.state_per_gpu,
        args.node_mtbf,
        args.memory_budget,
        persisting=args.persisting,
        **{k: v for k, v in given.items() if v is not None},
    )
    print(json.dumps(p.to_dict(), indent=1) if args.json else format_plan(p, top=args.top))
    return 0


def _add_plan_parser(sub: Any) -> None:
    pl = sub.add_parser(
        "plan",
        help="choose k, m and stripe groups for a cluster: memory, time to protect, survival",
    )
    pl.add_argument("--nodes", type=int, required=True, help="store nodes (training hosts)")
    pl.add_argument("--gpus-per-node", type=int, required=True, help="ranks per node")
    pl.add_argument(
        "--state-per-gpu", required=True, help="bytes one rank stores (its DP share), e.g. 10GiB"
    )
    pl.add_argument(
        "--node-mtbf", type=float, required=True, help="mean hours between failures of a node"
    )
    pl.add_argument(
        "--memory-budget", required=True, help="host memory per node the store may use, e.g. 320GiB"
    )
    pl.add_argument(
        "--bandwidth", type=float, default=None, help="network GB/s per node, each way [12.5]"
    )
    pl.add_argument(
        "--horizon", type=float, default=None, help="hours the job must get through [720]"
    )
    pl.add_argument(
        "--weibull-shape",
        type=float,
        default=None,
        help="shape of node lifetimes, 0.5-10; 1 = exponential [1]",
    )
    pl.add_argument(
        "--delta-fraction",
        type=float,
        default=None,
        help="fraction of a rank's bytes changed per step, for XOR deltas' memory; above 0.5 "
        "no deltas are kept [0.5, the most they take]",
    )
    pl.add_argument(
        "--persisting", action="store_true", help="count one more slot per rank for flushes"
    )
    pl.add_argument(
        "--memcpy-rate", type=float, default=None, help="GB/s of one core's memcpy [14.3]"
    )
    pl.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="plans whose P(fallback) is within this of the safest tie [1e-6]",
    )
    pl.add_argument("--top", type=int, default=10, help="layouts to list [10]")
    pl.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    pl.set_defaults(func=_cmd_plan)


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
    up.add_argument("--host", default="127.0.0.1", help="REST server address [127.0.0.1]")
    up.add_argument("--port", type=int, default=8470, help="REST server port [8470]")
    up.add_argument(
        "--token",
        default=None,
        help="bearer token the REST server requires [$SNAPSTORE_REST_TOKEN; generated "
        "when --host is not loopback]",
    )
    up.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="REST server: also answer this Host header (repeat; '*': any) [the bound address]",
    )
    up.add_argument(
        "--allow-unauthenticated-ray",
        action="store_true",
        help="attach even to a Ray cluster without token authentication (anyone reaching its "
        "ports can then drive the store and read snapshots; see docs/operating.md, Security)",
    )
    up.add_argument("--no-rest", action="store_true", help="do not start the REST server")
    up.add_argument(
        "--persist-dir",
        default=None,
        help="directory or fsspec URL (s3://bucket/prefix ...) committed steps are flushed "
        "to [<runtime dir>/persist if the runtime dir is explicit, else "
        "$XDG_STATE_HOME/snapstore/persist]",
    )
    up.add_argument(
        "--persist-every",
        type=int,
        default=None,
        help="flush a job's step every this many steps; 0 = only on demand [100]",
    )
    up.add_argument(
        "--persist-keep", type=int, default=None, help="persisted steps kept per job [3]"
    )
    up.add_argument(
        "--persist-bandwidth",
        default=None,
        help="bytes/s each node may write while flushing, e.g. 128MiB; 0 = unlimited [256MiB]",
    )
    up.set_defaults(func=_cmd_up)

    from snapstore.bench.demo import add_arguments as demo_arguments

    demo = sub.add_parser(
        "demo", help="train a small GPT through injected failures on an embedded cluster"
    )
    demo_arguments(demo)
    demo.set_defaults(func=_cmd_demo)

    from snapstore.bench.failures import add_arguments as bench_arguments

    bench = sub.add_parser(
        "bench", help="failure-injection benchmark matrix with checkpoint baselines"
    )
    bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)

    down = sub.add_parser("down", help="stop what `up` started")
    down.set_defaults(func=_cmd_down)

    nodes = sub.add_parser("nodes", help="list the store's nodes")
    nodes.add_argument("--json", action="store_true", help="print JSON, as GET /v1/nodes")
    nodes.set_defaults(func=_cmd_nodes)

    status = sub.add_parser("status", help="nodes, jobs, redundancy and recent events")
    status.add_argument(
        "--json", action="store_true", help="print JSON (with the REST URL) instead of tables"
    )
    status.add_argument("--events", type=int, default=10, help="recent events to show [10]")
    status.set_defaults(func=_cmd_status)

    _add_plan_parser(sub)

    from snapstore.cli import export as cli_export

    cli_export.add_parser(sub)
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
