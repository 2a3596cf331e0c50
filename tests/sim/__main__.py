"""``python -m tests.sim --schedules N [--seed S]``: run seeded schedules of the simulated store.

Each schedule builds a store from its seed (nodes, k and m, jobs, faults),
runs it on virtual time and checks the invariants of :mod:`tests.sim.checks`
after every event. The last line is ``N schedules, V violations``. A
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
import sys
import time


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
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from tests.sim.plant import plant
    from tests.sim.world import run_schedule

    undo = plant(args.plant) if args.plant else None
    root = _scratch()
    violations = 0
    steps = 0
    t0 = time.monotonic()
    try:
        for seed in range(args.seed, args.seed + args.schedules):
            world = run_schedule(seed, args.plant, root, args.trace)
            steps += world.loop.steps
            v = world.violation  # type: ignore[attr-defined]
            if args.trace:
                print(f"-- seed {seed}: {world.spec}")
                print("\n".join(world.trace))
            if v is not None:
                violations += 1
                print(f"seed {seed}: VIOLATION {v}")
                print(f"  schedule: {world.spec}")
                print("  last events:")
                for line in world.trace[-40:]:
                    print(f"    {line}")
                print(f"  replay: python -m tests.sim --seed {seed} --schedules 1 --trace")
                if violations >= args.stop_after:
                    break
    finally:
        if undo is not None:
            undo()
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    ran = seed - args.seed + 1
    took = time.monotonic() - t0
    print(f"({steps} callbacks in {took:.1f} s)")
    print(f"{ran} schedules, {violations} violations")
    return 1 if violations else 0


def _scratch() -> str:
    import tempfile

    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="snapstore-sim-", dir=base)


if __name__ == "__main__":
    sys.exit(main())
