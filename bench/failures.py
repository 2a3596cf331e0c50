"""Failure-injection benchmark: recovery across failure kinds, layouts and cluster sizes.

``python -m bench.failures`` (or ``snapstore bench``) trains the small GPT of
:mod:`snapstore.bench.gpt` with one rank per store node and injects, one run per
kind: a trainer crash, an SMP crash, a node loss, m simultaneous node losses,
and a corrupted chunk. It does so for each layout ``(k, m)``, node count and
per-rank state size asked for, and reports per run: per-step overhead
against training without snapshots, time to detect, to restart, to
restore, until training resumes, steps of work lost, bytes rebuilt, and
memory per node against the state size. Recovery time against node count
shows whether recovery stays flat as the cluster grows.

Baselines in the same run, same model and data: ``torch.save`` (with fsync)
to each node's local disk every N steps, and ``dcp.async_save`` to shared
storage every N steps. N is chosen so their amortised per-step stall equals
snapstore's per-step overhead measured in the same run: N = ceil(stall of
one checkpoint / snapstore's overhead per step). Reported: stall, time
until protected, restore (load) time, steps lost at the injected failure
step, and what survives each failure kind.

Writes a JSON file and a PNG with the results.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from snapstore.bench._common import private_store

__all__ = ["main"]

PROBE_EVERY = 4
"""Steps between checkpoints of a baseline's probe run."""

# What survives each failure kind, by where the checkpoint lives.
SURVIVES = {
    "snapstore": {
        "trainer": "yes (node memory)",
        "smp": "yes (re-adopted)",
        "node": "yes (parity)",
        "nodes": "yes, up to m per group",
        "corrupt": "yes (checksum, repaired)",
    },
    "torch": {
        "trainer": "yes (local disk)",
        "smp": "not affected",
        "node": "no: the node's disk is gone",
        "nodes": "no",
        "corrupt": "undetected (no checksums)",
    },
    "dcp": {
        "trainer": "yes (shared storage)",
        "smp": "not affected",
        "node": "yes (shared storage)",
        "nodes": "yes (shared storage)",
        "corrupt": "undetected (no checksums)",
    },
}


def _size(text: str) -> int:
    from snapstore.config import parse_size

    return parse_size(text, "size")


