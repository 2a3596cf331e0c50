"""What an idle store costs: CPU per second of each of its processes, by node count.

``python -m bench.idle [--nodes 4,8] [--seconds 20] [--against DIR]`` starts
an embedded store (REST server included) with no job, lets it settle, and
samples the CPU time (user + system) of every process of the store over
``--seconds``: the coordinator, the SMPs, the raylets, the GCS, the REST
server, and Ray's own agents. Reported in milliseconds of CPU per second of
wall time, and the coordinator's growth per added node.

``--against DIR`` measures another checkout of snapstore (for example
today's main: ``git worktree add DIR main``) in the same run, one store at a
time, alternating, so both see the same machine: this file runs itself in
DIR with ``PYTHONPATH=DIR``, using only ``snapstore.up`` and
``snapstore.down``, which every version has.

This file must keep running as a plain script (``python bench/idle.py
--measure ...``) in an older checkout: it imports nothing of snapstore at
module level and nothing of ``snapstore.bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

CLASSES = ("coordinator", "smp", "raylet", "gcs", "rest", "ray agents", "other workers")


def _classify(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    if not cmdline:
        return "other workers"
    head = cmdline[0]
    if head.startswith("ray::Coordinator"):
        return "coordinator"
    if head.startswith("ray::SMP"):
        return "smp"
    if "gcs_server" in head:
        return "gcs"
    if head.endswith("/raylet") or "raylet/raylet" in head:
        return "raylet"
    if " -m server" in text or "snapstore.server" in text:
        return "rest"
    if "dashboard/agent.py" in text or "runtime_env/agent" in text or "log_monitor" in text:
        return "ray agents"
    return "other workers"


def _store_processes(rundir: str) -> dict[int, str]:
    """Every process of the store in ``rundir``: those naming it, and their descendants."""
    import psutil

    roots = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and any(rundir in a for a in p.info["cmdline"] or ()):
                roots.append(p)
    out: dict[int, str] = {}
    for p in roots:
        with contextlib.suppress(psutil.Error):
            out[p.pid] = _classify(p.cmdline())
            for c in p.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    out[c.pid] = _classify(c.cmdline())
    return out


def _cpu(pids: dict[int, str]) -> dict[int, float]:
    import psutil

    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
    return out


def measure(nodes: int, seconds: float, settle: float) -> dict[str, Any]:
    """Start a store of ``nodes`` worker nodes, sample its idle CPU, stop it."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import snapstore

    rundir = tempfile.mkdtemp(prefix="ss-idle-", dir="/tmp")
    try:
        snapstore.up(nodes=nodes, rundir=rundir, rest=True, rest_port=0, memory_per_node="64MiB")
        time.sleep(settle)
        pids = _store_processes(rundir)
        t0, c0 = time.monotonic(), _cpu(pids)
        time.sleep(seconds)
        t1, c1 = time.monotonic(), _cpu(pids)
        wall = t1 - t0
        per = dict.fromkeys(CLASSES, 0.0)
        count = dict.fromkeys(CLASSES, 0)
        for pid, kind in pids.items():
            if pid in c0 and pid in c1:
                per[kind] += (c1[pid] - c0[pid]) * 1000 / wall
                count[kind] += 1
        return {
            "nodes": nodes,
            "wall": wall,
            "ms_per_s": per,
            "processes": count,
            "total": sum(per.values()),
        }
    finally:
        with contextlib.suppress(Exception):
            snapstore.down(rundir=rundir)
        _kill_left(rundir)
        shutil.rmtree(rundir, ignore_errors=True)


def _kill_left(rundir: str) -> None:
    import psutil

    left = []
    for pid in _store_processes(rundir):
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            p.kill()
            left.append(p)
    psutil.wait_procs(left, timeout=10)


def _measure_elsewhere(checkout: str, nodes: int, seconds: float, settle: float) -> dict[str, Any]:
    """This file, run in another checkout of snapstore (its own ``snapstore`` package)."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    env = dict(os.environ, PYTHONPATH=checkout, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", str(nodes)]
    cmd += ["--seconds", str(seconds), "--settle", str(settle), "--out", path]
    try:
        subprocess.run(cmd, cwd=checkout, env=env, check=True, timeout=600)
        with open(path) as f:
            return dict(json.load(f))
    finally:
        os.unlink(path)


def _row(label: str, r: dict[str, Any]) -> str:
    cells = [f"{r['ms_per_s'][c]:.1f}" for c in CLASSES]
    return f"| {label} | {r['nodes']} | " + " | ".join(cells) + f" | **{r['total']:.1f}** |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", default="4,8", help="node counts, comma-separated [4,8]")
    p.add_argument("--seconds", type=float, default=20.0, help="sampling window [20]")
    p.add_argument("--settle", type=float, default=10.0, help="wait after up [10]")
    p.add_argument("--against", metavar="DIR", help="another snapstore checkout to measure too")
    p.add_argument("--quick", action="store_true", help="4 nodes, 5 s windows")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--measure", type=int, metavar="N", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        result = measure(args.measure, args.seconds, args.settle)
        with open(args.out, "w") as f:
            json.dump(result, f)
        return 0
    counts = [4] if args.quick else [int(x) for x in args.nodes.split(",") if x.strip()]
    seconds, settle = (5.0, 5.0) if args.quick else (args.seconds, args.settle)
    print(
        f"# bench.idle: {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; {seconds:.0f} s windows",
        flush=True,
    )
    results: dict[str, list[dict[str, Any]]] = {"this": []}
    if args.against:
        results["against"] = []
    for n in counts:
        results["this"].append(measure(n, seconds, settle))
        if args.against:
            results["against"].append(_measure_elsewhere(args.against, n, seconds, settle))
    print()
    print("idle store, ms of CPU per second")
    print()
    print("| store | nodes | " + " | ".join(CLASSES) + " | total |")
    print("| --- | ---: | " + " | ".join("---:" for _ in CLASSES) + " | ---: |")
    for label, rows in results.items():
        name = "this checkout" if label == "this" else "--against"
        for r in rows:
            print(_row(name, r))
    print()
    for label, rows in results.items():
        if len(rows) >= 2:
            a, b = rows[0], rows[-1]
            grow = (b["ms_per_s"]["coordinator"] - a["ms_per_s"]["coordinator"]) / (
                b["nodes"] - a["nodes"]
            )
            name = "this checkout" if label == "this" else "--against"
            print(f"{name}: coordinator grows {grow:.2f} ms/s per added node")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
