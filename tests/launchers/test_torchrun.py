"""torchrun through failures: a trainer crash, then a node loss with its agent, bitwise.

The job simulates two hosts on one machine: one torchrun agent per store
node, each told by ``SNAPSTORE_NODE`` which node it stands for. A worker
is killed; later a whole node and its agent are killed, and a replacement
node and agent join. Nothing tells the store anything between the
failures: the example script only restores at start and saves every step.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import events, wait_for
from tests.launchers.conftest import BIN, ROOT, user_env

pytestmark = pytest.mark.cluster

EXAMPLE = ROOT / "docs" / "examples" / "torchrun_ddp.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Agent:
    """One torchrun agent standing for one host: its workers use the store node ``node``."""

    def __init__(
        self, store: Any, node: str, job: str, port: int, host: bool, log: Path, **kw: Any
    ) -> None:
        self.node, self.port, self.log = node, port, log
        cmd = [
            str(BIN / "torchrun"),
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--max-restarts",
            "3",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            job,
            # The first agent hosts the rendezvous (a stable endpoint, as a head
            # node or etcd would be); a lost node's agent misses 3 beats of 1 s.
            "--rdzv-conf",
            f"is_host={int(host)},keep_alive_interval=1,keep_alive_max_attempt=3",
            str(EXAMPLE),
            "--job",
            job,
        ]
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

    def worker(self, timeout: float = 60.0) -> psutil.Process:
        """The agent's training process (once it runs)."""

        def find() -> psutil.Process | None:
            for c in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    if str(EXAMPLE) in " ".join(c.cmdline()):
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

        if self.proc.poll() is None:
            kill_tree([self.proc.pid])
        self.proc.wait(10)


def _latest(store: Any, job: str) -> int:
    latest = store.call("latest", job)
    return -1 if latest is None else int(latest)


def _run(store: Any, job: str, nodes: list[str], tmp: Path, **kw: Any) -> list[Agent]:
    """Two agents, on the first two store nodes; the first hosts the rendezvous."""
    port = _free_port()
    return [
        Agent(store, n, job, port, i == 0, tmp / f"{job}-{i}.log", **kw)
        for i, n in enumerate(nodes[:2])
    ]


def test_torchrun_job_survives_a_trainer_crash_and_a_node_loss_bitwise(
    store: Any, tmp_path: Path
) -> None:
    from snapstore.ops import faults
    from snapstore.ops.cluster import kill_tree

    nodes = faults.store_nodes(store)
    steps = 24
    agents: list[Agent] = []
    try:
        # The reference: the same script, no failures.
        agents = _run(store, "tr-clean", nodes, tmp_path, steps=steps, out=tmp_path / "clean.json")
        for a in agents:
            assert a.wait(240) == 0, a.tail()
        clean = json.loads((tmp_path / "clean.json").read_text())

        job = "tr-fail"
        out = tmp_path / "fail.json"
        agents = _run(store, job, nodes, tmp_path, steps=steps, out=out, pause=0.2)
        survivor, victim = agents

        # 1. A trainer crash: SIGKILL one worker; torchelastic restarts both.
        wait_for(lambda: _latest(store, job) >= 4, 120, "step 4 committed")
        crashed = victim.worker()
        crashed.kill()
        crashed_at = _latest(store, job)
        wait_for(lambda: victim.worker().pid != crashed.pid, 60, "a restarted worker")
        wait_for(lambda: _latest(store, job) >= crashed_at + 4, 120, "training resumed")

        # 2. A node loss: the node dies with everything on it, its agent too.
        lost = victim.node
        lost_at = _latest(store, job)
        faults.kill_node(lost, store)
        kill_tree([victim.proc.pid])
        victim.proc.wait(10)
        # 3. A replacement node joins the store, and its agent the job.
        new = faults.add_node(store)
        log = tmp_path / "replacement.log"
        agents.append(Agent(store, new, job, survivor.port, False, log, steps=steps, out=out))
        for a in (survivor, agents[-1]):
            assert a.wait(300) == 0, a.tail()
        result = json.loads(out.read_text())
    finally:
        for a in agents:
            a.stop()

    assert result["digest"] == clean["digest"], "the final model differs from the clean run"
    assert lost_at < steps - 1 and result["start"] > 0, result
    incarnations = [e for e in events(store, "incarnation") if e.get("job") == job]
    assert len(incarnations) >= 2, incarnations
    # The lost node's rank was decoded from parity (onto the replacement, or onto
    # a survivor when the store re-protected the step before the agent joined).
    assert [e for e in events(store, "rebuild") if e.get("job") == job], "nothing was rebuilt"
    for name in ("tr-clean", job):
        store.call("drop_job", name)
