"""Ray Train through failures: a worker crash, then a node loss, bitwise.

The example (docs/examples/ray_train_example.py) runs one worker per store
node with ``FailureConfig``; this test kills one worker process, later a
whole store node with the worker on it, and starts a replacement node. Ray
Train restarts the worker group (on the surviving nodes and the
replacement: one worker per node, all three); every worker restores, and the
final model equals, bitwise, the same job run without failures
(conftest.reference: the torchrun example, which trains the same model on
the same data with the same DDP settings).
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from snapstore.clients import JobControl
from tests.conftest import wait_for
from tests.launchers.conftest import ROOT, STEPS, latest

pytestmark = pytest.mark.cluster

EXAMPLE = ROOT / "docs" / "examples" / "ray_train_example.py"


def _example() -> Any:
    pytest.importorskip("ray.train.torch", reason="ray[train] is not installed")
    spec = importlib.util.spec_from_file_location("ray_train_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _workers(store: Any) -> dict[str, list[psutil.Process]]:
    """Ray Train's worker processes by store node (processes under the node's raylet)."""
    out: dict[str, list[psutil.Process]] = {}
    for node in store.reload().embedded_nodes():
        if node.head:
            continue
        for pid in node.pids:
            try:
                children = psutil.Process(pid).children(recursive=True)
            except psutil.Error:
                continue
            for c in children:
                try:
                    if "RayTrainWorker" in " ".join(c.cmdline()):
                        out.setdefault(node.node_id, []).append(c)
                except psutil.Error:
                    continue
    return out


def _in_background(fn: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


def test_ray_train_job_survives_a_worker_crash_and_a_node_loss_bitwise(
    store: Any, reference: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from snapstore.ops import faults

    example = _example()
    # Ray Train's controller polls its workers every 2 s; poll faster (Ray Train
    # passes the variable on to its controller).
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    job = "rt-fail"
    seen: dict[str, Any] = {}

    def inject() -> None:
        wait_for(lambda: latest(store, job) >= 3, 120, "step 3 committed")
        victim = next(iter(_workers(store).values()))[0]
        victim.kill()  # a worker crash: SIGKILL, as the OOM killer would
        seen["crash_step"] = latest(store, job)
        wait_for(lambda: latest(store, job) >= seen["crash_step"] + 3, 180, "training resumed")
        node = next(iter(_workers(store)))
        seen["lost_step"] = latest(store, job)
        faults.kill_node(node, store)  # a node loss: raylet, worker, SMP, memory
        new = seen["replacement"] = faults.add_node(store)
        # STRICT_SPREAD over all three store nodes: the new group needs the new node.
        wait_for(lambda: new in _workers(store), 120, "a worker on the replacement node")

    thread, errors = _in_background(inject)
    result = example.run(job, store.rundir, steps=STEPS, pause=0.2)
    thread.join(60)
    assert not errors, errors
    assert "replacement" in seen, "the failures were not injected before the run ended"
    assert seen["lost_step"] < STEPS - 1 and result["start"] > 0, (seen, result)
    assert result["digest"] == reference, "the final model differs from the run without failures"
    control = JobControl(job, store=store)
    incarnations = control.events(100, kinds=["incarnation"])
    assert len(incarnations) >= 2, incarnations
    assert control.events(100, kinds=["rebuild"]), "nothing was rebuilt"
    control.drop()
