"""snapstore against GEMINI, DLRover Flash Checkpoint and torchft, side by side in one run.

Run: ``python -m bench.peers`` (default ``--size 256M`` per rank); ``--quick``
for a smoke run on 16 MiB; ``--json FILE`` writes every sample. Each peer
runs with the interpreter of an environment of its own
(``bench.peer_envs``: built on demand under ``~/.cache/snapstore/peers``,
reused while its pinned requirements stay the same), launched the way its
documentation launches it, on 127.0.0.1, and stopped by the benchmark:

- **snapstore** (``bench.peer_snapstore``): an embedded store of 4 nodes,
  k = 3, m = 1; ``client.save`` sync and lazy.
- **lm-resiliency GEMINI** (``bench.peer_gemini``): torchrun, in-memory
  checkpoints replicated to the peer rank.
- **DLRover Flash Checkpoint** (``bench.peer_dlrover``): its master and
  ``dlrover-run``; saves to the agent's shared memory, and to storage.
- **torchft** (``bench.peer_torchft``): its lighthouse and two replica groups
  under torchrun; a lost replica heals from the live one.

Every system has the same state: per rank, the transformer-shaped state of
``snapstore.bench.save`` (fp32 weights, bf16 copies, AdamW moments, 638
tensors), every tensor changed at every step; two ranks (torchft: two
replica groups of it). Each process times one memcpy (``np.copyto``) of its
state, and save times are ratios to that, median over ranks and saves. What
each column means, per system, is in the module of that system; in short:
save returns (the call), protected against a node loss (a copy of the step
exists off the node), restore after a trainer crash and after the loss of a
node (each peer's own recovery path, in a new process, checked bitwise),
the extra memory that protection takes (measured: segment or shared-memory
bytes, or the trainer's anonymous memory), and what a restore returns after
one byte of the peer's copy was flipped.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from snapstore.bench import peer_launch
from snapstore.bench._common import (
    Table,
    bench_header,
    bench_parser,
    disk_dir,
    human,
    median,
    parse_size,
    write_json,
)
from snapstore.bench.peer_envs import REQUIREMENTS, PeerEnv, cache_dir, ensure

__all__ = ["main"]

PEER_TIMEOUT = 600.0
"""Seconds one phase of a peer may take before it is stopped."""
NAMES = {
    "snapstore": "snapstore client.save, sync",
    "snapstore_lazy": "snapstore client.save(lazy=True)",
    "gemini": "lm-resiliency GEMINI 0.2.0 (torchrun)",
    "dlrover": "DLRover 0.6.1 Flash Checkpoint, memory (dlrover-run)",
    "torchft": "torchft 0.2.0, 2 replica groups (lighthouse, torchrun)",
}


def build_envs(log_dir: str, peers: set[str]) -> dict[str, PeerEnv]:
    """The environments of ``peers``, built in parallel where missing."""
    if not peers:
        return {}
    with concurrent.futures.ThreadPoolExecutor(len(peers)) as pool:
        futures = {
            p: pool.submit(ensure, p, os.path.join(log_dir, f"pip-{p}.log")) for p in sorted(peers)
        }
        return {p: f.result() for p, f in futures.items()}


def _ratio(samples: list[float], memcpy: dict[Any, list[float]]) -> float:
    """Median of samples over the median memcpy of the processes that took them."""
    return median(samples) / median([x for v in memcpy.values() for x in v])


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _timed(samples: list[float] | None, memcpy: dict[Any, list[float]]) -> str:
    if not samples:
        return "-"
    return f"{_ms(median(samples))} ({_ratio(samples, memcpy):.2f}x)"


def _restore(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    if "seconds" not in r:
        return r.get("why", "-")
    return f"{_ms(r['seconds'])}, {'bitwise OK' if r['ok'] else 'WRONG BYTES'}"


def _memory(m: dict[str, Any]) -> str:
    return f"{m['bytes'] / m['state']:.2f}x the state ({human(m['bytes'])})"


def _protected(key: str, res: dict[str, Any]) -> str:
    if key == "dlrover":
        st = res["storage"]
        return (
            f"never (memory only); a storage save: {_timed(st['protected'], res['memcpy'])} "
            f"until persisted, returns in {_timed(st['returns'], res['memcpy'])}"
        )
    if key == "torchft":
        return "every committed step, while a replica lives (no save)"
    return _timed(res["protected"], res["memcpy"])


def tables(results: dict[str, Any], nbytes: int, reps: int) -> list[Table]:
    main = Table(
        f"2 ranks of {human(nbytes)} each (torchft: 2 replica groups of one such state); "
        f"medians over ranks and {reps} saves; x memcpy = over one np.copyto of the state "
        "in the same process; restores are the restore call in a new trainer process",
        [
            "system",
            "save returns (x memcpy)",
            "protected against a node loss (x memcpy)",
            "restore after a trainer crash",
            "restore after a node loss",
            "extra memory for that protection (measured)",
            "one byte flipped in its copy, then restore",
        ],
        align="lrrrrll",
    )
    paths = Table(
        "Where each restore came from, and what the memory is",
        ["system", "trainer crash", "node loss", "memory measured"],
        align="llll",
    )
    for key in ("snapstore", "gemini", "dlrover", "torchft"):
        res = results.get(key)
        if res is None or "error" in res:
            why = (res or {}).get("error", "not run")
            main.add(NAMES[key], *([f"not measured: {why}"] + ["-"] * 5))
            continue
        if key == "snapstore":
            main.add(
                NAMES[key],
                _timed(res["sync"]["returns"], res["memcpy"]),
                _timed(res["sync"]["protected"], res["memcpy"]),
                _restore(res["crash"]),
                _restore(res["loss"]),
                _memory(res["memory"]),
                res["corruption"]["outcome"],
            )
            main.add(
                NAMES["snapstore_lazy"],
                _timed(res["lazy"]["returns"], res["memcpy"]),
                _timed(res["lazy"]["protected"], res["memcpy"]),
                *(["as above"] * 4),
            )
        else:
            crash = res["crash"]
            main.add(
                NAMES[key],
                _timed(res["returns"], res["memcpy"]) if res["returns"] else "n/a: no save",
                _protected(key, res),
                "same path as a node loss" if crash.get("same_as_loss") else _restore(crash),
                _restore(res["loss"]),
                _memory(res["memory"]),
                res["corruption"]["outcome"],
            )
        crash_path = res["crash"].get("path") or res["crash"].get("why", "-")
        paths.add(NAMES[key], crash_path, res["loss"]["path"], res["memory"]["what"])
    memcpy = [x for r in results.values() if "memcpy" in r for v in r["memcpy"].values() for x in v]
    main.add("memcpy, np.copyto (all processes)", _ms(median(memcpy)), "-", "-", "-", "-", "-")
    return [main, paths]


def _peers(
    workdir: str, peers: set[str], nbytes: int, reps: int, together: bool
) -> tuple[dict[str, PeerEnv], dict[str, Any]]:
    """Build the peers' environments, then run each peer (``together``: all at once)."""
    t0 = time.monotonic()
    envs = build_envs(workdir, peers)
    print(
        f"peer environments ({cache_dir()}), ready after {time.monotonic() - t0:.1f} s: "
        + "; ".join(
            f"{p} {'built' if e.built else 'reused'} in {e.seconds:.1f} s"
            + (f" (FAILED: {e.error})" if e.error else "")
            for p, e in envs.items()
        ),
        flush=True,
    )
    results: dict[str, Any] = {}
    runners = {}
    for key, env in envs.items():
        if env.python is None:
            results[key] = {"error": f"its environment could not be built: {env.error}"}
            print(f"{key} skipped: its environment could not be built ({env.error})", flush=True)
        else:
            runners[key] = _runner(key, env.python, nbytes, reps)
    if together and runners:
        with concurrent.futures.ThreadPoolExecutor(len(runners)) as pool:
            futures = {k: pool.submit(_peer, k, fn, workdir) for k, fn in runners.items()}
            results.update({k: f.result() for k, f in futures.items()})
    else:
        results.update({k: _peer(k, fn, workdir) for k, fn in runners.items()})
    return envs, results


