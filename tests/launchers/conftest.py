"""The launcher tests' store, torchrun agents, and the run without failures both compare with.

One store serves the package: 3 nodes, k=2, m=1 (the smallest that survives
a node loss). The quick start, torchrun and Ray Train tests run one after
the other on it; a test that loses a node adds a replacement, so each finds
three alive store nodes (``faults.store_nodes``), and each uses its own jobs.

The torchrun and Ray Train examples train the same model on the same data
with the same DDP settings, one rank per store node: the same job under two
launchers. Their runs through failures are compared, bitwise, with one run
without failures (:func:`reference`, the torchrun example undisturbed).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from snapstore.clients import JobControl
from tests.conftest import running_store, wait_for

ROOT = Path(__file__).resolve().parent.parent.parent
BIN = Path(sys.executable).parent
TORCHRUN_EXAMPLE = ROOT / "docs" / "examples" / "torchrun_ddp.py"
STEPS = 20
"""Steps of every torchrun and Ray Train run here (the examples' ``--steps``)."""
RANKS = 3
"""Ranks of those runs: one per store node."""


@pytest.fixture(scope="package")
def store() -> Iterator[Any]:
    with running_store(nodes=RANKS, k=2, m=1, memory_per_node="64MiB") as s:
        yield s


def user_env(store: Any, **extra: str) -> dict[str, str]:
    """The environment of a user's shell after ``snapstore up`` (this venv on PATH)."""
    env = dict(os.environ, SNAPSTORE_RUNTIME_DIR=store.rundir)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("SNAPSTORE_NODE", None)
    env.update(extra)
    return env


def latest(store: Any, job: str) -> int:
    """The job's last committed step, -1 before the first."""
    step = JobControl(job, store=store).latest()
    return -1 if step is None else step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Agent:
    """One torchrun agent standing for one host: its workers use the store node ``node``."""

    def __init__(
        self, store: Any, node: str, job: str, port: int, host: bool, log: Path, **kw: Any
    ) -> None:
        self.node, self.port, self.log = node, port, log
        cmd = [str(BIN / "torchrun"), "--nnodes", str(RANKS), "--nproc-per-node", "1"]
        cmd += ["--max-restarts", "3", "--rdzv-backend", "c10d", "--rdzv-id", job]
        cmd += ["--rdzv-endpoint", f"127.0.0.1:{port}"]
        # The first agent hosts the rendezvous (a stable endpoint, as a head
        # node or etcd would be); a lost node's agent misses 3 beats of 1 s.
        cmd += [
            "--rdzv-conf",
            f"is_host={int(host)},keep_alive_interval=1,keep_alive_max_attempt=3",
        ]
        cmd += [str(TORCHRUN_EXAMPLE), "--job", job, "--steps", str(STEPS)]
        for k, v in kw.items():
            cmd += [f"--{k}", str(v)]
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(
                cmd,
                # torch shares the rank-0 agent's TCPStore with the workers, but
                # publishes its address only in the first round that agent is rank
                # 0 in: a replacement agent joining a later round waits for it in
                # vain. Without sharing, rank 0 publishes it every round.
                env=user_env(store, SNAPSTORE_NODE=node, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"),
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        from snapstore.control.handle import ProcessRef

        # Recorded at once, so that a kill never reaches a process that reused the pid.
        self.ref = ProcessRef.identify(self.proc.pid)

    def worker(self, timeout: float = 60.0) -> psutil.Process:
        """The agent's training process (once it runs)."""

        def find() -> psutil.Process | None:
            for c in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    if str(TORCHRUN_EXAMPLE) in " ".join(c.cmdline()):
                        return c
                except psutil.Error:
                    continue
            return None

        return wait_for(find, timeout, f"a worker under agent {self.proc.pid}")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun agent did not finish in {timeout} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        from snapstore.ops.cluster import kill_tree

        if self.proc.poll() is None and self.ref is not None:
            kill_tree([self.ref])
        self.proc.wait(10)


def torchrun_job(store: Any, job: str, tmp: Path, **kw: Any) -> list[Agent]:
    """One agent per store node; the first hosts the rendezvous."""
    from snapstore.ops import faults

    port = free_port()
    nodes = faults.store_nodes(store)[:RANKS]
    return [
        Agent(store, n, job, port, i == 0, tmp / f"{job}-{i}.log", **kw)
        for i, n in enumerate(nodes)
    ]


@pytest.fixture(scope="package")
def reference(store: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The final digest of the torchrun example run without failures."""
    import json

    tmp = tmp_path_factory.mktemp("reference")
    agents = torchrun_job(store, "reference", tmp, out=tmp / "out.json")
    try:
        for a in agents:
            assert a.wait(240) == 0, a.tail()
    finally:
        for a in agents:
            a.stop()
    JobControl("reference", store=store).drop()
    return str(json.loads((tmp / "out.json").read_text())["digest"])
