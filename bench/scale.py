"""Control plane at scale: the coordinator's cost per step and per second idle, 4 to 4,096 nodes.

``python -m bench.scale`` runs the real control plane (coordinator, group
leaders, members) on simulated nodes (:mod:`snapstore.bench.scale_sim`) at
4, 64, 512 and 4,096 nodes x 8 ranks, with a modelled network latency and
modelled byte work, and reports for each size:

- coordinator CPU per committed step (ranks saving back to back), split by
  the message that caused it, and per second idle (no job, liveness only);
- commit latency beyond the byte work (last rank staged -> its outcome, less
  the slowest parity build), in one-way message delays once the
  coordinator's own CPU in that window is taken out: the tree has two levels
  (members -> leaders -> coordinator) at every size;
- the coordinator's memory (its objects' sizes) after the steps;
- time until the job's committed step is protected again after one node is
  lost, and after a group loses m nodes at once (the most a group survives).

Then the real coordinator actor over real Ray (:mod:`snapstore.bench.scale_ray`),
driven by stand-ins for many nodes, against a bare Ray actor taking the same
calls: its CPU idle and per step as nodes grow, and how many nodes one
coordinator serves at 50% of a core on this machine. Prints markdown tables,
writes a log-log PNG (``--png``), and with ``--json`` every number.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict

from snapstore.bench._common import Table, bench_header, bench_parser, human, parse_size, report
from snapstore.bench.scale_net import NetModel
from snapstore.bench.scale_ray import RayPoint, measure_ray
from snapstore.bench.scale_sim import Shape, SizeResult, measure
from snapstore.bench.scale_store import ByteModel
from snapstore.config import StoreConfig

__all__ = ["main"]

TARGET_STEP = 0.100
"""Coordinator CPU per step at 4,096 nodes x 8 ranks (issue 12)."""
TARGET_IDLE_PER_NODE = 0.0005
"""Idle coordinator CPU per second per node (issue 12)."""
OLD_MAIN = "idle 15 ms/s + 6.75 ms/s per node (saturated near 145 nodes)"
CAUSES = {
    "report (staged)": "staged reports",
    "report (prepared)": "prepared reports",
    "report (applied)": "acks",
    "report (failed)": "failed reports",
    "group_beat": "group beats",
    "batch": "relay batches: decode",
    "register": "registrations",
    "": "timers",
}
"""Coordinator CPU by cause: each message's own, where it came in a relay's batch too
(ScaleWorld._split_batches); "batch" keeps what is the batch's (its decode)."""


def _calls_in(received: dict[str, float]) -> float:
    """Calls the coordinator took (a batch is one; the messages in it are counted apart)."""
    return sum(v for k, v in received.items() if not k.startswith("batched "))


def _received(received: dict[str, float], kind: str) -> float:
    """Messages of ``kind`` the coordinator took, straight or in batches."""
    return received.get(kind, 0.0) + received.get(f"batched {kind}", 0.0)


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f}" if x == x else "-"


def _s(x: float) -> str:
    return f"{x:.2f}" if x == x else "-"


def depth(r: SizeResult) -> int:
    """Levels of the tree a report climbs: members, leaders, (relays,) the coordinator."""
    size = r.shape.relay_groups
    relays = size == 1 or (size >= 2 and r.groups >= 2)
    return 3 if relays else 2


def _liveness(r: SizeResult) -> float:
    return r.cpu_by_per_step.get("group_beat", 0.0) + r.cpu_by_per_step.get("", 0.0)


