"""Chaos soak: train on the loopback store while random faults land; end bitwise equal.

``python -m bench.chaos --faults N [--seed S]`` is the real-cluster
counterpart of the deterministic simulation (``python -m tests.sim``). It
trains the small GPT of :mod:`snapstore.bench.gpt` with 4 data-parallel
ranks over gloo (one per store node, a snapshot every step) twice: once
without faults (the reference; cached on disk for the same code and settings,
see :mod:`snapstore.bench.reference`), once while N faults drawn from the
seed land at random steps on random ranks:

- ``trainer``: SIGKILL of a rank's process;
- ``smp``: SIGKILL of a node's SMP (Ray restarts it; it re-adopts its memory);
- ``node``: SIGKILL of a whole node (raylet and everything on it, its shared
  memory removed); the rank restarts on a replacement node;
- ``corrupt``: a byte of a rank's committed snapshot flipped, and its trainer
  killed, so the restore must find and repair it;
- ``stall``: a node's SMP frozen with SIGSTOP for 1.5-4 s (a healthy node
  that stops answering); nothing is restarted.

The job controller is :func:`snapstore.bench.training.run` (what torchrun or
Ray Train would do: restart what died, every rank restores). The run must
end with parameters and optimizer state bitwise equal to the reference.

Reported: faults injected by kind, steps trained again, saves that failed,
false detections (a node declared dead or lost that nothing killed), mere
suspicions (a node reported silent that was not stalled or killed: logged,
never acted on), and per kind the time from the fault to training again
(median, max). Exit status 1 when the final state differs.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from dataclasses import asdict
from typing import Any

from snapstore.bench import reference as cached
from snapstore.bench._common import (
    Table,
    bench_header,
    bench_parser,
    median,
    private_store,
    report,
    store_events,
)
from snapstore.bench.training import Failure, RunReport, run

__all__ = ["draw_faults", "false_detections", "main", "quick_faults", "steps_for"]

KIND_WEIGHTS = {"trainer": 3, "smp": 2, "node": 2, "corrupt": 1, "stall": 2}
QUICK_KINDS = ("stall", "smp", "node", "corrupt")
"""--quick: one fault of each kind but ``trainer``, whose path (a killed trainer restarts and
restores) a ``corrupt`` fault takes too, and the demo's test takes on its own."""
WORLD = 4
FIRST_AT = 4
"""No fault before this step: the job has committed a few steps."""
KILLS = ("smp", "node", "corrupt")
"""Faults whose node may rightly be reported dead (an SMP or a node killed)."""


def draw_faults(n: int, seed: int, gap: tuple[int, int] = (4, 9)) -> list[Failure]:
    """``n`` faults from ``seed``: kinds by KIND_WEIGHTS, ranks and gaps uniform."""
    rng = random.Random(seed)
    kinds = list(KIND_WEIGHTS)
    weights = [KIND_WEIGHTS[k] for k in kinds]
    out, at = [], FIRST_AT
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        f = Failure(kind, at, rank=rng.randrange(WORLD))
        if kind == "stall":
            f.seconds = round(rng.uniform(1.5, 4.0), 2)
        out.append(f)
        at += rng.randint(*gap)
    return out


def quick_faults() -> list[Failure]:
    """One of each kind, on different ranks."""
    out = []
    for i, kind in enumerate(QUICK_KINDS):
        f = Failure(kind, FIRST_AT + 5 * i, rank=1 + i % (WORLD - 1))
        if kind == "stall":
            f.seconds = 3.0
        out.append(f)
    return out


def steps_for(faults: list[Failure]) -> int:
    """Steps of a soak: a few past the last fault, to train on after it."""
    return faults[-1].at_step + 6


