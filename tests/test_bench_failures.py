"""`python -m bench.failures --quick`: the failure-injection benchmark runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster


@pytest.mark.slow  # the demo recovers through the same bench.training path, bitwise
def test_failure_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "snapstore.bench.failures", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "failures.json").read_text())
    # --quick injects one kind: bench.chaos --quick checks every kind (corrupt too) bitwise.
    kinds = {r["kind"] for r in results["runs"]}
    assert kinds == {"node"}
    for r in results["runs"]:
        assert r["equal_to_reference"], r
        assert r["restore_seconds"] is not None and r["detect_seconds"] is not None
    node = next(r for r in results["runs"] if r["kind"] == "node")
    assert node["bytes_rebuilt"] > 0
    # dcp.async_save checkpoints from its own thread while the ranks all-reduce.
    assert [b["kind"] for b in results["baselines"]] == ["torch", "dcp"]
    for base in results["baselines"]:
        assert base["every"] >= 1 and base["stall_median"] > 0, base
        assert base["restore_seconds"] is not None and base["restore_seconds"] > 0, base
    assert "| node |" in (out / "failures.md").read_text()
    assert (out / "failures.png").stat().st_size > 5_000


def test_sigterm_stops_the_benchmark_and_everything_it_started(tmp_path: Path) -> None:
    """A benchmark killed with SIGTERM (a CI timeout, `kill`) still stops its store."""
    import glob
    import signal
    import time

    import psutil

    before = set(glob.glob("/tmp/ss-bench-*"))
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "snapstore.bench.failures", "--quick", "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        seen = ""
        assert proc.stdout is not None
        while "4 nodes k=3" not in seen:  # the store is up and training started
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, f"store never came up:\n{seen}"
            seen += line
        (rundir,) = set(glob.glob("/tmp/ss-bench-*")) - before
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert not Path(rundir).exists()
    left = [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if any(rundir in a for a in p.info["cmdline"] or ())
    ]
    assert not left, f"processes of the killed benchmark's store still run: {left}"
