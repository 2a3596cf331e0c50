"""torchrun through failures: a trainer crash, then a node loss with its agent, bitwise.

The job simulates three hosts on one machine: one torchrun agent per store
node, each told by ``SNAPSTORE_NODE`` which node it stands for. A worker is
killed; later a whole store node and its agent are killed, and a replacement
node and agent join. Nothing tells the store anything between the failures:
the example script only restores at start and saves every step. The final
model equals the run without failures (conftest.reference) bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from snapstore.clients import JobControl
from tests.conftest import wait_for
from tests.launchers.conftest import STEPS, Agent, latest, torchrun_job

pytestmark = pytest.mark.cluster


def test_torchrun_job_survives_a_trainer_crash_and_a_node_loss_bitwise(
    store: Any, reference: str, tmp_path: Path
) -> None:
    from snapstore.ops import faults

    job = "tr-fail"
    out = tmp_path / "out.json"
    agents: list[Agent] = []
    try:
        agents = torchrun_job(store, job, tmp_path, out=out, pause=0.2)
        host, victim = agents[0], agents[-1]  # the first agent hosts the rendezvous
        survivors = agents[:-1]

        # 1. A trainer crash: SIGKILL one worker; torchelastic restarts them all.
        wait_for(lambda: latest(store, job) >= 3, 120, "step 3 committed")
        crashed = victim.worker()
        crashed.kill()
        crashed_at = latest(store, job)
        wait_for(lambda: victim.worker().pid != crashed.pid, 60, "a restarted worker")
        wait_for(lambda: latest(store, job) >= crashed_at + 3, 120, "training resumed")

        # 2. A node loss: the store node dies with everything on it, its agent too.
        lost_at = latest(store, job)
        faults.kill_node(victim.node, store)
        victim.stop()
        # 3. A replacement node joins the store, and its agent the job.
        new = faults.add_node(store)
        replacement = Agent(store, new, job, host.port, False, tmp_path / "new.log", out=out)
        agents.append(replacement)
        for a in [*survivors, replacement]:
            assert a.wait(300) == 0, a.tail()
        result = json.loads(out.read_text())
    finally:
        for a in agents:
            a.stop()

    assert result["digest"] == reference, "the final model differs from the run without failures"
    assert lost_at < STEPS - 1 and result["start"] > 0, result
    control = JobControl(job, store=store)
    assert len(control.events(100, kinds=["incarnation"])) >= 2
    # The lost node's rank was decoded from parity (onto the replacement, or onto
    # a survivor when the store re-protected the step before the agent joined).
    assert control.events(100, kinds=["rebuild"]), "nothing was rebuilt"
    control.drop()