def false_detections(
    events: list[dict[str, Any]], faults: list[Failure], nodes_of: dict[int, list[str]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(false deaths, mere suspicions) in ``events``.

    A death (``node_dead``, ``node_lost``) is rightful when a fault killed that
    node's SMP or the node itself (``nodes_of[i]``: the nodes fault ``i`` hit)
    before the event; a ``node_silent`` is expected within a stall or a kill of
    the same node, and is only a suspicion otherwise (never acted on).
    """
    struck: dict[str, list[tuple[float, str]]] = {}
    for i, f in enumerate(faults):
        if not f.injected_at:
            continue
        for hit in nodes_of.get(i, []):
            struck.setdefault(hit, []).append((f.injected_at, f.kind))
    deaths, suspicions = [], []
    for e in events:
        node = e.get("node")
        if e["kind"] not in ("node_dead", "node_lost", "node_silent") or not node:
            continue
        causes = [kind for t, kind in struck.get(node, []) if t <= e["time"] + 0.5]
        if e["kind"] == "node_silent":
            if not causes:
                suspicions.append(e)
        elif not any(kind in KILLS for kind in causes):
            deaths.append(e)
    return deaths, suspicions


def _placements(report_: RunReport, start: list[str]) -> dict[int, list[str]]:
    """Which node each fault hit: the rank's node at the time (node losses move ranks)."""
    placement = list(start)
    out: dict[int, list[str]] = {}
    for i, f in enumerate(report_.failures):
        out[i] = [placement[f.rank]]
        if f.kind == "node" and f.replacement:
            placement[f.rank] = f.replacement
    return out


class _EventTap:
    """Collects the store's events while a long run goes on (its log keeps the newest
    2,000): polls every few seconds and merges by sequence number."""

    def __init__(self, store: Any, every: float = 5.0) -> None:
        self.store, self.every = store, every
        self._seen: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="chaos-events", daemon=True)

    def __enter__(self) -> _EventTap:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self._poll()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._poll()

    def _poll(self) -> None:
        with contextlib.suppress(Exception):
            for e in store_events(self.store, n=2000):
                self._seen[int(e["seq"])] = e

    def events(self) -> list[dict[str, Any]]:
        return [self._seen[s] for s in sorted(self._seen)]


def soak(args: Any) -> dict[str, Any]:
    from snapstore.ops import faults as store_faults

    faults = quick_faults() if args.quick else draw_faults(args.faults, args.seed)
    steps = steps_for(faults)
    cfg: dict[str, Any] = {}
    info = bench_header(
        "snapstore.bench.chaos",
        f"{len(faults)} faults over {steps} steps, seed {args.seed}, {WORLD} ranks",
    )
    with private_store(
        prefix="ss-chaos-",
        nodes=WORLD,
        k=3,
        m=1,
        memory_per_node="256MiB",
        reprotect_delay=1.0,
        failure_timeout=2.0,
    ) as store:
        reference = None if args.fresh_reference else cached.load(cfg, steps, WORLD)
        ref_seconds: float | None = None
        if reference is not None:
            print(f"reference: cached ({cached.cache_path(cfg, steps, WORLD)})", flush=True)
        else:
            t0 = time.perf_counter()
            reference = run(store, "chaos-reference", steps, [], cfg, world=WORLD).to_dict()
            ref_seconds = time.perf_counter() - t0
            cached.save(cfg, steps, WORLD, reference)
            print(f"reference: {steps} steps in {ref_seconds:.0f} s", flush=True)
        start = store_faults.store_nodes(store)[:WORLD]
        began = time.time()

        def progress(step: int, message: str) -> None:
            if message:
                print(f"  step {step}: {message}", flush=True)

        t1 = time.perf_counter()
        with _EventTap(store) as tap:
            got = run(store, "chaos", steps, faults, cfg, world=WORLD, on_progress=progress)
        seconds = time.perf_counter() - t1
        events = [e for e in tap.events() if e["time"] >= began]
    equal = got.digests == reference["digests"]
    deaths, suspicions = false_detections(events, got.failures, _placements(got, start))
    by_kind = Table(
        "faults by kind (seconds from the fault to training again)",
        ["kind", "injected", "steps trained again", "median", "max"],
    )
    for kind in KIND_WEIGHTS:
        fs = [f for f in got.failures if f.kind == kind and f.injected_at]
        downs = [f.downtime_seconds for f in fs if f.downtime_seconds is not None]
        by_kind.add(
            kind,
            len(fs),
            sum(f.steps_lost for f in fs),
            f"{median(downs):.2f}" if downs else "-",
            f"{max(downs):.2f}" if downs else "-",
        )
    injected = sum(1 for f in got.failures if f.injected_at)
    summary = Table("the soak", ["", "value"], align="lr")
    summary.add("faults injected", injected)
    summary.add("steps", steps)
    summary.add("steps trained again (all faults)", sum(f.steps_lost for f in got.failures))
    summary.add("saves that failed (all ranks)", got.saves_failed)
    summary.add("false detections (dead or lost, nothing killed)", len(deaths))
    summary.add("suspicions (silent, nothing stalled or killed; not acted on)", len(suspicions))
    summary.add(
        "run with faults / reference",
        f"{seconds:.0f} s / " + (f"{ref_seconds:.0f} s" if ref_seconds is not None else "cached"),
    )
    summary.add("final state bitwise equal to the reference", "yes" if equal else "NO")
    report(
        [by_kind, summary],
        args.json,
        info=info,
        seed=args.seed,
        steps=steps,
        bitwise_equal=equal,
        faults=[asdict(f) for f in got.failures],
        false_detections=deaths,
        suspicions=suspicions,
    )
    if injected != len(faults):
        print(f"only {injected} of {len(faults)} faults were injected", flush=True)
    print(
        f"{injected} faults, {len(deaths)} false detections, "
        + ("bitwise equal" if equal else "final state DIFFERS"),
        flush=True,
    )
    return {"bitwise_equal": equal, "injected": injected, "false": len(deaths)}


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("chaos", __doc__, "one fault of each kind but trainer (a few minutes)")
    p.add_argument("--faults", type=int, default=20, help="faults to inject [20]")
    p.add_argument("--seed", type=int, default=0, help="draws the faults [0]")
    p.add_argument(
        "--fresh-reference",
        action="store_true",
        help="run the reference again even if a cached one exists (bench.reference)",
    )
    args = p.parse_args(argv)
    if args.faults < 1:
        p.error("--faults must be at least 1")
    out = soak(args)
    ok = out["bitwise_equal"] and out["false"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
