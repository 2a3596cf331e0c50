"""``python -m tests.sim --schedules N [--seed S]``: run seeded schedules of the simulated store.

Each schedule builds a store from its seed (nodes, k and m, jobs, faults),
runs it on virtual time and checks the invariants of :mod:`tests.sim.checks`
after every event. The last line is ``N schedules, V violations``; while it
runs, each process says on stderr every 10 s how far it got (so a schedule
that never ends shows as a seed that stops moving). A
failing schedule prints its seed, the violation and the trace of its last
events; ``--seed S --schedules 1 --trace`` replays it exactly and prints the
whole trace. ``--plant BUG`` runs with a bug planted (see :mod:`tests.sim.plant`)
to show that the simulation finds it.

String hashing must be the same from run to run for a replay to be exact:
the command re-runs itself with ``PYTHONHASHSEED=0`` when it is not set.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

PROGRESS_EVERY = 10.0
"""Seconds between a process's progress lines on stderr."""
WALL_LIMIT = 120
"""Seconds of real time one schedule may take (they take well under one): past it the
schedule is reported as a violation with its replay line, and its process stops."""


class _Overran(Exception):
    """A schedule ran past WALL_LIMIT (raised by SIGALRM inside it)."""


def _overran(signum: int, frame: object) -> None:
    raise _Overran


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "tests.sim", *(argv or sys.argv[1:])])
    p = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__.splitlines()[0])
    p.add_argument("--schedules", type=int, default=100, help="how many schedules [100]")
    p.add_argument("--seed", type=int, default=0, help="seed of the first schedule [0]")
    p.add_argument("--trace", action="store_true", help="print every schedule's whole trace")
    p.add_argument("--plant", default=None, help="run with a planted bug (tests.sim.plant)")
    p.add_argument("--stop-after", type=int, default=1, help="stop after this many violations [1]")
    p.add_argument("--jobs", type=int, default=1, help="processes to run schedules in [1]")
    p.add_argument(
        "--relays",
        choices=("random", "on", "off"),
        default="random",
        help="leaders report through relays: in half the schedules (by seed), all, none",
    )
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    t0 = time.monotonic()
    seeds = list(range(args.seed, args.seed + args.schedules))
    if args.jobs > 1 and len(seeds) > 1:
        import multiprocessing

        chunks = [seeds[i :: args.jobs] for i in range(args.jobs)]
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(args.jobs) as pool:
            results = pool.starmap(
                _run,
                [(c, args.plant, args.trace, args.stop_after, args.relays) for c in chunks],
            )
    else:
        results = [_run(seeds, args.plant, args.trace, args.stop_after, args.relays)]
    ran = sum(r[0] for r in results)
    steps = sum(r[1] for r in results)
    reports = [rep for r in results for rep in r[2]]
    for text in sorted(reports)[: max(args.stop_after, 1)]:
        print(text[1])
    took = time.monotonic() - t0
    print(f"({steps} callbacks in {took:.1f} s)")
    print(f"{ran} schedules, {len(reports)} violations")
    return 1 if reports else 0


def _run(
    seeds: list[int], plant_name: str | None, trace: bool, stop_after: int, relays: str = "random"
) -> tuple[int, int, list[tuple[int, str]]]:
    """Run ``seeds`` in this process: (schedules run, callbacks, [(seed, report)])."""
    from tests.sim.plant import plant
    from tests.sim.world import run_schedule

    undo = plant(plant_name) if plant_name else None
    root = _scratch()
    reports: list[tuple[int, str]] = []
    steps = ran = 0
    t0 = said = time.monotonic()
    again = "" if relays == "random" else f" --relays {relays}"
    signal.signal(signal.SIGALRM, _overran)
    try:
        for seed in seeds:
            replay = f"  replay: python -m tests.sim --seed {seed} --schedules 1 --trace{again}"
            signal.alarm(WALL_LIMIT)
            try:
                world = run_schedule(seed, plant_name, root, trace, relays)
            except _Overran:
                # Its loop was left inside a callback: this process runs no more schedules.
                why = f"the schedule did not end within {WALL_LIMIT} s of real time"
                reports.append((seed, f"seed {seed}: VIOLATION {why}\n{replay}"))
                break
            finally:
                signal.alarm(0)
            ran += 1
            steps += world.loop.steps
            now = time.monotonic()
            if now - said >= PROGRESS_EVERY:
                said = now
                print(
                    f"(pid {os.getpid()}: {ran} of {len(seeds)} schedules in {now - t0:.0f} s, "
                    f"last seed {seed})",
                    file=sys.stderr,
                    flush=True,
                )
            v = world.violation  # type: ignore[attr-defined]
            if trace:
                print(f"-- seed {seed}: {world.spec}")
                print("\n".join(world.trace))
            if v is not None:
                lines = [f"seed {seed}: VIOLATION {v}", f"  schedule: {world.spec}"]
                lines.append("  last events:")
                lines.extend(f"    {line}" for line in world.trace[-40:])
                lines.append(replay)
                reports.append((seed, "\n".join(lines)))
                if len(reports) >= stop_after:
                    break
    finally:
        if undo is not None:
            undo()
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return ran, steps, reports


def _scratch() -> str:
    import tempfile

    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="snapstore-sim-", dir=base)


if __name__ == "__main__":
    sys.exit(main())