def sim_tables(results: list[SizeResult], net: NetModel) -> list[Table]:
    steps = Table(
        "Simulated: coordinator CPU per committed step and idle (real control plane, "
        "modelled network and byte work)",
        [
            "nodes x ranks",
            "groups",
            "CPU per step (ms)",
            "of which commit path (ms)",
            "per group (ms)",
            "idle (ms/s)",
            "idle per node (ms/s)",
            "memory after steps",
            "kept per step",
        ],
    )
    latency = Table(
        f"Simulated: commit latency beyond the byte work (one message delay = "
        f"{net.latency * 1e3:.1f} ms)",
        [
            "nodes x ranks",
            "tree depth",
            "step (s)",
            "parity byte work (s)",
            "beyond byte work (ms)",
            "coordinator busy in it (ms)",
            "coordinator not charged (ms)",
            "in message delays",
        ],
    )
    causes = Table(
        "Simulated: coordinator CPU per step by cause (ms), and calls it received per step",
        [
            "nodes x ranks",
            *CAUSES.values(),
            "calls in",
            "of them batches",
            "messages per batch",
            "staged reports per group",
        ],
    )
    for r in results:
        label = f"{r.shape.nodes} x {r.shape.ranks}"
        step = r.median(r.step_cpu)
        commit = step - _liveness(r)
        steps.add(
            label,
            r.groups,
            _ms(step),
            _ms(commit),
            f"{commit / max(1, r.groups) * 1e3:.2f}",
            _ms(r.idle_cpu_per_s),
            f"{r.idle_cpu_per_s / r.shape.nodes * 1e3:.3f}",
            human(r.memory_end),
            human(r.memory_per_step),
        )
        free = r.median(r.beyond_free)
        latency.add(
            label,
            depth(r),
            _s(r.median(r.step_seconds)),
            _s(r.median(r.parity_seconds)),
            _ms(r.median(r.beyond)),
            _ms(r.median(r.busy)),
            _ms(free),
            f"{free / net.latency:.1f}",
        )
        got = r.received_per_step
        staged = _received(got, "report (staged)")
        batches = got.get("batch", 0.0)
        batched = sum(v for k, v in got.items() if k.startswith("batched "))
        causes.add(
            label,
            *(_ms(r.cpu_by_per_step.get(k, 0.0)) for k in CAUSES),
            f"{_calls_in(got):.0f}",
            f"{batches:.0f}",
            f"{batched / batches:.1f}" if batches else "-",
            f"{staged / max(1, r.groups):.1f}",
        )
    return [steps, latency, causes]


def loss_table(results: list[SizeResult]) -> Table:
    t = Table(
        "Simulated: time until the committed step is protected again (from the loss; "
        "Ray reports the death in 20 ms, a dead node is lost after reprotect_delay = 2 s)",
        [
            "nodes x ranks",
            "loss",
            "protected again after (s)",
            "after declared lost (s)",
            "rebuild byte work (s)",
            "re-encode byte work (s)",
            "coordinator CPU (ms)",
        ],
    )
    for r in results:
        for loss in r.losses:
            if not loss.ok:
                t.add(
                    f"{r.shape.nodes} x {r.shape.ranks}",
                    loss.what,
                    f"n/a: {loss.note}",
                    "",
                    "",
                    "",
                    "",
                )
                continue
            t.add(
                f"{r.shape.nodes} x {r.shape.ranks}",
                loss.what,
                _s(loss.seconds),
                _s(loss.after_lost),
                _s(loss.rebuild_bytes_seconds),
                _s(loss.parity_bytes_seconds),
                _ms(loss.cpu),
            )
    return t


def ray_table(points: list[RayPoint], interval: float) -> list[Table]:
    t = Table(
        "Real Ray: the coordinator actor driven by stand-ins (beats every "
        f"{interval} s per group; steps back to back)",
        [
            "nodes",
            "groups",
            "beats/s (offered)",
            "idle CPU (ms/s)",
            "per beat (us)",
            "bare Ray call (us)",
            "CPU per step (ms)",
            "per group (ms)",
            "step (s)",
        ],
    )
    for p in points:
        per_beat = (p.idle_cpu_per_s - p.bare_quiet_per_s) / max(p.beats_per_s, 1e-9)
        t.add(
            p.nodes,
            p.groups,
            f"{p.beats_per_s:.0f} ({p.groups / interval:.0f})",
            _ms(p.idle_cpu_per_s),
            f"{per_beat * 1e6:.0f}",
            f"{p.bare_call_cpu * 1e6:.0f}",
            _ms(p.step_cpu),
            f"{p.step_cpu / max(1, p.groups) * 1e3:.2f}",
            _s(p.step_seconds),
        )
    served = Table(
        "Real Ray: nodes one coordinator serves at 50% of a core on this machine "
        "(least-squares line through the sizes above)",
        ["load", "coordinator CPU (ms/s)", "nodes at 50% of a core"],
    )
    if len(points) < 2:
        served.add("(needs two sizes or more)", "", "")
    else:
        idle_base, idle_slope = _fit([(p.nodes, p.idle_cpu_per_s) for p in points])
        _, step_slope = _fit([(p.nodes, p.step_cpu) for p in points])
        for label, every in (
            ("idle (liveness only)", 0.0),
            ("a save every 10 s", 10.0),
            ("a save every second", 1.0),
        ):
            slope = idle_slope + (step_slope / every if every else 0.0)
            n50 = (0.5 - idle_base) / slope if slope > 0 else float("inf")
            served.add(
                label,
                f"{idle_base * 1e3:.0f} + {slope * 1e3:.2f} per node",
                f"{n50:.0f}",
            )
    return [t, served]


