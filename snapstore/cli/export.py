"""``snapstore export``: a step of a job as plain PyTorch files (part of the CLI).

A CLI module: it may import ``snapstore.clients`` (to read a step in memory through
``Client.peek``) and torch. Reading a persisted step needs no running store.

Which step: ``--source memory`` reads the job's last committed step from
the running store; ``--source persisted`` the newest complete persisted
step whose files verify (or ``--step``); ``--source auto`` (default) reads
memory when a store runs and holds the wanted step, else the persist
directory.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Iterator
from typing import Any

from snapstore.errors import SnapshotNotFoundError, StoreNotRunningError

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write a persisted or in-memory step as torch.save files or a DCP checkpoint",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--job", required=True, help="job name")
    p.add_argument("--step", type=int, default=None, help="step to export [the newest]")
    p.add_argument("--to", required=True, help="new or empty directory to write into")
    p.add_argument(
        "--format",
        choices=("torch", "dcp"),
        default="torch",
        help="torch: rank-<r>.pt per rank (torch.load); dcp: one DCP checkpoint [torch]",
    )
    p.add_argument(
        "--source",
        choices=("auto", "memory", "persisted"),
        default="auto",
        help="where to read the step from [auto: memory if the running store has it]",
    )
    p.add_argument(
        "--persist-dir",
        default=None,
        help="persist directory or fsspec URL to read [the running store's, else the default one]",
    )
    p.add_argument(
        "--node",
        default=None,
        help="memory: read every rank through this store node's SMP (a node on this host) "
        "[each rank's home node]",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per rank read [120]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from snapstore.config import check_job_name
    from snapstore.control.handle import connect, default_persist_dir
    from snapstore.ops.export import export_states, persisted_states, persisted_step

    # A job name is a path component under the persist root: "/etc" or ".." must not escape it.
    check_job_name(args.job)
    store = None
    if args.source in ("auto", "memory"):
        try:
            store = connect(args.runtime_dir)
            latest = store.call("latest", args.job)
        except StoreNotRunningError:
            if args.source == "memory":
                raise
            store, latest = None, None
        if store is not None and latest is not None and args.step in (None, latest):
            with _MemoryStates(store, args.job, args.node, args.timeout) as (step, states):
                info = {"job": args.job, "step": step, "source": "memory"}
                summary = _export(export_states, states, args, info)
            _report(summary, args.to)
            return 0
        if args.source == "memory":
            raise SnapshotNotFoundError(
                f"job {args.job!r} has no committed step"
                + ("" if args.step is None else f" {args.step}")
                + " in the running store's memory"
            )
    root = args.persist_dir or (
        store.config.persist_dir if store is not None else default_persist_dir(args.runtime_dir)
    )
    man, path, skipped = persisted_step(root, args.job, args.step)
    for s in skipped:
        print(f"skipped persisted step {s['step']}: {s['reason']}")
    info = {"job": args.job, "step": man.step, "source": "persisted", "path": path}
    summary = _export(export_states, persisted_states(path, man), args, info)
    _report(summary, args.to)
    return 0


def _export(export_states: Any, states: Any, args: argparse.Namespace, info: Any) -> Any:
    with warnings.catch_warnings():
        # DCP without a process group says it assumes one process: that is the intent.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return export_states(states, args.to, args.format, info)


def _report(summary: dict[str, Any], to: str) -> None:
    print(
        f"exported job {summary['job']!r} step {summary['step']} ({summary['source']}, "
        f"{len(summary['ranks'])} ranks) as {summary['format']} into {os.path.abspath(to)}"
    )
    for r, paths in sorted(summary["converted_numpy"].items()):
        print(f"  rank {r}: numpy values written as tensors: {', '.join(paths)}")


class _MemoryStates:
    """``(step, states)`` of the job's last committed step, read through clients; closes them."""

    def __init__(self, store: Any, job: str, node: str | None, timeout: float) -> None:
        from snapstore.format.record import StepRecord

        data = store.call("record", job)
        if data is None:
            raise SnapshotNotFoundError(f"job {job!r} has no committed step in memory")
        self.record = StepRecord.from_bytes(data)
        self.store, self.job, self.node, self.timeout = store, job, node, timeout
        self.alive = [n["node_id"] for n in store.nodes() if n["alive"]]
        self.clients: dict[str, Any] = {}

    def __enter__(self) -> tuple[int, Iterator[tuple[int, Any]]]:
        return self.record.step, self._states()

    def __exit__(self, *exc: object) -> None:
        for c in self.clients.values():
            c.close()

    def _client(self, node: str) -> Any:
        from snapstore.clients import Client

        if node not in self.clients:
            self.clients[node] = Client(
                self.job,
                0,
                self.record.world_size,
                store=self.store,
                node_id=node,
                timeout=self.timeout,
            )
        return self.clients[node]

    def _states(self) -> Iterator[tuple[int, Any]]:
        for r, e in sorted(self.record.ranks.items()):
            node = self.node or (
                e.node if e.node in self.alive or not self.alive else self.alive[0]
            )
            step, state = self._client(node).peek(r, copy=True)
            if step != self.record.step:
                raise SnapshotNotFoundError(
                    f"job {self.job!r} moved on from step {self.record.step} to {step} during "
                    "the export; export again (or export a persisted step)"
                )
            yield r, state
