"""What a snapshot every step costs a training loop: data-parallel GPT steps with and without.

Run: ``python -m bench.overhead`` (``--steps N`` timed steps per mode,
default 60); ``--quick`` for a smoke run with the tiny default model;
``--json FILE`` writes every sample. Prints markdown tables
(docs/performance-store.md quotes them).

Two ranks train the GPT of :mod:`snapstore.bench.gpt` with DDP (gloo all-reduce of
gradients on 127.0.0.1), each a Ray actor pinned to its own node of an
embedded 4-node store (k = 3, m = 1), one torch thread each: the two ranks
fill the machine's two cores, and the store's processes (SMPs computing
checksums and parity, the coordinator) compete with them for those cores.
Three modes, interleaved in rounds so that load drifting on the machine
hits each alike:

- ``none``: no snapshots;
- ``sync``: ``client.save(step, state)`` after every optimizer step;
- ``lazy``: ``client.save(step, state, lazy=True)`` after every optimizer
  step, and ``client.wait_staged()`` right before the next one, so the copy
  runs during the next forward and backward pass.

The state is the model's and the optimizer's state dicts plus the step,
built once (its tensors are the live ones, updated in place) and saved with
data-parallel de-duplication (``dp=`` the process group: each rank stores
half of the replicated tensors); ``--no-dedup`` stores the whole state on
both ranks. A step is timed from its forward pass to the end of its save.
The time the loop is blocked in ``save`` + ``wait_staged`` is set against
one memcpy of the rank's whole state (``np.copyto`` between two warm
buffers), timed in the same processes between rounds. The CPU table, by
process role, ends with what the snapshots cost: each mode's CPU per
iteration minus that of ``none`` in the same run.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from snapstore.bench._common import (
    Table,
    bench_header,
    bench_parser,
    human,
    median,
    private_store,
    write_json,
)

MODES = ("none", "sync", "lazy")
MODEL = {"vocab": 64, "context": 64, "width": 256, "heads": 8, "layers": 4}
"""3.2 M parameters: 36.5 MiB of fp32 weights and AdamW state, a 0.27 s step on one core."""
BATCH = 16


class DPTrainer:
    """One data-parallel rank: DDP over gloo, a snapshot client, timed steps."""

    def __init__(
        self,
        job: str,
        rank: int,
        world: int,
        port: int,
        rundir: str,
        model: dict[str, Any],
        batch: int,
        dedup: bool,
    ) -> None:
        from datetime import timedelta

        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        from snapstore.bench.gpt import GPTConfig, make_model
        from snapstore.clients import Client

        torch.set_num_threads(1)  # two ranks share two cores
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=120),
        )
        self.rank = rank
        self.cfg = GPTConfig(**model)
        self.batch = batch
        self.model, self.opt = make_model(self.cfg, seed=0)
        self.ddp = DistributedDataParallel(self.model)
        dp = dist.group.WORLD if dedup else None
        self.client = Client(job, rank, world, rundir=rundir, dp=dp, timeout=300)
        self.step = 0
        self.state: dict[str, Any] | None = None
        self.futures: list[Any] = []

    def _train_step(self, mode: str) -> tuple[float, float]:
        """One iteration; returns (its seconds, seconds blocked in save + wait_staged)."""
        from torch.nn import functional as F

        from snapstore.bench.gpt import batch

        x, y = batch(self.cfg, self.step, self.rank, self.batch)
        t0 = time.perf_counter()
        logits = self.ddp(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        blocked = 0.0
        if mode == "lazy":
            t = time.perf_counter()
            self.client.wait_staged()
            blocked += time.perf_counter() - t
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
        if mode != "none":
            state = self._state()
            t = time.perf_counter()
            self.futures.append(self.client.save(self.step, state, lazy=mode == "lazy"))
            blocked += time.perf_counter() - t
        seconds = time.perf_counter() - t0
        self.step += 1
        return seconds, blocked

    def _state(self) -> dict[str, Any]:
        # Built once: the state dicts' tensors are the live parameters and
        # optimizer buffers, which the optimizer updates in place.
        if self.state is None:
            self.state = {
                "model": self.model.state_dict(),
                "optim": self.opt.state_dict(),
                "step": self.step,
            }
        self.state["step"] = self.step
        return self.state

    def run(self, mode: str, steps: int) -> dict[str, list[float]]:
        import torch.distributed as dist

        dist.barrier()  # both ranks start the block together
        out: dict[str, list[float]] = {"step": [], "blocked": []}
        for _ in range(steps):
            s, b = self._train_step(mode)
            out["step"].append(s)
            out["blocked"].append(b)
        self.client.wait_staged()
        return out

    def settle(self, timeout: float = 300) -> dict[str, int]:
        """Wait for every save so far to resolve; count committed and failed ones."""
        ok = failed = 0
        for f in self.futures:
            try:
                f.result(timeout)
                ok += 1
            except Exception:
                failed += 1
        self.futures.clear()
        return {"committed": ok, "failed": failed}

    def state_info(self) -> dict[str, Any]:
        from snapstore.bench._common import state_nbytes

        state = self._state()
        last = self.client.metrics
        return {
            "state_bytes": state_nbytes(state),
            "staged_bytes_per_save": last["bytes_staged"] // max(1, last["saves"]),
            "waits": last["waits"],
            "wait_seconds": last["wait_seconds"],
        }

    def memcpy(self, reps: int) -> list[float]:
        """One copy of this rank's whole state between two warm buffers, ``reps`` times."""
        from snapstore.bench._common import memcpy_seconds, state_nbytes

        return memcpy_seconds(state_nbytes(self._state()), reps)["np"]

    def close(self) -> None:
        import torch.distributed as dist

        with contextlib.suppress(Exception):
            self.client.close()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


