"""``snapstore demo``: train through failures, resume bitwise, show what recovery cost.

1. Starts an embedded store (a Ray head and 4 worker raylets on 127.0.0.1,
   k=3, m=1) in a private runtime directory.
2. Trains a small GPT with data parallelism over gloo, one rank per node, a
   snapshot every step, and no failures: the reference (cached on disk for
   an identical configuration and code, so a second demo skips it).
3. Trains it again from scratch, killing a trainer process, an SMP, and a
   whole node (its ranks restart on a replacement node). Each time the job
   restores the last committed step from the store and trains on.
4. Checks that the final model and optimizer state are bitwise equal to the
   reference, prints a table per failure, writes a JSON report and a PNG
   (loss curves with failure markers, and a recovery timeline).

It prints only its own report: Ray's messages about the processes and the
node it kills on purpose go to ``<out>/cluster-messages.log``.

Everything it starts it stops, also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from snapstore.bench._common import cluster_messages_to, private_store

__all__ = ["main", "parse_failures"]

DEFAULT_FAILURES = "trainer@60,smp@110,node@160"


def parse_failures(text: str, world: int) -> list[Any]:
    """``"trainer@60,smp@110,node@160"`` -> Failures (ranks chosen so each hits another node)."""
    from snapstore.bench.training import Failure

    out = []
    for i, part in enumerate(p for p in text.split(",") if p.strip()):
        kind, _, at = part.strip().partition("@")
        if kind not in ("trainer", "smp", "node") or not at.isdigit():
            raise SystemExit(f"bad failure {part!r}: use trainer@STEP, smp@STEP or node@STEP")
        out.append(Failure(kind, int(at), rank=1 + i % max(1, world - 1)))
    return out


def _cache_key(cfg: dict[str, Any], steps: int, world: int) -> str:
    """Reference results depend on the model code, the data and the settings."""
    from snapstore.bench import gpt, training

    h = hashlib.sha256()
    for mod in (gpt, training):
        h.update(Path(mod.__file__ or "").read_bytes())
    h.update(json.dumps([cfg, steps, world], sort_keys=True).encode())
    import torch

    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "snapstore"


def _progress(console: Any, total: int, label: str) -> tuple[Any, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        transient=False,
    )
    task = progress.add_task(label, total=total, note="")
    return progress, task


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console

    from snapstore.bench.training import RunReport, run

    # A terminal sets its own width; piped output (a log, CI) gets room for the table.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    cfg: dict[str, Any] = {}
    world = args.nodes
    failures = parse_failures(args.failures, world)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    console.print(
        f"[bold]snapstore demo[/]: {world} nodes on 127.0.0.1, k={args.k} m={args.m}, "
        f"{args.steps} steps of a small GPT ({world}-way data parallel over gloo), "
        f"failures: {args.failures}"
    )
    # Ray reports the deaths the demo causes on purpose; they go to a log, the
    # terminal shows the demo's own report.
    messages = out / "cluster-messages.log"
    messages.write_text("")
    console.print(f"Ray's and the store's own messages about the injected failures: {messages}")
    with (
        cluster_messages_to(str(messages)),
        private_store(
            prefix="ss-demo-",
            nodes=args.nodes,
            k=args.k,
            m=args.m,
            memory_per_node="512MiB",
            reprotect_delay=1.0,
        ) as store,
    ):
        key = _cache_key(cfg, args.steps, world)
        cache = _cache_dir() / f"demo-reference-{key}.json"
        reference: dict[str, Any] | None = None
        if cache.exists() and not args.fresh_reference:
            with contextlib.suppress(OSError, ValueError):
                reference = json.loads(cache.read_text())
                console.print(f"reference run: cached ({cache})")
        if reference is None:
            progress, task = _progress(console, args.steps, "reference (no failures)")
            with progress:
                ref = run(
                    store,
                    "demo-reference",
                    args.steps,
                    [],
                    cfg,
                    world=world,
                    on_progress=lambda s, m: progress.update(task, completed=s, note=m),
                )
                progress.update(task, completed=args.steps)
            reference = ref.to_dict()
            with contextlib.suppress(OSError):
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(reference))

        progress, task = _progress(console, args.steps, "with failures")
        with progress:
            report: RunReport = run(
                store,
                "demo",
                args.steps,
                failures,
                cfg,
                world=world,
                on_progress=lambda s, m: progress.update(
                    task, completed=s, note=m or progress.tasks[0].fields.get("note", "")
                ),
            )
            progress.update(task, completed=args.steps, note="done")
        equal = report.digests == reference["digests"]
        result = {
            "config": {
                "nodes": args.nodes,
                "k": args.k,
                "m": args.m,
                "steps": args.steps,
                "world": world,
                "model": cfg,
                "failures": args.failures,
            },
            "bitwise_equal": equal,
            "reference": reference,
            "run": report.to_dict(),
            "seconds": time.perf_counter() - t_all,
        }
        _print_table(console, report)
        verdict = (
            "[bold green]final model and optimizer state are bitwise equal to the run "
            "without failures[/]"
            if equal
            else "[bold red]final state DIFFERS from the run without failures[/]"
        )
        console.print(verdict)
        json_path = out / "demo-report.json"
        json_path.write_text(json.dumps(result, indent=1, default=str))
        png_path = out / "demo-report.png"
        _plot(result, png_path)
        console.print(f"report: {json_path}\nfigure: {png_path}")
        console.print(f"demo took {time.perf_counter() - t_all:.0f} s")
        return result


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _bytes(n: int) -> str:
    from snapstore.config import format_size

    return format_size(n) if n else "0"


def _print_table(console: Any, report: Any) -> None:
    from rich.table import Table

    t = Table(title="failures and recoveries (seconds)")
    heads = ("kind", "step", "detect", "store", "restart", "restore", "lost", "rebuilt", "down")
    for col in heads:
        t.add_column(col, justify="left" if col == "kind" else "right", no_wrap=True)
    for f in report.failures:
        t.add_row(
            f.kind,
            str(f.step_reached),
            _fmt(f.detect_seconds),
            _fmt(f.store_detect_seconds),
            _fmt(f.restart_seconds),
            _fmt(f.restore_seconds),
            f"{f.steps_lost} st",
            _bytes(f.bytes_rebuilt),
            _fmt(f.downtime_seconds),
        )
    console.print(t)
    console.print(
        "detect: failure to the job noticing it; store: failure to the store's own "
        "detection (heartbeats); restart: replacement process up (on a replacement node "
        "for a node loss) and the group re-formed; restore: every rank back at the last "
        "committed step; lost: steps trained again; down: failure to training again"
    )
    for f in report.failures:
        if f.note:
            console.print(f"  {f.kind}: {f.note}")
    console.print(
        f"steady step time {_fmt(report.step_seconds)} per rank, snapshot of "
        f"{report.state_bytes:,} bytes per rank every step (replicated state stored once "
        "across the data-parallel ranks)"
    )


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), gridspec_kw={"height_ratios": [3, 2]})
    for label, losses, style in (
        ("no failures", result["reference"]["losses"], "-"),
        ("with failures", result["run"]["losses"], "--"),
    ):
        steps = sorted(int(s) for s in losses)
        ax1.plot(steps, [losses[str(s)] for s in steps], style, label=label)
    colors = {"trainer": "tab:orange", "smp": "tab:green", "node": "tab:red"}
    for f in result["run"]["failures"]:
        ax1.axvline(f["step_reached"], color=colors[f["kind"]], alpha=0.6)
        ax1.text(
            f["step_reached"],
            ax1.get_ylim()[1] * 0.95,
            f" {f['kind']}",
            rotation=90,
            va="top",
            color=colors[f["kind"]],
        )
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (rank 0)")
    ax1.set_title(
        "training through failures: "
        + ("bitwise equal to the run without failures" if result["bitwise_equal"] else "DIFFERS")
    )
    ax1.legend()
    phases = [
        ("detect", "detect_seconds"),
        ("restart", "restart_seconds"),
        ("restore", "restore_seconds"),
    ]
    fails = result["run"]["failures"]
    for i, f in enumerate(fails):
        left = 0.0
        for j, (name, key) in enumerate(phases):
            width = f.get(key) or 0.0
            ax2.barh(i, width, left=left, color=f"C{j}", label=name if i == 0 else None)
            left += width
    ax2.set_yticks(range(len(fails)), [f"{f['kind']} @ {f['step_reached']}" for f in fails])
    ax2.set_xlabel("seconds from failure to training again")
    ax2.set_title("recovery timeline")
    ax2.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=4, help="store nodes = data-parallel ranks [4]")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument(
        "--failures",
        default=DEFAULT_FAILURES,
        help=f"kind@step list: trainer, smp, node [{DEFAULT_FAILURES}]",
    )
    p.add_argument("--out", default="snapstore-demo", help="directory for the report and figure")
    p.add_argument(
        "--fresh-reference",
        action="store_true",
        help="run the reference again even if a cached one exists",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="snapstore demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    result = run_demo(args)
    return 0 if result["bitwise_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