def _fit(xy: list[tuple[float, float]]) -> tuple[float, float]:
    n = len(xy)
    mx = sum(x for x, _ in xy) / n
    my = sum(y for _, y in xy) / n
    sxx = sum((x - mx) ** 2 for x, _ in xy)
    slope = sum((x - mx) * (y - my) for x, y in xy) / sxx if sxx else 0.0
    return my - slope * mx, slope


def targets_table(results: list[SizeResult], points: list[RayPoint]) -> Table:
    t = Table("Issue 12's targets", ["target", "measured", "met"])
    big = max(results, key=lambda r: r.shape.nodes, default=None)
    small = min(results, key=lambda r: r.shape.nodes, default=None)
    if big is not None and small is not None:
        step = big.median(big.step_cpu)
        commit = step - _liveness(big)
        label = f"{big.shape.nodes} x {big.shape.ranks}"
        t.add(
            f"coordinator CPU per step <= 100 ms at {label}",
            f"{_ms(step)} ms ({_ms(commit)} ms without liveness)",
            "yes" if step <= TARGET_STEP else "no",
        )
        idle = max(r.idle_cpu_per_s / r.shape.nodes for r in results)
        t.add(
            "idle coordinator <= 0.5 ms/s per node (simulated)",
            f"at most {idle * 1e3:.3f} ms/s per node",
            "yes" if idle <= TARGET_IDLE_PER_NODE else "no",
        )
        if points:
            if len(points) >= 2:
                per = _fit([(p.nodes, p.idle_cpu_per_s) for p in points])[1]
            else:
                per = (points[0].idle_cpu_per_s - points[0].bare_quiet_per_s) / points[0].nodes
            t.add(
                "idle coordinator <= 0.5 ms/s per node (real Ray)",
                f"at most {per * 1e3:.3f} ms/s per node (was {OLD_MAIN})",
                "yes" if per <= TARGET_IDLE_PER_NODE else "no",
            )
        free_small, free_big = small.median(small.beyond_free), big.median(big.beyond_free)
        with_cpu_small, with_cpu_big = small.median(small.beyond), big.median(big.beyond)
        grows = depth(big) / depth(small)
        t.add(
            "commit latency beyond byte work grows no faster than the tree depth "
            f"({depth(small)} -> {depth(big)}): {small.shape.nodes} -> {big.shape.nodes} nodes",
            f"message delays alone {_ms(free_small)} -> {_ms(free_big)} ms; with the "
            f"coordinator's CPU {_ms(with_cpu_small)} -> {_ms(with_cpu_big)} ms",
            ("yes" if free_big <= 1.5 * grows * free_small else "no")
            + (
                " (messages); no (coordinator CPU)"
                if with_cpu_big > 1.5 * grows * with_cpu_small
                else ""
            ),
        )
    return t