COMPONENTS = ("trainers", "SMPs", "coordinator", "raylets + GCS", "other Ray")


def cpu_seconds(rundir: str) -> dict[str, float]:
    """CPU seconds (user + system) so far of every process of this benchmark's store, by role.

    The store's processes are the ones whose command line names its private
    runtime dir, and their descendants (Ray's workers: the SMP and
    coordinator actors, the trainers).
    """
    import psutil

    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(rundir in a for a in p.info["cmdline"] or ()):
                procs[p.pid] = p
                for c in p.children(recursive=True):
                    procs[c.pid] = c
    out = dict.fromkeys(COMPONENTS, 0.0)
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.cmdline())
            t = p.cpu_times()
            if "DPTrainer" in cmd:
                role = "trainers"
            elif "SMP" in cmd:
                role = "SMPs"
            elif "Coordinator" in cmd:
                role = "coordinator"
            elif "raylet" in cmd or "gcs_server" in cmd:
                role = "raylets + GCS"
            else:
                role = "other Ray"
            out[role] += t.user + t.system
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(
    store: Any, model: dict[str, Any], steps: int, rounds: int, warmup: int, dedup: bool
) -> dict[str, Any]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from snapstore.ops import faults

    nodes = faults.store_nodes(store)[:2]
    port = _free_port()
    cls = ray.remote(DPTrainer)
    ranks = [
        cls.options(
            num_cpus=0,
            max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[r], soft=False),
        ).remote("overhead", r, 2, port, store.rundir, model, BATCH, dedup)
        for r in range(2)
    ]
    samples: dict[str, dict[str, list[float]]] = {m: {"step": [], "blocked": []} for m in MODES}
    memcpy: list[float] = []
    settled = {"committed": 0, "failed": 0}
    cpu: dict[str, dict[str, float]] = {m: dict.fromkeys(COMPONENTS, 0.0) for m in MODES}
    wall: dict[str, float] = dict.fromkeys(MODES, 0.0)
    try:
        for mode in MODES:  # warm-up: first saves allocate and map the slots
            ray.get([r.run.remote(mode, warmup) for r in ranks], timeout=900)
        ray.get([r.settle.remote() for r in ranks], timeout=900)
        per_block = max(1, steps // rounds)
        for i in range(rounds):
            for mode in MODES:
                before, t0 = cpu_seconds(store.rundir), time.perf_counter()
                out = ray.get([r.run.remote(mode, per_block) for r in ranks], timeout=900)
                # Commits may still run after the last step: count them in.
                settled_now = ray.get([r.settle.remote() for r in ranks], timeout=900)
                after = cpu_seconds(store.rundir)
                wall[mode] += time.perf_counter() - t0
                for k in COMPONENTS:
                    cpu[mode][k] += after[k] - before[k]
                for o in out:
                    samples[mode]["step"] += o["step"]
                    samples[mode]["blocked"] += o["blocked"]
                for s in settled_now:
                    settled["committed"] += s["committed"]
                    settled["failed"] += s["failed"]
            memcpy += ray.get(ranks[0].memcpy.remote(3), timeout=300)
            print(f"  round {i + 1}/{rounds} done", flush=True)
        info = ray.get(ranks[0].state_info.remote(), timeout=60)
    finally:
        with contextlib.suppress(Exception):
            ray.get([r.close.remote() for r in ranks], timeout=60)
        for r in ranks:
            with contextlib.suppress(Exception):
                ray.kill(r, no_restart=True)
    steps_run = {m: len(samples[m]["step"]) // 2 for m in MODES}
    return {
        "samples": samples,
        "memcpy": memcpy,
        "settled": settled,
        "cpu": cpu,
        "wall": wall,
        "iterations": steps_run,
        **info,
    }


def table(res: dict[str, Any], label: str) -> Table:
    s = res["samples"]
    base = median(s["none"]["step"])
    mc = median(res["memcpy"])
    t = Table(
        f"{label}: state {human(res['state_bytes'])} per rank, "
        f"{human(res['staged_bytes_per_save'])} staged per rank per save; one memcpy of the "
        f"state = {mc * 1e3:.1f} ms; {res['settled']['committed']} saves committed, "
        f"{res['settled']['failed']} failed",
        [
            "mode",
            "median step",
            "overhead",
            "blocked in save + wait_staged",
            "blocked / memcpy",
            "steps timed",
        ],
    )
    for mode in MODES:
        step = median(s[mode]["step"])
        blocked = median(s[mode]["blocked"])
        t.add(
            mode,
            f"{step * 1e3:.1f} ms",
            "-" if mode == "none" else f"{(step / base - 1) * 100:+.1f}%",
            "-" if mode == "none" else f"{blocked * 1e3:.2f} ms",
            "-" if mode == "none" else f"{blocked / mc:.2f}x",
            len(s[mode]["step"]),
        )
    return t


def cpu_table(res: dict[str, Any]) -> Table:
    t = Table(
        "CPU time per training iteration (both ranks together), by process role, over the "
        "timed blocks; the machine has 2 cores, i.e. 2 CPU-seconds per second:",
        ["mode", *COMPONENTS, "store total", "CPU busy"],
    )
    per: dict[str, dict[str, float]] = {}
    for mode in MODES:
        n = max(1, res["iterations"][mode])
        c = res["cpu"][mode]
        per[mode] = {k: c[k] / n for k in COMPONENTS}
        per[mode]["store total"] = sum(v for k, v in c.items() if k != "trainers") / n
        busy = sum(c.values()) / max(1e-9, res["wall"][mode]) / 2
        t.add(
            mode,
            *(f"{per[mode][k] * 1e3:.1f} ms" for k in [*COMPONENTS, "store total"]),
            f"{busy * 100:.0f}%",
        )
    # What the snapshots cost, by role: the same run's iterations without them taken away.
    for mode in ("sync", "lazy"):
        t.add(
            f"{mode} minus none",
            *(
                f"{(per[mode][k] - per['none'][k]) * 1e3:+.1f} ms"
                for k in [*COMPONENTS, "store total"]
            ),
            "-",
        )
    return t


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("overhead", __doc__, "tiny model, a few steps")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per mode (60)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds the steps are split in")
    parser.add_argument("--no-dedup", action="store_true", help="each rank stores its whole state")
    args = parser.parse_args(argv)
    from snapstore.bench.gpt import GPTConfig

    model = asdict(GPTConfig()) if args.quick else dict(MODEL)
    steps = 6 if args.quick else max(args.rounds, args.steps)
    rounds = 1 if args.quick else max(1, args.rounds)
    warmup = 2 if args.quick else 5
    dedup = not args.no_dedup
    info = bench_header(
        "snapstore.bench.overhead",
        f"GPT {model}, batch {BATCH}, DP=2 over gloo, one torch thread per rank; store: 4 "
        f"nodes, k=3, m=1; {'DP de-duplication' if dedup else 'no DP de-duplication'}",
    )
    # Actor classes are imported by name in the ranks' processes, not pickled from __main__.
    from snapstore.bench import overhead as this

    # Detection speed is bench.restore's business: a longer failure timeout
    # keeps late heartbeats on a loaded machine from aborting saves here.
    with private_store(nodes=4, k=3, m=1, memory_per_node="1GiB", failure_timeout=5.0) as store:
        res = this.run(store, model, steps, rounds, warmup, dedup)
    t = table(res, "DP=2 GPT training, snapshot every step")
    c = cpu_table(res)
    t.print()
    c.print()
    write_json(
        args.json,
        {
            "info": info,
            "model": model,
            "result": res,
            "tables": [t.as_dict(), c.as_dict()],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
