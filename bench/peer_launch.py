"""Starting and stopping a peer's launchers, and reading what their ranks wrote.

The driver (``bench.peers``, in snapstore's environment) starts each peer
the way its documentation does (torchrun, ``dlrover-run``, torchft's
lighthouse) with the peer environment's interpreter, on loopback. Every
process it starts is stopped by pid, with everything below it, also when a
run fails or times out: :class:`Launched` is a context manager whose exit
SIGKILLs the process tree it started (found with psutil before the kill).

The rank processes import this module too (it is part of each peer's
module), so it imports only the standard library at its top.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

__all__ = [
    "Launched",
    "free_port",
    "kill_all",
    "peer_env",
    "read_results",
    "repo_root",
    "wait_results",
]

_LIVE: set[Launched] = set()
"""Every Launched not yet killed: kill_all() stops them (on SIGTERM, on the way out)."""
_LIVE_LOCK = threading.Lock()


def repo_root() -> str:
    """The repository root: peer ranks run ``python -m snapstore.bench...`` from it."""
    here = os.path.dirname(os.path.realpath(__file__))  # bench/ (snapstore/bench links here)
    return os.path.dirname(here)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peer_env(**extra: str) -> dict[str, str]:
    """The environment of a peer's processes: this repository importable, gloo on loopback."""
    env = dict(os.environ)
    for name in ("PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    env.update(
        PYTHONPATH=repo_root(),
        PYTHONUNBUFFERED="1",
        GLOO_SOCKET_IFNAME="lo",
        MASTER_ADDR="127.0.0.1",
    )
    env.update(extra)
    return env


class Launched:
    """One started process (a launcher, a lighthouse), its output appended to ``log``.

    ``wait`` returns its exit code or raises TimeoutError; ``kill`` (and
    leaving the ``with`` block) SIGKILLs it and every process below it.
    """

    def __init__(self, cmd: Sequence[str], env: dict[str, str], log: str) -> None:
        self.cmd = list(cmd)
        self._log = open(log, "a")  # noqa: SIM115 (closed in kill)
        self._log.write(f"\n$ {' '.join(self.cmd)}\n")
        self._log.flush()
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=repo_root(),
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        with _LIVE_LOCK:
            _LIVE.add(self)

    def __enter__(self) -> Launched:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float, what: str) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{what} did not finish in {timeout:.0f} s") from None

    def tree(self) -> list[int]:
        """This process and every process below it (pids)."""
        import psutil

        try:
            p = psutil.Process(self.pid)
            return [self.pid] + [c.pid for c in p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the whole tree (children first found, then killed together); reap it."""
        import psutil

        with _LIVE_LOCK:
            _LIVE.discard(self)
        procs = []
        for pid in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                procs.append(psutil.Process(pid))
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(procs, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if not self._log.closed:
            self._log.close()


def kill_all() -> None:
    """Kill every process tree started through :class:`Launched` and not yet killed."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for launched in live:
        launched.kill()


def read_results(outdir: str, phase: str, ranks: Sequence[int]) -> list[dict[str, Any]]:
    """What ranks ``ranks`` wrote for ``phase``; RuntimeError naming what is missing."""
    out = []
    for r in ranks:
        path = os.path.join(outdir, f"{phase}-rank{r}.json")
        if not os.path.exists(path):
            raise RuntimeError(f"rank {r} wrote no result for {phase!r} ({path})")
        with open(path) as f:
            res = json.load(f)
        if "error" in res:
            raise RuntimeError(f"rank {r}, {phase}: {res['error']}")
        out.append(res)
    return out


def wait_results(
    outdir: str, phase: str, ranks: Sequence[int], timeout: float, alive: Launched | None = None
) -> list[dict[str, Any]]:
    """Wait until every rank of ``ranks`` wrote ``phase`` (or one wrote an error)."""
    deadline = time.monotonic() + timeout
    paths = [os.path.join(outdir, f"{phase}-rank{r}.json") for r in ranks]
    while not all(os.path.exists(p) for p in paths):
        for p in paths:
            if os.path.exists(p):
                with open(p) as f, contextlib.suppress(ValueError):
                    if "error" in json.load(f):
                        return read_results(outdir, phase, ranks)
        if alive is not None and not alive.alive():
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks {list(ranks)} did not report {phase!r} in {timeout:.0f} s")
        time.sleep(0.05)
    return read_results(outdir, phase, ranks)