def _peer(key: str, fn: Callable[[str], dict[str, Any]], workdir: str) -> dict[str, Any]:
    """Run one system in its own directory; on failure its row says why (and the log tail)."""
    d = os.path.join(workdir, key)
    os.makedirs(d)
    log = os.path.join(d, "log")
    t0 = time.monotonic()
    try:
        res = fn(d)
    except Exception as e:
        tail = ""
        if os.path.exists(log):
            with open(log, errors="replace") as f:
                tail = "".join(f.readlines()[-40:])
        print(f"{key} FAILED: {e}\n{traceback.format_exc()}\n--- its log, last lines:\n{tail}")
        return {"error": f"{type(e).__name__}: {str(e)[:160]}"}
    res["seconds"] = time.monotonic() - t0
    print(f"{key} done in {res['seconds']:.1f} s", flush=True)
    return res


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(
        "peers", __doc__, "16 MiB per rank, 3 saves, the peers at the same time (a smoke run)"
    )
    parser.add_argument("--size", default="256M", help="state per rank (256M)")
    parser.add_argument("--reps", type=int, default=5, help="timed saves per rank (median)")
    parser.add_argument(
        "--only", default="", help="comma-separated systems to run (default: all four)"
    )
    args = parser.parse_args(argv)
    nbytes = parse_size("16M" if args.quick else args.size)
    reps = 3 if args.quick else args.reps
    only = {s for s in args.only.split(",") if s} or {"snapstore", *REQUIREMENTS}
    info = bench_header(
        "snapstore.bench.peers",
        f"2 ranks of {human(nbytes)}; snapstore on 4 nodes (k=3, m=1); GEMINI, DLRover "
        "and torchft in environments of their own, on 127.0.0.1",
    )
    results: dict[str, Any] = {}
    workdir = tempfile.mkdtemp(prefix="bench-peers-", dir=disk_dir())
    peers = only - {"snapstore"}
    # SIGTERM (a test's timeout) unwinds like Ctrl-C, so the finally below
    # stops every launcher this run started.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        # --quick: the peers' environments are built, and the peers run, while
        # snapstore runs (a smoke run: numbers taken so are not comparable).
        # Otherwise one system after the other, each alone on the machine.
        task = pool.submit(_peers, workdir, peers, nbytes, reps, True) if args.quick else None
        if "snapstore" in only:
            from snapstore.bench import peer_snapstore

            results["snapstore"] = _peer(
                "snapstore", lambda d: peer_snapstore.run(nbytes, reps), workdir
            )
        envs, got = task.result() if task else _peers(workdir, peers, nbytes, reps, False)
        results.update(got)
        info["environments"] = {
            p: {"python": e.python, "seconds": e.seconds, "built": e.built, "error": e.error}
            for p, e in envs.items()
        }
    finally:
        peer_launch.kill_all()
        pool.shutdown(wait=True)
        peer_launch.kill_all()
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(workdir, ignore_errors=True)
    failed = [
        k for k, r in results.items() if "error" in r and "could not be built" not in r["error"]
    ]
    ts = tables(results, nbytes, reps)
    for t in ts:
        t.print()
    write_json(args.json, {"info": info, "results": results, "tables": [t.as_dict() for t in ts]})
    if failed:
        print(f"FAILED: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _runner(key: str, python: str, nbytes: int, reps: int) -> Callable[[str], dict[str, Any]]:
    from snapstore.bench import peer_dlrover, peer_gemini, peer_torchft

    def gemini(d: str) -> dict[str, Any]:
        return peer_gemini.run(python, nbytes, reps, d, os.path.join(d, "log"), PEER_TIMEOUT)

    def dlrover(d: str) -> dict[str, Any]:
        log = os.path.join(d, "log")
        return peer_dlrover.run(python, nbytes, reps, d, log, PEER_TIMEOUT, storage=d)

    def torchft(d: str) -> dict[str, Any]:
        return peer_torchft.run(python, nbytes, d, os.path.join(d, "log"), PEER_TIMEOUT)

    return {"gemini": gemini, "dlrover": dlrover, "torchft": torchft}[key]


if __name__ == "__main__":
    sys.exit(main())
