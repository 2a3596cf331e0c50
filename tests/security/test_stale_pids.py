"""Finding 4: ``snapstore down`` killed whatever held a recorded pid.

A state file outlives its processes (a crash, a reboot); their pids are
then reused by anything, another user's process included. ``down`` and the
fault injector now signal a pid only while it still names the process
recorded (start time, executable, boot).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import psutil
import pytest

import snapstore
from snapstore.control.handle import STATE_VERSION, ProcessRef, write_state
from snapstore.ops.cluster import kill_tree
from tests.security.attacker import NOBODY, require_attacker


@pytest.fixture
def foreign() -> Iterator[subprocess.Popen[bytes]]:
    """Another user's process (uid 65534 when the tests run as root)."""
    kw = {}
    if os.geteuid() == 0:
        require_attacker()
        kw = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    proc = subprocess.Popen(["sleep", "300"], cwd="/", **kw)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def _stale(pid: int) -> ProcessRef:
    """How ``up`` recorded a process that has since exited and whose pid was reused."""
    live = ProcessRef.identify(pid)
    assert live is not None
    return dataclasses.replace(live, start=live.start - 1000, exe="/usr/bin/raylet")


def test_down_leaves_a_foreign_process_on_a_recorded_pid_alone(
    foreign: subprocess.Popen[bytes],
) -> None:
    rundir = tempfile.mkdtemp(prefix="ss-pid-", dir="/tmp")
    try:
        ref = _stale(foreign.pid)
        node = {
            "node_id": "ab" * 28,
            "head": True,
            "started_at": time.time() - 3600,
            "procs": [ref.to_dict()],
            "pids": [foreign.pid],  # how earlier releases recorded it
        }
        write_state(
            os.path.join(rundir, "store.json"),
            {
                "version": STATE_VERSION,
                "store_id": "deadbeef",
                "token": "t",
                "config": {},
                "embedded": True,
                "shm_dir": "/dev/shm",
                "nodes": [node],
                "server": {"pid": foreign.pid, "proc": ref.to_dict()},
            },
        )
        report = snapstore.down(rundir=rundir)
        time.sleep(0.2)
        assert foreign.poll() is None, "down killed a process that was not the store's"
        assert report["processes"] == 0 and foreign.pid in report["not_ours"]
        assert not os.path.exists(os.path.join(rundir, "store.json"))
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def test_kill_tree_signals_only_the_recorded_process(foreign: subprocess.Popen[bytes]) -> None:
    assert kill_tree([_stale(foreign.pid)]) == 0
    assert foreign.poll() is None
    ref = ProcessRef.identify(foreign.pid)
    assert ref is not None and ref.current()
    assert kill_tree([ref]) == 1  # the same call does kill the process recorded
    foreign.wait(10)
    assert not psutil.pid_exists(foreign.pid) or not ref.current()


def test_a_ref_names_one_process_of_one_boot() -> None:
    me = ProcessRef.identify(os.getpid())
    assert me is not None and me.current() and me.exe
    assert me == ProcessRef.from_dict(me.to_dict())
    assert not dataclasses.replace(me, boot="another-boot").current()
    assert not dataclasses.replace(me, exe="/bin/other").current()
    assert ProcessRef.identify(2**22 + 12345) is None  # above pid_max: no such process