def _median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def _layouts(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        k, _, m = part.partition(":")
        out.append((int(k), int(m)))
    return out


def run_matrix(args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console

    from snapstore.bench.training import Failure, run

    console = Console()
    cfg: dict[str, Any] = {}
    kinds = [k for k in args.kinds.split(",") if k]
    results: dict[str, Any] = {"config": vars(args).copy(), "runs": [], "baselines": []}
    t_all = time.perf_counter()
    for size_text in args.sizes.split(","):
        ballast = _size(size_text)
        baselines_done = False
        for nodes in (int(n) for n in args.nodes.split(",")):
            for k, m in _layouts(args.km):
                if k + m > nodes:
                    continue
                label = f"{nodes} nodes k={k} m={m} state {size_text}/rank"
                with private_store(
                    prefix="ss-bench-",
                    nodes=nodes,
                    k=k,
                    m=m,
                    memory_per_node=max(256 << 20, 8 * (ballast + (8 << 20))),
                    reprotect_delay=1.0,
                ) as store:
                    console.print(f"[bold]{label}[/]")
                    none = run(
                        store,
                        f"none-{nodes}",
                        args.steps,
                        [],
                        cfg,
                        world=nodes,
                        snapshot=False,
                        ballast_bytes=ballast,
                    )
                    snap = run(
                        store,
                        f"snap-{nodes}",
                        args.steps,
                        [],
                        cfg,
                        world=nodes,
                        ballast_bytes=ballast,
                    )
                    used = snap.memory_used
                    overhead = (snap.step_seconds or 0) - (none.step_seconds or 0)
                    base = {
                        "nodes": nodes,
                        "k": k,
                        "m": m,
                        "state_bytes_per_rank": snap.state_bytes,
                        "ballast": ballast,
                        "step_none": none.step_seconds,
                        "step_snapshot": snap.step_seconds,
                        "overhead_per_step": overhead,
                        "memory_per_node_median": _median([float(u) for u in used]),
                    }
                    for kind in kinds:
                        f = Failure(kind, args.at, rank=1, count=m if kind == "nodes" else 1)
                        rep = run(
                            store,
                            f"{kind}-{nodes}-{k}{m}",
                            args.steps,
                            [f],
                            cfg,
                            world=nodes,
                            ballast_bytes=ballast,
                        )
                        row = dict(
                            base,
                            kind=kind,
                            equal_to_reference=rep.digests == snap.digests,
                            **{
                                key: getattr(f, key)
                                for key in (
                                    "detect_seconds",
                                    "store_detect_seconds",
                                    "restart_seconds",
                                    "restore_seconds",
                                    "downtime_seconds",
                                    "steps_lost",
                                    "bytes_rebuilt",
                                    "step_reached",
                                    "note",
                                )
                            },
                        )
                        results["runs"].append(row)
                        console.print(
                            f"  {kind:8} detect {_s(f.detect_seconds)} restart "
                            f"{_s(f.restart_seconds)} restore {_s(f.restore_seconds)} down "
                            f"{_s(f.downtime_seconds)} lost {f.steps_lost} rebuilt "
                            f"{f.bytes_rebuilt:,} B bitwise={row['equal_to_reference']}"
                        )
                    if not baselines_done and args.baselines:
                        results["baselines"].extend(
                            _baselines(store, args, cfg, nodes, ballast, overhead, console)
                        )
                        baselines_done = True
    results["seconds"] = time.perf_counter() - t_all
    return results


def _baselines(
    store: Any,
    args: argparse.Namespace,
    cfg: dict[str, Any],
    nodes: int,
    ballast: int,
    snap_overhead: float,
    console: Any,
) -> list[dict[str, Any]]:
    """torch.save / dcp.async_save every N steps, N matched to snapstore's overhead.

    A probe run (every PROBE_EVERY steps) measures one checkpoint's stall, which
    sets N; then the baseline runs every N steps. ``--quick`` reports the probe
    itself (a smoke run: N is computed and printed, but not run)."""
    from snapstore.bench.training import run

    out = []
    for kind in args.baselines.split(","):
        ckdir = tempfile.mkdtemp(prefix=f"ss-{kind}-", dir=args.checkpoint_dir)
        try:
            probe = run(
                store,
                f"probe-{kind}",
                min(args.steps, 12),
                [],
                cfg,
                world=nodes,
                snapshot=False,
                ballast_bytes=ballast,
                baseline={"kind": kind, "every": PROBE_EVERY, "dir": ckdir},
            )
            stall = (probe.baseline or {}).get("stall_median") or 0.0
            matched = min(max(1, math.ceil(stall / max(snap_overhead, 1e-3))), args.steps)
            # --quick: the probe's own numbers are the baseline's (every PROBE_EVERY).
            rep, every = probe, PROBE_EVERY
            if not args.quick:
                every = matched
                shutil.rmtree(ckdir, ignore_errors=True)
                rep = run(
                    store,
                    f"{kind}-{nodes}",
                    args.steps,
                    [],
                    cfg,
                    world=nodes,
                    snapshot=False,
                    ballast_bytes=ballast,
                    baseline={"kind": kind, "every": every, "dir": ckdir},
                )
        finally:
            shutil.rmtree(ckdir, ignore_errors=True)
        b = dict(rep.baseline or {})
        b.update(
            nodes=nodes,
            ballast=ballast,
            step_seconds=rep.step_seconds,
            matched_every=matched,
            steps_lost_at_failure=args.at - (args.at // every) * every,
            survives=SURVIVES[kind],
        )
        out.append(b)
        console.print(
            f"  baseline {kind}: every {every} steps, stall {_s(b.get('stall_median'))}, "
            f"protected after {_s(b.get('protected_median'))}, restore "
            f"{_s(b.get('restore_seconds'))}, {b['steps_lost_at_failure']} steps lost at step "
            f"{args.at}"
        )
    return out


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}s"


RUN_COLUMNS = (
    "nodes",
    "k,m",
    "state/rank",
    "failure",
    "detect",
    "restart",
    "restore",
    "training again after",
    "steps lost",
    "rebuilt",
    "overhead/step",
    "memory/node",
    "bitwise",
)
BASELINE_COLUMNS = (
    "baseline",
    "every N steps",
    "stall",
    "protected after",
    "restore",
    "steps lost at failure",
    "survives node loss",
    "survives corruption",
)


def _run_cells(r: dict[str, Any]) -> list[str]:
    return [
        str(r["nodes"]),
        f"{r['k']},{r['m']}",
        _mb(r["state_bytes_per_rank"]),
        r["kind"],
        _s(r["detect_seconds"]),
        _s(r["restart_seconds"]),
        _s(r["restore_seconds"]),
        _s(r["downtime_seconds"]),
        str(r["steps_lost"]),
        _mb(r["bytes_rebuilt"]),
        _ms(r["overhead_per_step"]),
        _mb(r["memory_per_node_median"]),
        "yes" if r["equal_to_reference"] else "NO",
    ]


def _baseline_cells(b: dict[str, Any]) -> list[str]:
    return [
        b["kind"],
        str(b["every"]),
        _s(b.get("stall_median")),
        _s(b.get("protected_median")),
        _s(b.get("restore_seconds")),
        str(b["steps_lost_at_failure"]),
        b["survives"]["node"],
        b["survives"]["corrupt"],
    ]


def print_tables(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))

    def show(title: str, columns: tuple[str, ...], rows: list[list[str]]) -> None:
        t = Table(title=title)
        for col in columns:
            t.add_column(col, justify="right", no_wrap=True)
        for row in rows:
            t.add_row(*row)
        console.print(t)

    show(
        "snapstore recovery (seconds; one rank per node)",
        RUN_COLUMNS,
        [_run_cells(r) for r in results["runs"]],
    )
    if results["baselines"]:
        show(
            "checkpoint baselines, same model and data",
            BASELINE_COLUMNS,
            [_baseline_cells(b) for b in results["baselines"]],
        )


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables (for the README)."""

    def table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
        head = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        return head + ["| " + " | ".join(row) + " |" for row in rows]

    lines = table(RUN_COLUMNS, [_run_cells(r) for r in results["runs"]])
    if results["baselines"]:
        lines += ["", *table(BASELINE_COLUMNS, [_baseline_cells(b) for b in results["baselines"]])]
    return "\n".join(lines) + "\n"


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}M"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}ms"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    by: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in results["runs"]:
        if r["downtime_seconds"] is None:
            continue
        key = (r["kind"], f"k={r['k']} m={r['m']}")
        by.setdefault(key, []).append((r["nodes"], r["downtime_seconds"]))
    for (kind, layout), pts in sorted(by.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{kind}, {layout}")
    ax.set_xlabel("store nodes (one rank per node)")
    ax.set_ylabel("seconds from failure to training again")
    ax.set_title("recovery time against cluster size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", default="4,6,8", help="store node counts [4,6,8]")
    p.add_argument("--km", default="3:1,2:2", help="layouts k:m [3:1,2:2]")
    p.add_argument("--sizes", default="16M", help="extra state per rank [16M]")
    p.add_argument("--kinds", default="trainer,smp,node,nodes,corrupt")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--at", type=int, default=20, help="step the failure is injected at")
    p.add_argument("--baselines", default="torch,dcp", help="torch,dcp or '' for none")
    p.add_argument("--checkpoint-dir", default=None, help="where baselines write [temp]")
    p.add_argument("--quick", action="store_true", help="a CI-sized run")
    p.add_argument("--out", default="snapstore-bench", help="directory for JSON and PNG")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.failures", description=__doc__.splitlines()[0]
    )
    add_arguments(p)
    args = p.parse_args(argv)
    return run_cli(args)


def run_cli(args: argparse.Namespace) -> int:
    if args.quick:
        # A smoke run of the benchmark's own code. One failure kind: every kind
        # recovers through the same bench.training path, and bench.chaos --quick
        # checks each kind (corrupt included) bitwise.
        args.nodes, args.km, args.sizes = "4", "3:1", "1M"
        args.kinds, args.steps, args.at, args.baselines = "node", 12, 6, "torch,dcp"
    results = run_matrix(args)
    print_tables(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "failures.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "failures.md").write_text(markdown(results))
    plot(results, out / "failures.png")
    print(f"results: {out / 'failures.json'} and {out / 'failures.md'}")
    print(f"figure: {out / 'failures.png'}")
    ok = all(r["equal_to_reference"] for r in results["runs"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