def plot(path: str, results: list[SizeResult], points: list[RayPoint]) -> None:
    """Log-log: coordinator CPU per step, and idle cost per node, against nodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [r.shape.nodes for r in results]
    a.plot(xs, [r.median(r.step_cpu) * 1e3 for r in results], "o-", label="simulated, total")
    a.plot(
        xs,
        [(r.median(r.step_cpu) - _liveness(r)) * 1e3 for r in results],
        "s--",
        label="simulated, commit path",
    )
    if points:
        a.plot(
            [p.nodes for p in points], [p.step_cpu * 1e3 for p in points], "^-", label="real Ray"
        )
    a.axhline(TARGET_STEP * 1e3, color="grey", ls=":", label="target (100 ms)")
    a.set(
        xscale="log",
        yscale="log",
        xlabel="nodes (x 8 ranks)",
        ylabel="coordinator CPU per step (ms)",
        title="Per committed step",
    )
    b.plot(xs, [r.idle_cpu_per_s / r.shape.nodes * 1e3 for r in results], "o-", label="simulated")
    if points:
        b.plot(
            [p.nodes for p in points],
            [(p.idle_cpu_per_s - p.bare_quiet_per_s) / p.nodes * 1e3 for p in points],
            "^-",
            label="real Ray",
        )
    b.axhline(TARGET_IDLE_PER_NODE * 1e3, color="grey", ls=":", label="target (0.5 ms/s)")
    b.axhline(6.75, color="red", ls=":", label="old main (6.75 ms/s)")
    b.set(
        xscale="log",
        yscale="log",
        xlabel="nodes",
        ylabel="idle CPU per node (ms/s)",
        title="Idle, per node",
    )
    sizes = sorted({*xs, *(p.nodes for p in points)})
    for ax in (a, b):
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"figure written to {path}")


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(
        "scale",
        __doc__,
        "4 and 16 simulated nodes, short windows, nothing over Ray unless --ray-sizes says "
        "(a smoke run of a few seconds)",
    )
    p.add_argument("--sizes", default="4,64,512,4096", help="simulated node counts")
    p.add_argument(
        "--ray-sizes", default=None, help="node counts over Ray ('' skips) [64,256,1024]"
    )
    p.add_argument("--ranks", type=int, default=8, help="ranks per node [8]")
    p.add_argument("--rank-bytes", default="512M", help="state per rank [512M]")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--m", type=int, default=2)
    p.add_argument("--latency", type=float, default=0.0005, help="one-way delay, s [0.0005]")
    p.add_argument("--mem-bw", type=float, default=10e9, help="node byte work, B/s [10e9]")
    p.add_argument("--net-bw", type=float, default=12.5e9, help="node network, B/s [12.5e9]")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="measured steps per size [5]")
    p.add_argument("--idle", type=float, default=10.0, help="idle window, s [10]")
    p.add_argument("--standins", type=int, default=4, help="stand-in actors over Ray [4]")
    p.add_argument(
        "--relay-groups",
        type=int,
        default=StoreConfig.relay_groups,
        help=f"groups per relay region, 0: no relays [{StoreConfig.relay_groups}]",
    )
    p.add_argument("--png", default=None, help="figure path (default: next to --json)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = "4,16"
        args.warmup, args.steps, args.idle, args.standins = 1, 2, 2.0, 1
    if args.ray_sizes is None:
        args.ray_sizes = "" if args.quick else "64,256,1024"
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    ray_sizes = [int(x) for x in args.ray_sizes.split(",") if x.strip()]
    png = args.png or (os.path.splitext(args.json)[0] + ".png" if args.json else None)
    net = NetModel(latency=args.latency)
    model = ByteModel(args.mem_bw, args.net_bw)
    info = bench_header(
        "bench.scale",
        f"k={args.k} m={args.m}, {args.ranks} ranks x {args.rank_bytes} per node, "
        f"one-way delay {args.latency * 1e3:.1f} ms, byte work {args.mem_bw / 1e9:.1f} GB/s, "
        f"network {args.net_bw / 1e9:.1f} GB/s per node, "
        f"{args.relay_groups or 'no'} groups per relay region",
    )
    results: list[SizeResult] = []
    for n in sizes:
        shape = Shape(
            n,
            args.ranks,
            parse_size(args.rank_bytes),
            args.k,
            args.m,
            relay_groups=args.relay_groups,
        )
        t0 = time.perf_counter()
        r = measure(shape, net, model, args.warmup, args.steps, args.idle)
        results.append(r)
        print(
            f"simulated {n} x {args.ranks}: {r.median(r.step_cpu) * 1e3:.1f} ms CPU per step, "
            f"idle {r.idle_cpu_per_s * 1e3:.2f} ms/s ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    points: list[RayPoint] = []
    ray_error = ""
    if ray_sizes:
        try:
            points = measure_ray(
                ray_sizes,
                Shape(
                    4,
                    args.ranks,
                    parse_size(args.rank_bytes),
                    args.k,
                    args.m,
                    relay_groups=args.relay_groups,
                ),
                args.standins,
                args.idle,
                args.steps,
                lambda s: print(s, flush=True),
            )
        except Exception as e:  # the simulated results above still get reported
            ray_error = f"{type(e).__name__}: {e}"
            print(f"the measurement over Ray failed: {ray_error}", file=sys.stderr, flush=True)
    interval = StoreConfig().heartbeat_interval
    tables = [*sim_tables(results, net), loss_table(results)]
    if points:
        tables.extend(ray_table(points, interval))
    tables.append(targets_table(results, points))
    if png:
        plot(png, results, points)
    report(
        tables,
        args.json,
        info=info,
        sim=[asdict(r) for r in results],
        ray=[asdict(pt) for pt in points],
        ray_error=ray_error,
    )
    return 1 if ray_error else 0


if __name__ == "__main__":
    sys.exit(main())
